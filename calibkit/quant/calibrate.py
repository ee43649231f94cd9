"""Running calibration batches and measuring accuracy.

``calibrate(model, batches)`` puts a prepared model into ``FakeQuantState.CALIBRATION`` (the model
must already be in eval mode), feeds every batch without gradients and returns the wall time in
seconds. The time covers the forward passes *and* the final scale computation of every observer
(``calculate_qparams``), so observers that defer work to the end are timed fairly; the scales are
cached, so the following switch to VALIDATION does not compute them again.

Calibration is all or nothing (:mod:`calibkit.quant.snapshot`): a bad batch, an empty or failing iterator or
an observer without a scale raises a named error and leaves the model as it was. Calibrating a model whose scales
are fixed warns (``FixedScaleWarning``): those scales do not move.

``evaluate(model, images, labels)`` returns top-1 accuracy for a float, prepared or converted model;
``evaluate(model, loader)`` streams ``(inputs, labels)`` batches from any iterable or ``DataLoader`` with running
counts and returns :class:`Accuracy` (``top1``, ``top5``, ``count``). Labels outside the model's outputs raise
``ValueError``, and a model still in CALIBRATION (float compute) warns (``CalibrationStateWarning``).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from collections.abc import Iterable, Sequence, Sized

import torch
from torch import nn
from tqdm.auto import tqdm

from calibkit.checks import check_int, check_labels
from calibkit.devices import model_device
from calibkit.errors import CalibKitError, CalibrationError, StateError
from calibkit.quant.fake_quantize import (FakeQuantState, FakeQuantize, named_quantizers, require_quantizers,
                                          reset_observers, set_fake_quantize)
from calibkit.quant import distributed
from calibkit.quant.batches import batch_input, batch_pair
from calibkit.quant.snapshot import all_or_nothing


class FixedScaleWarning(UserWarning):
    """Calibration ran on a model some of whose scales are fixed: those scales did not change."""


class CalibrationStateWarning(UserWarning):
    """``evaluate`` ran on a prepared model still in CALIBRATION: it computes in float, not quantized."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warn_fixed(model: nn.Module) -> None:
    fixed = [n for n, fq in named_quantizers(model).items() if fq.is_fixed]
    if fixed:
        warnings.warn(f"{len(fixed)} quantizer(s) have fixed scales ({', '.join(fixed[:4])}{', ...' if len(fixed) > 4 else ''}) "
                      "that calibration will not change: unfix them (FakeQuantize.unfix_scale) to calibrate them again",
                      FixedScaleWarning, stacklevel=3)


def calibrate(model: nn.Module, batches: Iterable, progress: bool = True, reset: bool = False,
              sync: bool | None = None) -> float:
    """Calibrate a prepared ``model`` on ``batches``; returns the wall time in seconds.

    Args:
        model: output of ``prepare``, in eval mode (``StateError`` otherwise).
        batches: any iterable or ``torch.utils.data.DataLoader`` of input tensors (normalized float, e.g.
            ``calibration_batches(...)``), or of ``(inputs, labels)`` pairs whose labels are ignored
            (:func:`calibkit.quant.batches.batch_input`); moved to the model's device.
        progress: show a tqdm progress bar.
        reset: forget previously observed statistics first (default False: statistics accumulate).
        sync: under an initialized ``torch.distributed`` with several ranks, combine the observers' statistics
            across ranks (``None``: the module-wide :func:`calibkit.quant.distributed.set_sync`, on by default;
            ``False``: each rank keeps its own scales). Every rank then calls ``calibrate`` on its shard with the
            same number of batches (else :class:`~calibkit.quant.distributed.StepMismatchError` on every rank) and
            gets the scales of one process fed all batches step by step, rank by rank; only rank 0 shows
            progress (docs/methods.md#many-processes).

    All or nothing: ``batches`` is checked first where it can be (a sized container: not empty, every item a float
    tensor or pair); a batch that is not one (``TypeError``), a batch the model rejects (``CalibrationError`` naming
    it), an empty iterable or an observer that cannot produce a scale (``CalibrationError`` naming the quantizer)
    leave the model exactly as it was (statistics, scales, states; :mod:`calibkit.quant.snapshot`).
    Quantizers with a fixed scale keep it; a ``FixedScaleWarning`` says so.
    """
    require_quantizers(model)
    if isinstance(batches, torch.Tensor) or not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable of input tensors (e.g. a list), got {type(batches).__name__}"
                        + (": for one batch pass [x]" if isinstance(batches, torch.Tensor) else ""))
    with distributed.syncing(sync):
        if isinstance(batches, Sized):  # several ranks: an empty shard is reported by every rank (_same_steps)
            if len(batches) == 0 and distributed.world_size() == 1:
                raise CalibrationError("batches is empty: calibration needs at least one batch")
            if isinstance(batches, Sequence):
                for i, b in enumerate(batches):
                    batch_input(b, i)
        _warn_fixed(model)
        with all_or_nothing(model, parameters=False):  # eval mode, no gradients: parameter values cannot change
            return _run_calibration(model, batches, progress and distributed.rank() == 0, reset)


