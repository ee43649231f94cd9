"""Float training and evaluation of the CIFAR-10 model.

Recipe (airbench-style, all in-memory): Nesterov SGD, label smoothing, a linear warm-up then a
linear decay of the learning rate to zero, per-step weight decay on every trained tensor, frozen BN
weights with fast BN biases, lookahead, and batched augmentation on the uint8 image tensor (random
horizontal flip and a random translation of up to ``translate`` pixels with reflect padding); the
model's stages pool before BN while training (see ``calibkit.cifar.models.Stage``). Channels-last
activations on every device, and bfloat16 autocast for forward/backward where the device has fast
bf16 (``bf16_supported``).
Everything random draws from one ``torch.Generator`` seeded by ``seed``, so on a given device and
thread count the same seed gives the same weights.

Images passed to ``train``, ``accuracy`` and ``predict`` are uint8 ``[N, 3, H, W]`` (0..255);
they are normalized with ``calibkit.cifar.data.normalize`` on the fly, batch by batch.
"""

import json
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from calibkit.cifar.data import normalize
from calibkit.cifar.models import Stage, cifar_resnet, whiten_stem_

__all__ = ["PROFILES", "augment", "train", "train_profile", "predict", "accuracy", "confusion_matrix",
           "per_class_accuracy", "lr_multiplier", "bf16_supported",
           "profile_dataset", "profile_config"]

# Both profiles use an airbench-style recipe (Keller Jordan's fast CIFAR-10 training, see ``train``): batch 1024
# (smoke: 128), lr 1.5 per 1024 images for the mean loss with a per-step weight decay of lr * 1.3e-3, Nesterov
# momentum 0.85, BN weights frozen and BN biases at 64x lr, logits scaled by 1/9 in the loss, lookahead, alternating
# flips, a frozen whitened stem, stages that pool before BN while training. "full": the wider 64/256/256 net for
# 22 epochs, sized to the 40-minute budget on 2 CPU cores; "smoke": a narrow net on a 20k/2k subset for 2 epochs,
# well above 50 %.
# Measured accuracy and time: benchmarks/train_float.py.
_RECIPE = dict(momentum=0.85, weight_decay=1.3e-3, label_smoothing=0.2, translate=2, head_lr_scale=1.0,
               bias_lr_scale=64.0, freeze_bn_weight=True, bn_momentum=0.4, logit_scale=1 / 9, lookahead=True,
               alternate_flip=True, whiten=True, pool_first=True)
