"""Running calibration batches and measuring accuracy.

``calibrate(model, batches)`` puts a prepared model into ``FakeQuantState.CALIBRATION`` (the model
must already be in eval mode), feeds every batch without gradients and returns the wall time in
seconds. The time covers the forward passes *and* the final scale computation of every observer
(``calculate_qparams``), so observers that defer work to the end are timed fairly; the scales are
cached, so the following switch to VALIDATION does not compute them again.

``evaluate(model, images, labels)`` returns top-1 accuracy for a float, prepared or converted model.
"""

from __future__ import annotations

import time
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from calibkit.checks import check_int
from calibkit.devices import model_device
from calibkit.errors import CalibrationError, StateError
from calibkit.quant.fake_quantize import FakeQuantState, FakeQuantize, named_quantizers, reset_observers, set_fake_quantize


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(model: nn.Module, batches: Iterable, progress: bool = True, reset: bool = False) -> float:
    """Calibrate a prepared ``model`` on ``batches``; returns the wall time in seconds.

    Args:
        model: output of ``prepare``, in eval mode (``StateError`` otherwise).
        batches: iterable of input tensors (normalized float, e.g. ``calibration_batches(...)``), or of
            ``(inputs, labels)`` pairs whose labels are ignored; moved to the model's device.
        progress: show a tqdm progress bar.
        reset: forget previously observed statistics first (default False: statistics accumulate).

    Raises ``CalibrationError`` when ``batches`` is empty or an observer cannot produce a scale
    (the message names the quantizer).
    """
    set_fake_quantize(model, FakeQuantState.CALIBRATION)
    if reset:
        reset_observers(model)
    device = model_device(model)
    total = len(batches) if hasattr(batches, "__len__") else None
    n = 0
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in tqdm(batches, total=total, desc="calibrate", disable=not progress, leave=False):
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            model(batch.to(device, non_blocking=True))
            n += 1
        if n == 0:
            raise CalibrationError("batches is empty: calibration needs at least one batch")
        for fq in named_quantizers(model).values():
            fq.validation_scale()
    _sync(device)
    return time.perf_counter() - start


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
             progress: bool = True) -> float:
    """Top-1 accuracy of ``model`` as a fraction in [0, 1].

    Args:
        model: float, prepared (any state) or converted model, in eval mode (``StateError`` otherwise).
        images: normalized float inputs ``[N, ...]`` (``calibkit.cifar.data.normalize`` for CIFAR uint8).
        labels: int64 class indices ``[N]``.
        batch_size: images per forward pass (>= 1).
        progress: show a tqdm progress bar.

    Observers never see evaluation data: any quantizer that is observing is paused for the duration
    and restored afterwards.
    """
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError("images must be a normalized float tensor (use calibkit.cifar.data.normalize on uint8 images)")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must be a 1-d tensor with one label per image ({images.shape[0]}), "
                         f"got shape {tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    check_int("batch_size", batch_size, 1)
    if images.shape[0] == 0:
        raise ValueError("images is empty: nothing to evaluate")
    if model.training:
        raise StateError("evaluate needs the model in eval mode: call model.eval() first")
    device = model_device(model)
    paused = [m for m in model.modules() if isinstance(m, FakeQuantize) and m.observing]
    for m in paused:
        m.enable_observer(False)
    correct = 0
    try:
        with torch.no_grad():
            for i in tqdm(range(0, images.shape[0], batch_size), desc="evaluate", disable=not progress, leave=False):
                logits = model(images[i:i + batch_size].to(device, non_blocking=True))
                correct += int((logits.argmax(dim=1).cpu() == labels[i:i + batch_size].cpu()).sum())
    finally:
        for m in paused:
            m.enable_observer(True)
    return correct / images.shape[0]
