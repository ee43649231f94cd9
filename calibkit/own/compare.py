"""Every calibration method on one model and the same calibration batches: accuracy, time and worst ops
(``docs/methods.md#method-ranking``).

For each method ``m``: ``prepare(model, get_default_qconfig(activation_observer=m, weight_observer="min_max"))``
(activations per tensor with ``m``, weights per output channel with min/max), ``calibrate`` on the *same*
list of batches (timed: forward passes plus the final scale computation), VALIDATION, streaming ``evaluate`` on
the evaluation loader (top-1 / top-5), and :func:`calibkit.analysis.report.debug_report` on the calibration
batches for the ``worst_k`` quantizers by isolated SQNR (``docs/methods.md#per-op-error``). Every method is
prepared before anything runs, so a model ``prepare`` cannot take fails before any calibration.

``drop_points = 100 * (float top-1 - method top-1)``: accuracy lost to quantization, in percentage points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from calibkit.analysis.report import debug_report
from calibkit.checks import check_int
from calibkit.devices import model_device
from calibkit.quant.calibrate import calibrate, evaluate
from calibkit.quant.fake_quantize import FakeQuantState, set_fake_quantize
from calibkit.quant.observers import CALIBRATION_METHODS, get_observer_class
from calibkit.quant.prepare import prepare
from calibkit.quant.qconfig import QConfig, get_default_qconfig

__all__ = ["METHODS", "MethodResult", "Comparison", "check_methods", "method_qconfig", "compare"]

#: The five calibration methods (docs/methods.md#calibration-methods), the order of every table.
METHODS = CALIBRATION_METHODS
WORST_KEYS = ("name", "kind", "isolated_sqnr_db", "accumulated_sqnr_db", "clip_ratio")


def check_methods(methods: str | Sequence[str]) -> list[str]:
    """``"all"`` or names (a list or ``"mse,kl"``) as a list of known, distinct observer names."""
    if isinstance(methods, str):
        methods = list(METHODS) if methods == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(methods)
    if not methods:
        raise ValueError(f"methods is empty: use 'all' or some of {list(METHODS)}")
    for m in methods:
        get_observer_class(m)  # ValueError naming the unknown method and the known ones
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods={methods} names a method twice")
    return methods


def method_qconfig(method: str, activation_bits: int = 8, weight_bits: int = 8) -> QConfig:
    """The qconfig a method is compared with: ``method`` on activations, min/max per channel on weights."""
    return get_default_qconfig(activation_observer=method, weight_observer="min_max",
                               activation_bits=activation_bits, weight_bits=weight_bits)


@dataclass
class MethodResult:
    """One method's row: top-1 / top-5 (fractions), ``calibration_seconds``, ``drop_points`` (top-1 lost, in
    points) and ``worst_ops`` (the worst quantizers' rows, worst first); ``prepared``: its calibrated model in
    VALIDATION (kept only when asked)."""

    method: str
    top1: float
    top5: float
    calibration_seconds: float
    drop_points: float
    worst_ops: list[dict]
    prepared: nn.Module | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "calibration_seconds": self.calibration_seconds,
                "drop_points": self.drop_points, "worst_ops": self.worst_ops}


@dataclass
class Comparison:
    """What :func:`compare` returns; :meth:`as_dict` is the shape of ``report.json``."""

    float_top1: float
    float_top5: float
    eval_images: int
    calib_images: int
    methods: dict[str, MethodResult]
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"float": {"top1": self.float_top1, "top5": self.float_top5},
                "methods": {m: r.as_dict() for m, r in self.methods.items()},
                "eval_images": self.eval_images, "calib_images": self.calib_images, "settings": dict(self.settings)}

    def rows(self) -> list[dict]:
        """One flat row per method (accuracies in %), in the compared order."""
        return [{"method": m, "top1_%": 100 * r.top1, "top5_%": 100 * r.top5, "drop_points": r.drop_points,
                 "calibration_seconds": r.calibration_seconds} for m, r in self.methods.items()]

    def best(self) -> str:
        """The method with the highest top-1 (the faster one on a tie)."""
        return min(self.methods.values(), key=lambda r: (-r.top1, r.calibration_seconds)).method


def _worst_rows(prepared: nn.Module, batches: list, k: int, progress: bool) -> list[dict]:
    """The ``k`` worst quantizers by isolated SQNR (non-finite SQNRs, exact quantizers, as ``None``)."""
    return debug_report(prepared, batches, progress=progress).to_json_rows(k, WORST_KEYS)


def compare(model: nn.Module, calib: Sequence[torch.Tensor], eval_loader: Iterable,
            methods: str | Sequence[str] = "all", activation_bits: int = 8, weight_bits: int = 8,
            overrides: Mapping | None = None, worst_k: int = 5, report_batches: int = 2, keep_models: bool = False,
            progress: bool = True) -> Comparison:
    """Compare ``methods`` on ``model`` (float, eval mode, not modified; see the module docstring).

    Args:
        calib: the calibration batches (a list of normalized float ``[B, C, H, W]`` tensors), the same for all.
        eval_loader: an iterable of ``(images, labels)`` batches (e.g. a ``DataLoader``), evaluated streaming.
        overrides: per-op settings passed to every ``prepare`` (e.g. a layer kept in float).
        worst_k: worst quantizers kept per method; report_batches: calibration batches the report runs on.
        keep_models: keep each calibrated model in its :class:`MethodResult` (memory: one copy per method).
    """
    methods = check_methods(methods)
    check_int("worst_k", worst_k, 1)
    check_int("report_batches", report_batches, 1)
    calib = list(calib)
    if not calib:
        raise ValueError("calib is empty: give at least one calibration batch")
    example = (calib[0][:1].to(model_device(model)),)
    prepared = {m: prepare(model, method_qconfig(m, activation_bits, weight_bits), example, overrides=overrides)
                for m in methods}
    ref = evaluate(model, eval_loader, progress=progress)
    results = {}
    for m in tqdm(methods, desc="methods", disable=not progress):
        p = prepared.pop(m)
        seconds = calibrate(p, calib, progress=progress)
        set_fake_quantize(p, FakeQuantState.VALIDATION)
        ev = evaluate(p, eval_loader, progress=progress)
        worst = _worst_rows(p, calib[:report_batches], worst_k, progress)
        results[m] = MethodResult(m, ev.top1, ev.top5, seconds, 100.0 * (ref.top1 - ev.top1), worst,
                                  p if keep_models else None)
    settings = {"activation_bits": activation_bits, "weight_bits": weight_bits, "weight_observer": "min_max",
                "weights": "per-channel", "worst_by": "isolated_sqnr_db", "report_batches": min(report_batches, len(calib))}
    return Comparison(ref.top1, ref.top5, ref.count, sum(int(b.shape[0]) for b in calib), results, settings)
