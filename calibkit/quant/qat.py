"""Quantization-aware training (QAT) from a calibrated model (spec sections 1.7 and 6).

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

Schedule: Nesterov SGD, linear warm-up over ``warmup_fraction`` of the steps then cosine decay to 0,
label smoothing, weight decay on weights (ndim > 1) only, random flips / translations
(``calibkit.cifar.train.augment``). Data order and augmentation come from one generator seeded by
``seed``: the same seed and budget give the same run.

:func:`recommend_fixed_scales` turns the spec's observation (fixing helps when calibration is
already close to float, hurts when it is poor) into a rule with a stated threshold.

Checkpoints of prepared models: :mod:`calibkit.quant.io`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from calibkit.quant.calibrate import evaluate, model_device
from calibkit.quant.io import save_prepared
from calibkit.quant.fake_quantize import FakeQuantState, _require_quantizers, fix_activation_scales, set_fake_quantize

__all__ = ["train_qat", "qat_lr_multiplier", "activation_scales", "weight_scales", "Recommendation", "recommend_fixed_scales", "relative_gap", "measured_choice", "DEFAULT_GAP_THRESHOLD"]

# -- scales ---------------------------------------------------------------------------------------------
def activation_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """Current scale of every activation quantizer (clones)."""
    return {n: fq.scale.detach().clone() for n, fq in _require_quantizers(model).items() if fq.kind != "weight"}


def weight_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """Current scale of every weight quantizer (clones)."""
    return {n: fq.scale.detach().clone() for n, fq in _require_quantizers(model).items() if fq.kind == "weight"}


def _mean_rel_change(now: dict, start: dict) -> float:
    vals = [float(((now[n] - start[n]).abs() / start[n]).mean()) for n in start]
    return sum(vals) / max(1, len(vals))


# -- training ----------------------------------------------------------------------------------------------
def qat_lr_multiplier(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR factor at optimizer step ``step`` (0-based): linear warm-up to 1 over ``warmup_steps``, then
    cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _check(name, value, ok: bool, allowed: str):
    if isinstance(value, bool) or not ok:
        raise ValueError(f"{name}={value!r} is out of range: use {allowed}")


def train_qat(model: nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor,
              val_images: torch.Tensor | None = None, val_labels: torch.Tensor | None = None, *,
              fix_feature_map_scales: bool = True, epochs: float = 1.0, batch_size: int = 128, lr: float = 0.005,
              momentum: float = 0.9, weight_decay: float = 5e-5, label_smoothing: float = 0.2,
              warmup_fraction: float = 0.05, flip: bool = True, translate: int = 2, seed: int = 0, evals: int = 8,
              eval_batch_size: int = 500, checkpoint_path: str | Path | None = None,
              checkpoint_meta: dict | None = None, progress: bool = True) -> dict:
    """QAT of a prepared, calibrated ``model`` in place (see the module docstring).

    Args:
        model: output of ``prepare``, calibrated (every quantizer has a scale; else ``CalibrationError``).
        train_images, train_labels: uint8 ``[N, 3, H, W]`` images (augmented, then normalized with
            ``calibkit.cifar.data.normalize``) or float ``[N, ...]`` already-normalized inputs (augmented only),
            and int64 labels ``[N]``.
        val_images, val_labels: normalized float validation data for the curve (optional).
        fix_feature_map_scales: fix activation scales (True) or let activation observers update (False).
        epochs: passes over the training data (> 0, fractions allowed); steps = round(epochs * N / batch_size),
            at least 1. batch_size: in [1, N]. lr: peak learning rate (> 0).
        momentum: Nesterov momentum in [0, 1). weight_decay: >= 0 (weights only). label_smoothing: [0, 1).
        warmup_fraction: share of steps with linear warm-up, in [0, 1).
        flip, translate: augmentation (``calibkit.cifar.train.augment``). seed: data order + augmentation.
        evals: validation points along the run besides the start (>= 1; needs val data).
        checkpoint_path: if given, the prepared model is saved there (:func:`save_prepared`, atomic) at
            every whole epoch and at the end, with ``checkpoint_meta`` plus the history so far.
        progress: tqdm bar over the steps.

    Returns a history dict: ``step``, ``epoch``, ``lr``, ``train_loss`` per step; ``eval_step``,
    ``val_accuracy`` and ``act_scale_change`` (mean relative change of the activation scales since the
    start) at the start and at each validation point; ``steps``, ``seconds`` (training only),
    ``fix_feature_map_scales`` and the settings. The model ends in eval mode, ``FakeQuantState.VALIDATION``.
    """
    from calibkit.cifar.data import normalize
    from calibkit.cifar.train import augment

    n = len(train_images)
    if len(train_labels) != n or n == 0:
        raise ValueError(f"train_images ({n}) and train_labels ({len(train_labels)}) must be non-empty and of "
                         "equal length")
    _check("epochs", epochs, isinstance(epochs, (int, float)) and epochs > 0 and math.isfinite(epochs), "a number > 0")
    _check("batch_size", batch_size, isinstance(batch_size, int) and 1 <= batch_size <= n, f"an integer in [1, {n}]")
    _check("lr", lr, isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr), "a number > 0")
    _check("momentum", momentum, isinstance(momentum, (int, float)) and 0 <= momentum < 1, "a number in [0, 1)")
    _check("weight_decay", weight_decay, isinstance(weight_decay, (int, float)) and weight_decay >= 0, "a number >= 0")
    _check("label_smoothing", label_smoothing, isinstance(label_smoothing, (int, float)) and 0 <= label_smoothing < 1,
           "a number in [0, 1)")
    _check("warmup_fraction", warmup_fraction, isinstance(warmup_fraction, (int, float)) and 0 <= warmup_fraction < 1,
           "a number in [0, 1)")
    _check("evals", evals, isinstance(evals, int) and evals >= 1, "an integer >= 1")
    if (val_images is None) != (val_labels is None):
        raise ValueError("give both val_images and val_labels, or neither")

    qs = _require_quantizers(model)
    device = model_device(model)
    model.eval()
    set_fake_quantize(model, FakeQuantState.VALIDATION)  # CalibrationError if a quantizer has no scale
    for fq in qs.values():
        if fq.kind == "weight" or not fix_feature_map_scales:
            fq.unfix_scale()
    if fix_feature_map_scales:
        fix_activation_scales(model)
    set_fake_quantize(model, FakeQuantState.VALIDATION)
    start_scales = activation_scales(model)

    steps = max(1, round(epochs * n / batch_size))
    steps_per_epoch = max(1, n // batch_size)
    warmup = round(warmup_fraction * steps)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=momentum, nesterov=momentum > 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: qat_lr_multiplier(s, steps, warmup))
    gen = torch.Generator().manual_seed(int(seed))
    eval_at = sorted({max(1, round(steps * (i + 1) / evals)) for i in range(evals)})

    hist = {k: [] for k in ("step", "epoch", "lr", "train_loss", "eval_step", "val_accuracy", "act_scale_change")}
    hist.update(fix_feature_map_scales=bool(fix_feature_map_scales), steps=steps, epochs=float(epochs),
                batch_size=batch_size, lr_peak=lr, momentum=momentum, weight_decay=weight_decay,
                label_smoothing=label_smoothing, warmup_fraction=warmup_fraction, seed=seed, train_images=n)

    def validate(step):
        model.eval()
        set_fake_quantize(model, FakeQuantState.VALIDATION)
        if val_images is not None:
            hist["eval_step"].append(step)
            hist["val_accuracy"].append(evaluate(model, val_images, val_labels, eval_batch_size, progress=False))
            hist["act_scale_change"].append(_mean_rel_change(activation_scales(model), start_scales))

    def save(step):
        if checkpoint_path is not None:
            model.eval()
            set_fake_quantize(model, FakeQuantState.VALIDATION)
            meta = dict(checkpoint_meta or {})
            meta.update(qat_step=step, qat_history={k: v for k, v in hist.items()})
            save_prepared(checkpoint_path, model, meta)

    validate(0)
    model.train()
    set_fake_quantize(model, FakeQuantState.QAT)
    order = torch.empty(0, dtype=torch.int64)
    seconds = 0.0
    bar = tqdm(total=steps, desc=f"QAT ({'fixed' if fix_feature_map_scales else 'free'} feature-map scales)",
               disable=not progress)
    for step in range(steps):
        t0 = time.perf_counter()
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        xb = train_images[idx]
        if flip or translate:
            xb = augment(xb, gen, flip=flip, translate=translate)
        xb = xb.to(device)
        x = normalize(xb) if xb.dtype == torch.uint8 else xb
        yb = train_labels[idx].to(device)
        loss = F.cross_entropy(model(x), yb, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist["lr"].append(opt.param_groups[0]["lr"])
        sched.step()
        seconds += time.perf_counter() - t0
        hist["step"].append(step + 1)
        hist["epoch"].append((step + 1) * batch_size / n)
        hist["train_loss"].append(loss.item())
        bar.update(1)
        if progress and (step + 1) % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if done in eval_at or done % steps_per_epoch == 0 or done == steps:
            if done in eval_at:
                validate(done)
            if done % steps_per_epoch == 0 or done == steps:
                hist["seconds"] = seconds
                save(done)
            model.train()
            set_fake_quantize(model, FakeQuantState.QAT)
    bar.close()
    model.eval()
    set_fake_quantize(model, FakeQuantState.VALIDATION)
    hist["seconds"] = seconds
    return hist


# -- recommendation -----------------------------------------------------------------------------------------
#: Default share of the float model's above-chance accuracy that calibration may lose before the
#: recommendation switches from fixed to free feature-map scales (see :func:`recommend_fixed_scales`).
DEFAULT_GAP_THRESHOLD = 0.05


class Recommendation(NamedTuple):
    """``choice``: ``"fixed"`` or ``"free"`` feature-map scales; ``reason``: one sentence with the numbers."""

    choice: str
    reason: str


def _check_accuracy(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= float(v) <= 1.0):
        raise ValueError(f"{name}={v!r} is out of range: use an accuracy as a fraction in [0, 1]")
    return float(v)


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
    _check("threshold", threshold, isinstance(threshold, (int, float)) and 0 <= threshold < 1, "a number in [0, 1)")
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
    _check("tie", tie, isinstance(tie, (int, float)) and 0 <= tie < 1, "a number in [0, 1)")
    if abs(a - b) <= tie:
        return "tie"
    return "fixed" if a > b else "free"