PROFILES = {
    "full": dict(width=(64, 256, 256), epochs=22, batch_size=1024, lr=1.5, warmup_epochs=5.0, eval_every=3,
                 num_train=None, num_test=None, **_RECIPE),
    "smoke": dict(width=(16, 32, 32), epochs=2, batch_size=128, lr=0.4, warmup_epochs=0.5, eval_every=1,
                  num_train=20000, num_test=2000, **_RECIPE),
}
# the profile entries that are ``train`` keywords (the others choose the model, the epochs and the data subset)
_TRAIN_KEYS = tuple(k for k in PROFILES["full"] if k not in ("width", "epochs", "num_train", "num_test"))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _reflect(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect out-of-range indices back into ``[0, size)`` (edge pixel not repeated, like ``F.pad(mode="reflect")``)."""
    idx = idx.abs()
    return torch.where(idx > size - 1, 2 * (size - 1) - idx, idx)


def augment(images: torch.Tensor, generator: torch.Generator, flip: bool = True, translate: int = 2,
            flip_mask: torch.Tensor | None = None, cutout: int = 0, cutout_fill=None) -> torch.Tensor:
    """Random flip + translate (+ cutout) a batch; returns a new tensor of the same shape, dtype and device.

    Args:
        images: ``[N, C, H, W]`` tensor (any dtype; uint8 in training).
        generator: CPU ``torch.Generator`` all random draws come from.
        flip: mirror each image left-right with probability 0.5.
        flip_mask: bool ``[N]`` on the CPU; when given, mirror exactly the images where it is True (instead of
            the random draw of ``flip``).
        translate: shift each image by an integer offset drawn uniformly from ``[-translate, translate]``
            pixels, independently in x and y; pixels shifted in come from reflect padding
            (``out[y, x] = in[reflect(y + dy), reflect(x + dx)]``). 0 disables it.
        cutout: side (pixels) of a square set to ``cutout_fill`` in every image, centred on a pixel drawn
            uniformly (the square may be cut by the border; DeVries & Taylor 2017). 0 (default) disables it
            and draws no random numbers. cutout_fill: per-channel values (length C) or None for 0.
    The flip is applied after the shift, cutout last. Labels are unaffected.
    """
    if images.ndim != 4:
        raise ValueError(f"images has shape {tuple(images.shape)}: expected [N, C, H, W]")
    n, c, h, w = images.shape
    if not 0 <= int(translate) < min(h, w):
        raise ValueError(f"translate={translate} is out of range: use an integer in [0, {min(h, w) - 1}]")
    if not 0 <= int(cutout) <= min(h, w):
        raise ValueError(f"cutout={cutout} is out of range: use an integer in [0, {min(h, w)}]")
    rows = torch.arange(h).expand(n, h)
    cols = torch.arange(w).expand(n, w)
    if translate:
        rows = _reflect(rows + torch.randint(-translate, translate + 1, (n, 1), generator=generator), h)
        cols = _reflect(cols + torch.randint(-translate, translate + 1, (n, 1), generator=generator), w)
    if flip_mask is not None:
        if flip_mask.shape != (n,) or flip_mask.dtype != torch.bool:
            raise ValueError(f"flip_mask must be a bool tensor of shape [{n}]; got {flip_mask.dtype} {tuple(flip_mask.shape)}")
        cols = torch.where(flip_mask.cpu()[:, None], cols.flip(1), cols)
    elif flip:
        mirrored = torch.rand(n, generator=generator) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    dev = images.device
    out = images[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                 rows.to(dev)[:, None, :, None], cols.to(dev)[:, None, None, :]]
    if cutout:
        lo_y = torch.randint(0, h, (n, 1), generator=generator) - cutout // 2
        lo_x = torch.randint(0, w, (n, 1), generator=generator) - cutout // 2
        in_y = (torch.arange(h)[None] >= lo_y) & (torch.arange(h)[None] < lo_y + cutout)   # [n, h]
        in_x = (torch.arange(w)[None] >= lo_x) & (torch.arange(w)[None] < lo_x + cutout)   # [n, w]
        mask = (in_y[:, None, :, None] & in_x[:, None, None, :]).to(dev)
        fill = torch.zeros((), dtype=images.dtype, device=dev) if cutout_fill is None else \
            torch.as_tensor(cutout_fill, device=dev).to(images.dtype).reshape(1, c, 1, 1)
        out = torch.where(mask, fill, out)
    return out


def lr_multiplier(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate factor at optimizer step ``step`` (0-based): rises linearly to 1 over ``warmup_steps``
    steps, then falls linearly to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def _memory_format(model) -> torch.memory_format:
    for p in model.parameters():
        if p.ndim == 4:
            return torch.channels_last if p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() \
                else torch.contiguous_format
    return torch.contiguous_format


def _device(model) -> torch.device:
    return next(model.parameters()).device


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


def _tta_level(tta) -> int:
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
    level = _tta_level(tta)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is out of range: use a value >= 1")
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images has shape {tuple(images.shape)}: expected a non-empty uint8 [N, 3, H, W] batch")
    was_training, dev, fmt = model.training, _device(model), _memory_format(model)
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
    preds = predict(model, images, batch_size, tta, progress).argmax(1)
    return (preds.cpu() == labels.cpu()).float().mean().item()


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


class _Lookahead:
    """Lookahead on the weights (Zhang et al. 2019, as in airbench): a slow copy of every float tensor of the
    state dict (weights and BN running statistics); ``update(decay)`` moves the slow copy towards the model by
    ``1 - decay`` and copies it back into the model."""

    def __init__(self, model):
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model, decay: float):
        state = model.state_dict()
        for k, slow in self.slow.items():
            slow.lerp_(state[k], 1 - decay)
            state[k].copy_(slow)


def _check_positive(**values):
    for name, v in values.items():
        if not v > 0:
            raise ValueError(f"{name}={v} is out of range: use a value > 0")


def train(model, ds, epochs: int, batch_size: int = 1024, lr: float = 1.5, seed: int = 0, *, momentum: float = 0.85,
          weight_decay: float = 1.3e-3, label_smoothing: float = 0.2, warmup_epochs: float = 2.0, flip: bool = True,
          alternate_flip: bool = True, translate: int = 2, cutout: int = 0, head_lr_scale: float = 1.0,
          bias_lr_scale: float = 64.0,
          freeze_bn_weight: bool = True, bn_momentum: float | None = 0.4, logit_scale: float = 1 / 9,
          lookahead: bool = True, whiten: bool = True, pool_first: bool | None = None, amp: bool | None = None,
          eval_every: int = 1, tta: bool | int = False, eval_batch_size: int = 1000, progress: bool = True) -> dict:
    """Train ``model`` in place on ``ds.train_images`` / ``ds.train_labels`` (uint8 ``[N,3,H,W]``, int64 ``[N]``).

    The defaults are an airbench-style recipe (Keller Jordan's fast CIFAR-10 training) adapted to a ReLU model
    that must stay foldable and quantizable.

    Args:
        epochs: passes over the training set (>= 1); the last incomplete batch of each pass is dropped.
        batch_size: images per optimizer step, in [1, N].
        lr: peak learning rate for the mean loss over the batch, > 0; ``warmup_epochs`` (>= 0) of linear
            warm-up, then a linear decay to 0 at the end.
        seed: seeds the data order and augmentation (seed the model's init yourself with ``torch.manual_seed``).
        momentum: Nesterov momentum in [0, 1).
        weight_decay: L2 coefficient (>= 0) on every trained tensor, applied by SGD as ``lr_group * wd_group * w``;
            each group's coefficient is divided by its lr factor, so every tensor decays by the same
            ``lr * weight_decay`` fraction per step whatever its lr factor.
        label_smoothing: in [0, 1).
        flip / translate / cutout: augmentation, see ``augment`` (cutout fills with the mean training pixel).
            alternate_flip: with ``flip``, every image is mirrored
            at random in the first epoch and then exactly in every other epoch (each epoch sees the view the
            previous one did not), instead of a fresh coin per epoch.
        head_lr_scale: lr factor (> 0) for the final ``nn.Linear``. bias_lr_scale: lr factor (> 0) for the
            BatchNorm biases (airbench uses 64: with frozen BN weights the biases are the only per-channel
            shift, and they are not scale-invariant).
        freeze_bn_weight: keep every BatchNorm weight at its initial value (not trained).
        bn_momentum: BatchNorm running-statistics momentum during training, in (0, 1] (PyTorch convention:
            weight of the newest batch); None keeps the model's. The previous values are restored afterwards.
        logit_scale: the loss sees ``logit_scale * model(x)`` (> 0); when training ends the factor is folded
            into the last ``nn.Linear`` (weight and bias), so the returned model needs no extra op.
        lookahead: keep a lookahead copy of the weights, synchronised every 5 steps with a decay rising as
            ``0.95**5 * (step / total)**3``; the returned model is the slow copy as of the last
            synchronisation (runs of fewer than 5 steps return the trained weights).
        whiten: initialize the model's ``stem.conv`` with ``whiten_stem_`` from 5,000 training images (drawn
            with ``seed``) and keep it frozen; the model needs a ``stem.conv`` attribute.
        pool_first: while training, every ``calibkit.cifar.models.Stage`` pools before its BN and ReLU (see
            ``Stage``: BN and ReLU touch 4x fewer elements) and is switched back afterwards. It needs
            ``freeze_bn_weight`` and positive BN weights, so that the eval-mode order computes the same
            function; None = on exactly when ``freeze_bn_weight``. Models without ``Stage`` modules are
            unaffected.
        amp: run forward/backward under bfloat16 autocast (weights, optimizer and evaluation stay float32);
            None = on when ``bf16_supported(device)`` (about 3x faster on AMX CPUs).
        eval_every: test accuracy (``ds.test_images``) every this many epochs and after the last; 0 = only after
            the last. tta: test-time augmentation level of those evaluations (see ``predict``).
    Returns a history dict: per-epoch lists ``epoch``, ``train_loss``, ``train_accuracy`` (on augmented batches),
    ``test_accuracy`` (None where not evaluated), ``epoch_seconds`` (training only), ``eval_seconds``;
    and ``train_seconds`` (sum of epoch_seconds), ``test_accuracy_final``, ``steps`` and the hyperparameters.
    The model is left in eval mode, on its device, in channels-last memory format.
    """
    n = len(ds.train_images)
    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs={epochs} is out of range: use an integer >= 1")
    if int(batch_size) != batch_size or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size={batch_size} is out of range: use an integer in [1, {n}] (the training set size)")
    _check_positive(lr=lr, head_lr_scale=head_lr_scale, bias_lr_scale=bias_lr_scale, logit_scale=logit_scale)
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum={momentum} is out of range: use a value in [0, 1)")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay={weight_decay} is out of range: use a value >= 0")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing={label_smoothing} is out of range: use a value in [0, 1)")
    if not warmup_epochs >= 0:
        raise ValueError(f"warmup_epochs={warmup_epochs} is out of range: use a value >= 0")
    if bn_momentum is not None and not 0 < bn_momentum <= 1:
        raise ValueError(f"bn_momentum={bn_momentum} is out of range: use a value in (0, 1] or None")
    if int(eval_every) != eval_every or eval_every < 0:
        raise ValueError(f"eval_every={eval_every} is out of range: use an integer >= 0")
    _tta_level(tta)  # checked before training, not after the first epoch
    pool_first = freeze_bn_weight if pool_first is None else bool(pool_first)
    stages = [m for m in model.modules() if isinstance(m, Stage)] if pool_first else []
    if stages and not freeze_bn_weight:
        raise ValueError("pool_first=True needs freeze_bn_weight=True: pooling before BN gives the same eval-mode "
                         "function only while every BN weight stays positive")
    if any((m.conv.bn.weight <= 0).any() for m in stages):
        raise ValueError("pool_first=True needs positive BN weights in every Stage's conv block (max-pool commutes "
                         "only with increasing per-channel maps); re-initialize the model or pass pool_first=False")

    dev = _device(model)
    amp = bf16_supported(dev) if amp is None else bool(amp)
    gen = _generator(seed)
    images, labels = ds.train_images, ds.train_labels
    frozen = set()
    if whiten:
        stem = getattr(getattr(model, "stem", None), "conv", None)
        if not isinstance(stem, torch.nn.Conv2d):
            raise ValueError("whiten=True needs a model with a `stem.conv` nn.Conv2d (like calibkit.cifar.models.cifar_resnet)")
        pick = torch.randperm(n, generator=gen)[:5000]
        whiten_stem_(stem, normalize(images[pick].to(dev)))
        frozen.add(stem.weight)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if freeze_bn_weight:
        frozen.update(m.weight for m in norms if m.weight is not None)
    frozen = {p for p in frozen if p.requires_grad}  # no gradient is computed for them while training
    bn_biases = {m.bias for m in norms if m.bias is not None}
    model.to(memory_format=torch.channels_last).train()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    head = set(linears[-1].parameters()) if linears else set()
    groups = {}
    for p in model.parameters():
        if p.requires_grad and p not in frozen:
            scale = head_lr_scale if p in head else bias_lr_scale if p in bn_biases else 1.0
            groups.setdefault(scale, []).append(p)
    opt = torch.optim.SGD([{"params": ps, "lr": lr * s, "weight_decay": weight_decay / s} for s, ps in groups.items()],
                          lr=lr, momentum=momentum, nesterov=momentum > 0)
    steps_per_epoch = n // batch_size
    total = epochs * steps_per_epoch
    warmup = round(warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, total, warmup))
    slow = _Lookahead(model) if lookahead else None
    base_flips = torch.rand(n, generator=gen) < 0.5 if flip and alternate_flip else None
    # cutout fills with the mean training pixel (about 0 after normalization)
    fill = images[:5000].to(torch.float32).mean((0, 2, 3)).round().to(images.dtype) if cutout else None

    hist = {k: [] for k in ("epoch", "train_loss", "train_accuracy", "test_accuracy", "epoch_seconds", "eval_seconds")}
    bar = tqdm(total=total, desc="train", disable=not progress)
    step = 0
    # module state changed for training only, restored in `finally`
    for p in frozen:
        p.requires_grad_(False)
    old_pool_first = [m.pool_first for m in stages]
    for m in stages:
        m.pool_first = True
    old_bn_momentum = [m.momentum for m in norms]
    if bn_momentum is not None:
        for m in norms:
            m.momentum = bn_momentum
    try:
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            order = torch.randperm(n, generator=gen)[: steps_per_epoch * batch_size].view(steps_per_epoch, batch_size)
            loss_sum = torch.zeros((), device=dev)
            correct = torch.zeros((), device=dev, dtype=torch.int64)
            for idx in order:
                mask = None if base_flips is None else base_flips[idx] ^ (epoch % 2 == 0)
                xb = augment(images[idx].to(dev), gen, flip=flip, translate=translate, flip_mask=mask, cutout=cutout,
                             cutout_fill=fill)
                yb = labels[idx].to(dev)
                x = normalize(xb).contiguous(memory_format=torch.channels_last)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    logits = model(x)
                loss = F.cross_entropy(logit_scale * logits.float(), yb, label_smoothing=label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if slow is not None and step % 5 == 0:
                    slow.update(model, 0.95 ** 5 * (step / total) ** 3)
                loss_sum += loss.detach()
                correct += (logits.detach().argmax(1) == yb).sum()
                bar.update(1)
                if progress and bar.n % 10 == 0:
                    bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
            if epoch == epochs:
                if slow is not None and step >= 5:  # the model becomes the slow copy (as airbench does)
                    slow.update(model, 1.0)
                if logit_scale != 1 and linears:
                    with torch.no_grad():
                        for p in linears[-1].parameters():
                            p.mul_(logit_scale)
            seen = steps_per_epoch * batch_size
            hist["epoch"].append(epoch)
            hist["train_loss"].append(loss_sum.item() / steps_per_epoch)
            hist["train_accuracy"].append(correct.item() / seen)
            hist["epoch_seconds"].append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            test_acc = None
            if epoch == epochs or (eval_every and epoch % eval_every == 0):
                test_acc = accuracy(model, ds.test_images, ds.test_labels, eval_batch_size, tta=tta)
                model.train()
            hist["test_accuracy"].append(test_acc)
            hist["eval_seconds"].append(time.perf_counter() - t1)
            bar.set_postfix(epoch=epoch, loss=f"{hist['train_loss'][-1]:.3f}", train_acc=f"{hist['train_accuracy'][-1]:.3f}",
                            test_acc="-" if test_acc is None else f"{test_acc:.4f}")
    finally:
        bar.close()
        for m, mom in zip(norms, old_bn_momentum):
            m.momentum = mom
        for m, old in zip(stages, old_pool_first):
            m.pool_first = old
        for p in frozen:
            p.requires_grad_(True)
    model.eval()
    hist.update(train_seconds=sum(hist["epoch_seconds"]), test_accuracy_final=hist["test_accuracy"][-1], steps=total,
                epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, momentum=momentum, weight_decay=weight_decay,
                label_smoothing=label_smoothing, warmup_epochs=warmup_epochs, flip=flip, alternate_flip=alternate_flip,
                translate=translate, cutout=cutout, head_lr_scale=head_lr_scale, bias_lr_scale=bias_lr_scale,
                freeze_bn_weight=freeze_bn_weight, bn_momentum=bn_momentum, logit_scale=logit_scale, lookahead=lookahead,
                whiten=whiten, pool_first=pool_first, amp=amp, tta=tta, num_train=n, num_test=len(ds.test_images))
    return hist


def _profile(profile: str) -> dict:
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r} is unknown: use one of {sorted(PROFILES)}")
    return PROFILES[profile]


def profile_config(profile: str = "full", epochs: int | None = None, **overrides) -> dict:
    """The complete settings ``train_profile(ds, profile, epochs=epochs, **overrides)`` trains with, as JSON
    types (tuples become lists): the profile's entries, then ``epochs`` (None = the profile's), then
    ``overrides``. Stored in checkpoints so that a changed recipe is never mistaken for a reusable model."""
    cfg = {**_profile(profile), **({} if epochs is None else {"epochs": epochs}), **overrides}
    return json.loads(json.dumps(cfg))


def profile_dataset(ds, profile: str = "full", seed: int = 0, **overrides):
    """The data a profile trains and evaluates on: ``ds`` itself, or ``ds.subset(train=num_train, test=num_test,
    seed=seed)`` when the profile (or ``overrides``) sets ``num_train`` / ``num_test``."""
    cfg = {**_profile(profile), **overrides}
    if cfg["num_train"] is None and cfg["num_test"] is None:
        return ds
    return ds.subset(train=cfg["num_train"], test=cfg["num_test"], seed=seed)


def train_profile(ds, profile: str = "full", seed: int = 0, epochs: int | None = None, progress: bool = True,
                  device=None, **overrides):
    """Build ``cifar_resnet`` for ``profile`` (a key of ``PROFILES``), seeded by ``seed``, and train it.

    The profile's ``num_train`` / ``num_test`` subset ``ds`` first (``ds.subset(..., seed=seed)``); ``epochs``
    (None = profile default) and ``overrides`` (any ``train`` keyword) replace profile values.
    ``device``: where to train (default: CPU). Returns ``(model, history)``; ``history`` also holds
    ``profile``, ``arch``, ``arch_kwargs``, ``data_source`` and ``classes``.
    """
    cfg = profile_config(profile, epochs, **overrides)
    ds = profile_dataset(ds, profile, seed, num_train=cfg["num_train"], num_test=cfg["num_test"])
    arch_kwargs = {"width": list(cfg["width"]), "blocks": list(cfg.get("blocks", (1, 1, 1))), "num_classes": len(ds.classes)}
    torch.manual_seed(seed)
    model = cifar_resnet(**arch_kwargs).to(device or "cpu")
    train_kw = {k: cfg[k] for k in _TRAIN_KEYS}
    train_kw.update({k: v for k, v in overrides.items() if k not in PROFILES[profile] and k != "blocks"})
    history = train(model, ds, cfg["epochs"], seed=seed, progress=progress, **train_kw)
    history.update(profile=profile, arch="cifar_resnet", arch_kwargs=model.config, data_source=ds.source,
                   classes=list(ds.classes), config=cfg)
    return model, history
