"""Quantization-aware training (QAT) from a calibrated model (``docs/methods.md#fake-quantize-states`` and
``#fixed-or-free-feature-map-scales``).

:func:`train_qat` fine-tunes a prepared, calibrated model in ``FakeQuantState.QAT``: the model is in
train mode, every tensor is fake-quantized and gradients pass the rounding straight through (zero
outside the clipping range, ``calibkit.quant.fake_quantize``). BatchNorm was folded by ``prepare``,
so the folded conv weights and biases are trained directly.

Feature-map (activation) scales:

* ``fix_feature_map_scales=True``: every activation scale is fixed at its calibrated value (the
  same as an averaging constant of 0 for the activation observers) and stays bit-identical;
* ``False``: activation observers keep observing the training batches with their own averaging
  constant and the scales follow them.

Weight quantizers always keep observing, so their scales follow the weights as they change.

The loop is generic: the training data, the augmentation, the preprocessing, the loss and the optimizer are
passed in (defaults: no augmentation, cross-entropy with label smoothing, Nesterov SGD with weight decay on
weights only); the schedule is a linear warm-up over ``warmup_fraction`` of the steps, then a cosine decay to 0.
Data order and augmentation draw from one generator seeded by ``seed``: the same seed and budget give the same
run. The steps run in :func:`calibkit.loop.train_steps`, the loop float training uses too.

:func:`recommend_fixed_scales` turns the guide's observation (fixing helps when calibration is
already close to float, hurts when it is poor) into a rule with a stated threshold.

Checkpoints of prepared models: :mod:`calibkit.quant.io`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sized
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from calibkit.checks import check_int, check_labels, check_number
from calibkit.devices import model_device
from calibkit.loop import lr_multiplier, train_steps
from calibkit.quant.batches import batch_pair, require_reiterable
from calibkit.quant.calibrate import evaluate
from calibkit.quant.io import save_prepared
from calibkit.quant.snapshot import all_or_nothing
from calibkit.quant.fake_quantize import FakeQuantState, require_quantizers, fix_activation_scales, set_fake_quantize

__all__ = ["train_qat", "default_optimizer", "set_feature_map_scales", "activation_scales", "weight_scales", "Recommendation", "recommend_fixed_scales", "relative_gap", "measured_choice", "DEFAULT_GAP_THRESHOLD"]

# -- scales ---------------------------------------------------------------------------------------------
def activation_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """Current scale of every activation quantizer (clones)."""
    return {n: fq.scale.detach().clone() for n, fq in require_quantizers(model).items() if fq.kind != "weight"}


def weight_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """Current scale of every weight quantizer (clones)."""
    return {n: fq.scale.detach().clone() for n, fq in require_quantizers(model).items() if fq.kind == "weight"}


def _mean_rel_change(now: dict, start: dict) -> float:
    vals = [float(((now[n] - start[n]).abs() / start[n]).mean()) for n in start]
    return sum(vals) / max(1, len(vals))


# -- training ----------------------------------------------------------------------------------------------
def _sampled_batches(images, labels, steps: int, batch_size: int, gen, device, augment, preprocess):
    """``steps`` batches drawn without replacement from a seeded stream of permutations (a new permutation is
    appended whenever fewer than ``batch_size`` indices are left), augmented, moved to ``device`` and preprocessed."""
    order = torch.empty(0, dtype=torch.int64)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(images), generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        xb = images[idx] if augment is None else augment(images[idx], gen)
        xb = xb.to(device)
        yield (xb if preprocess is None else preprocess(xb)), labels[idx].to(device)


def _loader_batches(loader, steps: int, gen, device, augment, preprocess, classes: list):
    """``steps`` ``(inputs, labels)`` batches from ``loader``, started again whenever it ends (its sampler reshuffles
    each pass), augmented on the CPU, moved to ``device`` and preprocessed; labels beyond the model's outputs
    (``classes[0]``, once known) raise ``ValueError``."""
    i = 0
    while i < steps:
        start = i
        for batch in loader:
            if i == steps:
                return
            x, y = batch_pair(batch, i, "train_images")
            if classes:
                check_labels(y, classes[0])
            xb = (x if augment is None else augment(x, gen)).to(device)
            yield (xb if preprocess is None else preprocess(xb)), y.to(device)
            i += 1
        if i == start:
            raise ValueError("train_images (a loader) yielded no batch: QAT needs at least one")


def _check_loader_args(loader, batch_size, val_images, val_labels) -> int:
    """Checks of the loader form of ``train_qat``; returns the batches per pass of ``loader``."""
    if isinstance(loader, torch.Tensor) or not isinstance(loader, Iterable):
        raise TypeError(f"train_labels is None, so train_images must be a DataLoader of (inputs, labels) pairs; "
                        f"got {type(loader).__name__}")
    require_reiterable(loader, "train_images")
    if not isinstance(loader, Sized) or len(loader) == 0:
        raise ValueError("train_images (a loader) must have a length >= 1 (a DataLoader over a sized dataset): "
                         "epochs are counted in passes over it")
    if batch_size is not None:
        raise ValueError(f"batch_size={batch_size} is set but train_images is a loader, which fixes the batch size: "
                         "leave batch_size=None")
    if val_labels is None and val_images is not None:
        require_reiterable(val_images, "val_images")
    return len(loader)


def _check_qat_args(n, n_labels, val_images, val_labels, epochs, batch_size, lr, momentum, weight_decay,
                    label_smoothing, warmup_fraction, evals) -> None:
    """Every argument check of ``train_qat``, before the model changes (``n is None``: a loader, checked apart)."""
    if n is not None and (n_labels != n or n == 0):
        raise ValueError(f"train_images ({n}) and train_labels ({n_labels}) must be non-empty and of equal length")
    check_number("epochs", epochs, 0, math.inf, low_open=True, high_open=True)
    if n is not None:
        check_int("batch_size", batch_size, 1, n)
    check_number("lr", lr, 0, math.inf, low_open=True, high_open=True)
    check_number("momentum", momentum, 0, 1, high_open=True)
    check_number("weight_decay", weight_decay, 0)
    check_number("label_smoothing", label_smoothing, 0, 1, high_open=True)
    check_number("warmup_fraction", warmup_fraction, 0, 1, high_open=True)
    check_int("evals", evals, 1)
    if val_labels is not None and val_images is None:
        raise ValueError("val_labels is given without val_images")
    if val_labels is None and isinstance(val_images, torch.Tensor):
        raise ValueError("give both val_images and val_labels, or a loader of (inputs, labels) pairs as val_images")


def set_feature_map_scales(model: nn.Module, fix_feature_map_scales: bool) -> dict[str, torch.Tensor]:
    """Put the calibrated model in VALIDATION (``CalibrationError`` if a scale is missing), fix or free the
    activation scales (weight scales always follow the weights) and return the starting activation scales."""
    qs = require_quantizers(model)
    model.eval()
    set_fake_quantize(model, FakeQuantState.VALIDATION)
    for fq in qs.values():
        if fq.kind == "weight" or not fix_feature_map_scales:
            fq.unfix_scale()
    if fix_feature_map_scales:
        fix_activation_scales(model)
    set_fake_quantize(model, FakeQuantState.VALIDATION)
    return activation_scales(model)


def default_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """Nesterov SGD with weight decay on the weights (``ndim > 1``) only."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=momentum, nesterov=momentum > 0)


