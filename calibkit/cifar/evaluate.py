"""Predictions and accuracy of a float CIFAR model on uint8 images, with optional test-time augmentation.

Images are uint8 ``[N, 3, H, W]`` (0..255), normalized with :func:`calibkit.cifar.data.normalize` batch by batch on
the model's device, in the model's memory format. Test-time augmentation follows airbench: level 1 averages
the logits of each image and its mirror image, level 2 adds the image shifted by one pixel each way.
"""

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from calibkit.checks import check_int, check_labels
from calibkit.cifar.data import normalize
from calibkit.devices import model_device

__all__ = ["predict", "accuracy", "confusion_matrix", "per_class_accuracy", "bf16_supported", "check_tta", "TTA_LEVELS"]


def _memory_format(model) -> torch.memory_format:
    for p in model.parameters():
        if p.ndim == 4:
            return torch.channels_last if p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() \
                else torch.contiguous_format
    return torch.contiguous_format


def bf16_supported(device) -> bool:
    """True when ``device`` runs bfloat16 convolutions fast: CUDA with bf16, or a CPU where oneDNN has bf16 kernels
    (AVX-512 / AMX; the probe is a private torch op, so a torch build without it reports False)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # probe missing in this torch build: assume no fast bf16
            return False
    return False


TTA_LEVELS = (0, 1, 2)


def check_tta(tta) -> int:
    """The test-time augmentation level of ``tta`` (0, 1 or 2; False / True mean 0 / 1), else ``ValueError``."""
    level = int(tta) if isinstance(tta, bool) or (isinstance(tta, int) and tta in TTA_LEVELS) else None
    if level is None:
        raise ValueError(f"tta={tta!r} is invalid: use 0/False (one view), 1/True (+ mirror) or 2 (+ mirror, "
                         "+ 1-pixel shifts)")
    return level


def _tta_logits(model, x: torch.Tensor, level: int, fmt: torch.memory_format) -> torch.Tensor:
    """Weighted mean of the logits over the views of ``x`` (normalized ``[N, C, H, W]``) that ``level`` asks for;
    shifted views are laid out in ``fmt`` (the model's memory format)."""
    logits = model(x)
    if level >= 1:
        logits = 0.5 * (logits + model(x.flip(3)))
    if level >= 2:
        # the image shifted by one pixel up-left and down-right (reflect padding), each with its mirror
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = sum(model(v.contiguous(memory_format=fmt)) for s in (padded[:, :, :-2, :-2], padded[:, :, 2:, 2:])
                      for v in (s, s.flip(3)))
        logits = 0.5 * logits + 0.125 * shifted
    return logits


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 1000, tta: bool | int = False,
            progress: bool = False) -> torch.Tensor:
    """Logits ``[N, num_classes]`` (float32, on the model's device) for uint8 ``images [N, 3, H, W]``.

    Runs in eval mode (the previous mode is restored). ``tta`` (test-time augmentation, as in airbench):
    0 / False (default) one view; 1 / True the mean logits of each image and its mirror image (2 forward
    passes); 2 half of level 1 plus half of the mean over the image shifted by one pixel up-left and
    down-right (reflect padding), each also mirrored (6 forward passes)."""
    level = check_tta(tta)
    check_int("batch_size", batch_size, 1)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images has shape {tuple(images.shape)}: expected a non-empty uint8 [N, 3, H, W] batch")
    was_training, dev, fmt = model.training, model_device(model), _memory_format(model)
    model.eval()
    out = []
    try:
        for i in tqdm(range(0, len(images), batch_size), desc="predict", disable=not progress, leave=False):
            x = normalize(images[i:i + batch_size].to(dev)).contiguous(memory_format=fmt)
            out.append(_tta_logits(model, x, level, fmt).float())
    finally:
        model.train(was_training)
    return torch.cat(out)


def accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000, tta: bool | int = False,
             progress: bool = False) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on uint8 ``images [N, 3, H, W]`` with int64 ``labels [N]``
    (normalization done here; see ``predict`` for ``tta``)."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) must be non-empty and of equal length")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
    logits = predict(model, images, batch_size, tta, progress)
    check_labels(labels, logits.shape[1])
    return (logits.argmax(1).cpu() == labels.cpu()).float().mean().item()


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """int64 ``[num_classes, num_classes]`` counts: row = true class, column = predicted class."""
    preds, labels = preds.cpu().long(), labels.cpu().long()
    if preds.shape != labels.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} must have the same shape")
    for name, t in (("preds", preds), ("labels", labels)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"{name} holds values outside [0, {num_classes - 1}] (num_classes={num_classes})")
    return torch.bincount(labels * num_classes + preds, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> torch.Tensor:
    """float ``[C]`` recall per true class (diagonal / row sum) from a confusion matrix; NaN for a class with no samples."""
    confusion = confusion.double()
    return (confusion.diagonal() / confusion.sum(1)).float()