def _run_calibration(model: nn.Module, batches: Iterable, progress: bool, reset: bool) -> float:
    set_fake_quantize(model, FakeQuantState.CALIBRATION)
    if reset:
        reset_observers(model)
    device = model_device(model)
    total = len(batches) if hasattr(batches, "__len__") else None
    n = 0
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in tqdm(_same_steps(batches, device), total=total, desc="calibrate", disable=not progress,
                          leave=False):
            forward_batch(model, batch_input(batch, n), n, device)
            n += 1
        if n == 0:
            raise CalibrationError("batches is empty: calibration needs at least one batch")
        for fq in named_quantizers(model).values():
            fq.validation_scale()
    _sync(device)
    return time.perf_counter() - start


def forward_batch(model: nn.Module, x: torch.Tensor, i: int, device: torch.device) -> None:
    """``model(x)`` on ``device`` for a calibration pass; a failure in the model becomes a ``CalibrationError``
    naming ``batches[i]`` and its shape (calibkit's own errors pass through)."""
    try:
        model(x.to(device, non_blocking=True))
    except CalibKitError:
        raise
    except Exception as e:
        raise CalibrationError(f"batches[{i}] of shape {tuple(x.shape)} failed in the model: "
                               f"{type(e).__name__}: {e}") from e


def _same_steps(batches: Iterable, device: torch.device):
    """``batches``; under ``torch.distributed`` (:func:`calibkit.quant.distributed.world_size` > 1) each step first
    checks that every rank has a batch too (:func:`calibkit.quant.distributed.check_same_steps`)."""
    if distributed.world_size() == 1:
        yield from batches
        return
    step = 0
    for batch in batches:
        distributed.check_same_steps(True, step, device)
        yield batch
        step += 1
    distributed.check_same_steps(False, step, device)


@dataclass(frozen=True)
class Accuracy:
    """Accuracy of a streamed evaluation: ``top1`` and ``top5`` as fractions in [0, 1] over ``count`` inputs.

    ``top5`` counts a hit when the label is among the ``min(5, outputs)`` largest logits (1.0 for <= 5 classes).
    ``float(acc)`` is ``acc.top1``.
    """

    top1: float
    top5: float
    count: int

    def __float__(self) -> float:
        return self.top1