def train_qat(model: nn.Module, train_images, train_labels: torch.Tensor | None = None,
              val_images=None, val_labels: torch.Tensor | None = None, *,
              fix_feature_map_scales: bool = True, epochs: float = 1.0, batch_size: int | None = None,
              lr: float = 0.005,
              momentum: float = 0.9, weight_decay: float = 5e-5, label_smoothing: float = 0.2,
              warmup_fraction: float = 0.05, augment: Callable | None = None, preprocess: Callable | None = None,
              loss_fn: Callable | None = None, optimizer: torch.optim.Optimizer | None = None, seed: int = 0,
              evals: int = 8, eval_batch_size: int = 500, checkpoint_path: str | Path | None = None,
              checkpoint_meta: dict | None = None, progress: bool = True) -> dict:
    """QAT of a prepared, calibrated ``model`` in place, in the one training loop (:func:`calibkit.loop.train_steps`).

    ``model``: from ``prepare``, calibrated (else ``CalibrationError``). ``train_images`` / ``train_labels``: ``[N, ...]``
    inputs and int64 ``[N]`` labels, drawn in batches of ``batch_size`` (None: 128) from a stream of permutations
    seeded by ``seed``; or ``train_labels=None`` and ``train_images`` a ``DataLoader`` (sized, re-iterable) of
    ``(inputs, labels)`` pairs, read pass after pass in its own order and batch size (``batch_size`` stays None; an
    epoch is one pass, ``len(loader)`` steps). ``augment(images, generator)`` changes each CPU batch,
    ``preprocess(batch)`` turns it into model input on the model's device (None: neither). ``val_images`` /
    ``val_labels``: model-ready data for the curve (tensors, or a loader of pairs with ``val_labels=None``; top-1),
    measured at the start and at ``evals`` (>= 1) evenly spread steps. ``fix_feature_map_scales``: activation
    scales fixed (True) or following their observers (False), see ``docs/methods.md#fixed-or-free-feature-map-scales``. ``epochs`` (> 0, fractions allowed)
    gives ``round(epochs * N / batch_size)`` steps (at least 1; ``batch_size`` in [1, N]); peak ``lr`` (> 0) after a
    linear warm-up over ``warmup_fraction`` (in [0, 1)) of them, then a cosine decay to 0. ``loss_fn(model, x, y) ->
    (loss, logits)`` (None: cross-entropy with ``label_smoothing`` in [0, 1)); ``optimizer`` (None:
    :func:`default_optimizer` with ``momentum`` in [0, 1) and ``weight_decay`` >= 0). ``checkpoint_path``: the model
    is saved there (:func:`calibkit.quant.io.save_prepared`) at every whole epoch and at the end, with
    ``checkpoint_meta`` and the history so far.

    Returns a history dict: ``step``, ``epoch``, ``lr``, ``train_loss`` per step; ``eval_step``, ``val_accuracy`` and
    ``act_scale_change`` (mean relative change of the activation scales since the start) per validation point;
    ``steps``, ``seconds`` (training only) and the settings. The model ends in eval mode, ``FakeQuantState.VALIDATION``.
    """
    if train_labels is None:
        n, per_pass = None, _check_loader_args(train_images, batch_size, val_images, val_labels)
    else:
        n, batch_size = len(train_images), 128 if batch_size is None else batch_size
    _check_qat_args(n, None if n is None else len(train_labels), val_images, val_labels, epochs, batch_size, lr,
                    momentum, weight_decay, label_smoothing, warmup_fraction, evals)
    steps = max(1, round(epochs * per_pass)) if n is None else max(1, round(epochs * n / batch_size))
    require_quantizers(model)
    if train_labels is not None:
        _check_label_tensor("train_labels", train_labels)
    if val_labels is not None:
        _check_label_tensor("val_labels", val_labels)
    settings = dict(fix_feature_map_scales=fix_feature_map_scales, epochs=epochs, batch_size=batch_size, lr=lr,
                    momentum=momentum, weight_decay=weight_decay, label_smoothing=label_smoothing,
                    warmup_fraction=warmup_fraction, augment=augment, preprocess=preprocess, loss_fn=loss_fn,
                    optimizer=optimizer, seed=seed, evals=evals, eval_batch_size=eval_batch_size,
                    checkpoint_path=checkpoint_path, checkpoint_meta=checkpoint_meta, progress=progress, steps=steps,
                    steps_per_epoch=per_pass if n is None else max(1, n // batch_size))
    with all_or_nothing(model):  # any failure (bad labels, a raising loss or batch, Ctrl-C) restores the model
        start_scales = set_feature_map_scales(model, fix_feature_map_scales)
        settings["classes"] = [_check_classes(model, train_images, train_labels, val_labels, preprocess)] \
            if loss_fn is None else []
        return _train(model, train_images, train_labels, val_images, val_labels, start_scales, settings)


def _check_label_tensor(name: str, labels) -> None:
    """``labels`` must be an integer tensor of class indices >= 0 (checked before the model changes)."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dim() != 1:
        raise TypeError(f"{name} must be a 1-d integer tensor of class indices, got "
                        f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"{name} holds {int(labels.min())}: labels must be class indices >= 0")


def _check_classes(model, train_images, train_labels, val_labels, preprocess) -> int:
    """One forward pass (VALIDATION, no observing) gives the number of classes; labels beyond it are refused
    before training starts (a loader's labels: batch by batch, as they come). Returns the number of classes."""
    if train_labels is None:
        x = batch_pair(next(iter(train_images)), 0, "train_images")[0][:1]
    else:
        x = train_images[:1]
    x = x.to(model_device(model))
    with torch.no_grad():
        classes = model(x if preprocess is None else preprocess(x)).shape[-1]
    for name, y in (("train_labels", train_labels), ("val_labels", val_labels)):
        if y is not None and y.numel() and int(y.max()) >= classes:
            raise ValueError(f"{name} hold values up to {int(y.max())} but the model has {classes} outputs: labels "
                             f"must be class indices in [0, {classes})")
    return classes


def _train(model, train_images, train_labels, val_images, val_labels, start_scales, a: dict) -> dict:
    """The body of :func:`train_qat` once the model is set up (``a``: its keyword settings)."""
    loader = train_labels is None
    n = (len(getattr(train_images, "dataset", ())) or None) if loader else len(train_images)
    epochs, batch_size, lr, label_smoothing = a["epochs"], a["batch_size"], a["lr"], a["label_smoothing"]
    momentum, weight_decay, warmup_fraction, seed = a["momentum"], a["weight_decay"], a["warmup_fraction"], a["seed"]
    fix_feature_map_scales, evals, checkpoint_path = a["fix_feature_map_scales"], a["evals"], a["checkpoint_path"]
    steps, per_epoch = a["steps"], a["steps_per_epoch"]
    hist = {k: [] for k in ("step", "epoch", "lr", "train_loss", "eval_step", "val_accuracy", "act_scale_change")}
    hist.update(fix_feature_map_scales=bool(fix_feature_map_scales), steps=steps, epochs=float(epochs),
                batch_size=getattr(train_images, "batch_size", None) if loader else batch_size, lr_peak=lr,
                momentum=momentum, weight_decay=weight_decay,
                label_smoothing=label_smoothing, warmup_fraction=warmup_fraction, seed=seed, train_images=n)

    def validate(step):
        if val_images is not None:
            hist["eval_step"].append(step)
            hist["val_accuracy"].append(float(evaluate(model, val_images, val_labels, a["eval_batch_size"],
                                                       progress=False)))
            hist["act_scale_change"].append(_mean_rel_change(activation_scales(model), start_scales))

    def save(step):
        if checkpoint_path is not None:
            save_prepared(checkpoint_path, model, {**(a["checkpoint_meta"] or {}), "qat_step": step, "qat_history": dict(hist)})

    def ce_loss(model, x, y):
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing), logits

    gen = torch.Generator().manual_seed(int(seed))
    if loader:
        batches = _loader_batches(train_images, steps, gen, model_device(model), a["augment"], a["preprocess"],
                                  a["classes"])
    else:
        batches = _sampled_batches(train_images, train_labels, steps, batch_size, gen, model_device(model),
                                   a["augment"], a["preprocess"])
    optimizer = a["optimizer"] or default_optimizer(model, lr, momentum, weight_decay)
    warmup = round(warmup_fraction * steps)
    loop = train_steps(model, batches, a["loss_fn"] or ce_loss, optimizer,
                       lambda i: lr_multiplier(i, steps, warmup, decay="cosine"), steps,
                       f"QAT ({'fixed' if fix_feature_map_scales else 'free'} feature-map scales)", a["progress"])
    epoch_of = (lambda i: i / per_epoch) if loader else (lambda i: i * batch_size / n)
    _qat_run(model, loop, hist, validate, save, epoch_of, steps, per_epoch, evals)
    return hist


def _qat_run(model, loop, hist: dict, validate, save, epoch_of, steps: int, steps_per_epoch: int, evals: int) -> None:
    """Run ``loop`` in the QAT state, recording every step (``epoch_of(step)``: its epoch); validate (VALIDATION
    state) at ``evals`` evenly spread steps, save at every whole epoch and at the end. The model ends in eval mode,
    VALIDATION."""
    eval_at = sorted({max(1, round(steps * (i + 1) / evals)) for i in range(evals)})
    hist["seconds"] = 0.0

    def pause(step):
        model.eval()
        set_fake_quantize(model, FakeQuantState.VALIDATION)
        if step in eval_at or step == 0:
            validate(step)
        if step and (step % steps_per_epoch == 0 or step == steps):
            save(step)

    pause(0)
    model.train()
    set_fake_quantize(model, FakeQuantState.QAT)
    for s in loop:
        hist["seconds"] += s.seconds
        hist["step"].append(s.index)
        hist["epoch"].append(epoch_of(s.index))
        hist["lr"].append(s.lr)
        hist["train_loss"].append(s.loss.item())
        if s.index in eval_at or s.index % steps_per_epoch == 0 or s.index == steps:
            pause(s.index)
            model.train()
            set_fake_quantize(model, FakeQuantState.QAT)
    model.eval()
    set_fake_quantize(model, FakeQuantState.VALIDATION)


# -- recommendation -----------------------------------------------------------------------------------------
#: Default share of the float model's above-chance accuracy that calibration may lose before the
#: recommendation switches from fixed to free feature-map scales (see :func:`recommend_fixed_scales`).
DEFAULT_GAP_THRESHOLD = 0.05


class Recommendation(NamedTuple):
    """``choice``: ``"fixed"`` or ``"free"`` feature-map scales; ``reason``: one sentence with the numbers."""

    choice: str
    reason: str


def _check_accuracy(name: str, v) -> float:
    return check_number(name, v, 0, 1, why=" (an accuracy is a fraction)")


def relative_gap(calibrated_accuracy: float, float_accuracy: float, chance_accuracy: float = 0.0) -> float:
    """Share of the float model's above-chance accuracy lost by calibration:
    ``(float - calibrated) / (float - chance)`` (negative when calibration beats float)."""
    c = _check_accuracy("calibrated_accuracy", calibrated_accuracy)
    f = _check_accuracy("float_accuracy", float_accuracy)
    ch = _check_accuracy("chance_accuracy", chance_accuracy)
    if f <= ch:
        raise ValueError(f"float_accuracy={f} is not above chance_accuracy={ch}: the float model must beat chance "
                         "for a QAT recommendation to mean anything")
    return (f - c) / (f - ch)


def recommend_fixed_scales(calibrated_accuracy: float, float_accuracy: float, chance_accuracy: float = 0.0,
                           threshold: float = DEFAULT_GAP_THRESHOLD) -> Recommendation:
    """Which QAT setting to try first for a model with these accuracies (fractions in [0, 1]).

    Rule: ``gap = relative_gap(calibrated, float, chance)``. If ``gap <= threshold`` (default 5 % of
    the above-chance accuracy), the calibrated scales are already good: **fix** them, so QAT only has to
    adapt the weights to a stable grid. Otherwise the calibrated ranges are part of the problem: leave
    the feature-map scales **free** so the observers can move them while the weights adapt.
    ``threshold`` in [0, 1). The spec notes there is no universal threshold: run both when you can.
    """
    check_number("threshold", threshold, 0, 1, high_open=True)
    gap = relative_gap(calibrated_accuracy, float_accuracy, chance_accuracy)
    pts = 100 * (float_accuracy - calibrated_accuracy)
    if gap <= threshold:
        return Recommendation("fixed", f"calibration keeps all but {100 * max(gap, 0):.1f} % of the float model's "
                              f"above-chance accuracy ({pts:.2f} points below float, threshold "
                              f"{100 * threshold:.0f} %): "
                              "the scales are already good, fix them and let QAT adapt the weights")
    return Recommendation("free", f"calibration loses {100 * gap:.1f} % of the float model's above-chance accuracy "
                          f"({pts:.2f} points, threshold {100 * threshold:.0f} %): the calibrated ranges are part "
                          "of the problem, let the feature-map scales keep updating during QAT")


def measured_choice(fixed_accuracy: float, free_accuracy: float, tie: float = 0.002) -> str:
    """``"fixed"``, ``"free"`` or ``"tie"`` (difference within ``tie``, a fraction, default 0.2 points)
    from two measured QAT accuracies."""
    a = _check_accuracy("fixed_accuracy", fixed_accuracy)
    b = _check_accuracy("free_accuracy", free_accuracy)
    check_number("tie", tie, 0, 1, high_open=True)
    if abs(a - b) <= tie:
        return "tie"
    return "fixed" if a > b else "free"