def _tensor_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int):
    """``(images, labels)`` slices of ``batch_size``: the in-memory form of a loader, checked first."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError("images must be a normalized float tensor (use calibkit.cifar.data.normalize on uint8 images)")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must be a 1-d tensor with one label per image ({images.shape[0]}), "
                         f"got shape {tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    check_int("batch_size", batch_size, 1)
    if images.shape[0] == 0:
        raise ValueError("images is empty: nothing to evaluate")
    if labels.is_floating_point() or labels.is_complex() or (labels.numel() and int(labels.min()) < 0):
        raise ValueError(f"labels must be class indices >= 0 (int64), got {labels.dtype}"
                         + (f" with minimum {int(labels.min())}" if not labels.is_floating_point() else ""))
    return [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]


def evaluate(model: nn.Module, images, labels: torch.Tensor | None = None, batch_size: int = 500,
             progress: bool = True) -> float | Accuracy:
    """Accuracy of ``model`` on in-memory tensors (top-1 ``float``) or streamed from a loader (:class:`Accuracy`).

    Two forms:

    * ``evaluate(model, images, labels, batch_size=500)`` -- ``images`` normalized float ``[N, ...]``,
      ``labels`` int64 ``[N]``; returns top-1 as a float in [0, 1].
    * ``evaluate(model, loader)`` -- any iterable or ``DataLoader`` of ``(inputs, labels)`` pairs (normalized
      float inputs, integer class indices); returns ``Accuracy(top1, top5, count)``. It keeps running counts
      only, so memory does not grow with the data set.

    ``model``: float, prepared (any state) or converted, in eval mode (``StateError`` otherwise). Labels outside
    ``[0, outputs)`` raise ``ValueError``. Observers never see evaluation data: any quantizer that is observing is
    paused for the duration and restored afterwards. ``progress`` shows a tqdm bar.
    """
    if labels is None:
        if isinstance(images, torch.Tensor) or not isinstance(images, Iterable):
            raise TypeError(f"evaluate takes (model, images, labels) tensors or (model, loader) with an iterable of "
                            f"(inputs, labels) pairs; got {type(images).__name__} and no labels")
        return _evaluate_stream(model, images, progress)
    return _evaluate_stream(model, _tensor_batches(images, labels, batch_size), progress).top1


def _evaluate_stream(model: nn.Module, loader: Iterable, progress: bool) -> Accuracy:
    if model.training:
        raise StateError("evaluate needs the model in eval mode: call model.eval() first")
    quantizers = [m for m in model.modules() if isinstance(m, FakeQuantize)]
    if any(m.state is FakeQuantState.CALIBRATION for m in quantizers):
        warnings.warn("evaluate: the model is still in FakeQuantState.CALIBRATION, where it computes in float: the "
                      "accuracy is the float model's; call set_fake_quantize(model, FakeQuantState.VALIDATION) "
                      "to measure the quantized model", CalibrationStateWarning, stacklevel=3)
    paused = [m for m in quantizers if m.observing]
    for m in paused:
        m.enable_observer(False)
    try:
        with torch.no_grad():
            return _count_hits(model, loader, progress)
    finally:
        for m in paused:
            m.enable_observer(True)


def _count_hits(model: nn.Module, loader: Iterable, progress: bool) -> Accuracy:
    """Running top-1 / top-5 hit counts over ``loader``; ``ValueError`` if it yields nothing."""
    device = model_device(model)
    total = len(loader) if isinstance(loader, Sized) else None
    top1 = top5 = count = 0
    for i, batch in enumerate(tqdm(loader, total=total, desc="evaluate", disable=not progress, leave=False)):
        x, y = batch_pair(batch, i)
        logits = model(x.to(device, non_blocking=True))
        check_labels(y, logits.shape[-1])
        # top-1 is argmax (the first of tied logits, which quantized logits often have); topk may order ties otherwise
        y = y.cpu()
        hit1 = logits.argmax(dim=-1).cpu() == y
        hit5 = (logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu() == y.unsqueeze(1)).any(dim=1) | hit1
        top1 += int(hit1.sum())
        top5 += int(hit5.sum())
        count += y.shape[0]
    if count == 0:
        raise ValueError("loader is empty: nothing to evaluate")
    return Accuracy(top1 / count, top5 / count, count)
