"""The measurements behind notebooks 02 (calibration workflow) and 04 (method comparison).

Everything here is a plain function over a float model, calibration batches and a labelled
validation set (normalized float ``[N, 3, H, W]`` images, int64 ``[N]`` labels); accuracies are
fractions in [0, 1], times are wall-clock seconds. Rows are lists of flat dicts, ready for
:func:`save_rows` (CSV + JSON) and :class:`calibkit.analysis.report.Table`.

Notebook 02 -- the ``min_max`` first pass (spec section 5):

* :func:`calibrate_and_evaluate`: prepare -> calibrate -> VALIDATION -> accuracy, in one call.
* :func:`quantizer_table`: one row per quantizer of a prepared model (observer, bits, state, scale).
* :class:`MinMaxTrace`: records the per-batch min / max of every activation quantizer once, then
  replays ``min_max`` calibration for any averaging constant and any number of leading steps *bit for
  bit* (same float32 operations as the observer), so a sweep costs one forward pass per batch size.
* :func:`sweep_min_max` / :func:`steps_curve` / :func:`choose_min_max`: accuracy over batch size x
  averaging constant x steps, accuracy against the number of calibration steps, and the choice.

Notebook 04 -- reproducing the spec's method table (section 4):

* :func:`compare_methods`: every method x quantization setting x calibration seed, accuracy and
  calibration time on identical batches, in one run.
* :func:`ease_of_use`: accuracy over each method's documented parameter grid (:data:`EASE_GRIDS`);
  :func:`ease_ranges` reduces it to the *ease-of-use range* (max - min accuracy over the grid).
* :func:`method_summary`, :func:`rank`, :func:`spearman`, :func:`rank_comparison`,
  :func:`disagreements`: the ranks next to the spec's (:data:`SPEC_RANKS`), agreement, and the
  differences that are within seed-to-seed noise.
* :func:`tune_percentile`: the alternating percentile / bins search of spec section 4 on any
  ``evaluate_fn(percentile, bins) -> accuracy``; :func:`percentile_evaluator` builds a fast one
  from :class:`calibkit.analysis.activation_stats.ActivationStats` (no re-calibration per point), and
  :func:`exclude_subset` gives the validation images the search never saw.
* :func:`save_rows` / :func:`save_json`: tables as CSV + JSON, metrics as JSON (non-finite -> null).

Definitions (also printed by the notebooks):

* **speed**: median calibration wall time (``calibkit.quant.calibrate.calibrate``: forward passes plus the
  final scale computation) over every (setting, seed, repeat) run of a method; every method sees the
  same batches in each run, and the method order is rotated from run to run so that none is always
  first.
* **accuracy**: validation accuracy after calibration, averaged over settings and seeds.
* **ease of use**: ``max - min`` validation accuracy over the method's grid in :data:`EASE_GRIDS`,
  at one setting (smaller = the parameter choice matters less = easier).
* **noise**: per method, the seed-to-seed spread -- speed and accuracy: ``max - min`` over seeds (and
  timing repeats) at a fixed setting, averaged over the settings; ease: the accuracy spread over seeds
  at the ease setting. Two methods whose values differ by no more than the larger of their two
  spreads are *within noise* of each other (with one seed the spread is 0: noise not estimated).
* **ranks**: 1 = best; ties share the average of their positions (``method="average"``, what
  Spearman's coefficient needs) or the smallest (``"min"``, competition ranking as in the spec's
  accuracy column); ``"dense"`` (the spec's ease column: 1, 1, 2, 3, 4) is also available.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from calibkit.quant.calibrate import calibrate, evaluate, model_device
from calibkit.cifar.data import ImageTensors, calibration_batches
from calibkit.errors import CalibrationError
from calibkit.quant.fake_quantize import FakeQuantState, named_quantizers, set_fake_quantize
from calibkit.quant.observers import check_averaging_constant, check_percentile
from calibkit.quant.prepare import prepare
from calibkit.quant.qconfig import QConfig, get_default_qconfig
from calibkit.quant.numerics import check_bits, scale_from_amax

__all__ = [
    "METHODS", "QuantSetting", "SETTINGS", "EASE_GRIDS", "SPEC_RANKS", "COLUMNS",
    "calibrate_and_evaluate", "quantizer_table", "MinMaxTrace", "sweep_min_max", "steps_curve", "choose_min_max",
    "calibration_sets", "compare_methods", "ease_of_use", "ease_ranges", "method_summary", "rank", "spearman",
    "rank_comparison", "agreement", "disagreements", "describe_disagreement", "tune_percentile",
    "percentile_evaluator", "exclude_subset", "save_rows", "save_json",
]

#: The five calibration methods of spec section 3, in the spec's table order.
METHODS = ("min_max", "percentile", "mse", "kl", "mix")


# ----------------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class QuantSetting:
    """One quantization setting: activation / weight bit widths and weight granularity.

    Activations are always per tensor with the method under test; weights use ``min_max`` (the
    spec's recommended weight observer), per output channel or per tensor.
    """

    name: str
    activation_bits: int = 8
    weight_bits: int = 8
    per_channel_weights: bool = True

    def __post_init__(self):
        check_bits(self.activation_bits, "activation_bits")
        check_bits(self.weight_bits, "weight_bits")

    def qconfig(self, method: str = "min_max", **activation_kwargs) -> QConfig:
        """The qconfig for ``method`` on activations (``activation_kwargs`` go to its observer)."""
        return get_default_qconfig(activation_observer=method, weight_observer="min_max",
                                   activation_kwargs=activation_kwargs,
                                   weight_kwargs=None if self.per_channel_weights else {"ch_axis": None},
                                   activation_bits=self.activation_bits, weight_bits=self.weight_bits)

    def describe(self) -> str:
        w = "per-channel" if self.per_channel_weights else "per-tensor"
        return f"{self.activation_bits}-bit activations, {self.weight_bits}-bit {w} weights"


#: The settings notebook 04 compares the methods on: int8 with per-channel and per-tensor weights,
#: then 6- and 4-bit activations (8-bit per-channel weights), where the methods separate.
SETTINGS = (
    QuantSetting("a8/w8-ch", 8, 8, True),
    QuantSetting("a8/w8-tensor", 8, 8, False),
    QuantSetting("a6/w8-ch", 6, 8, True),
    QuantSetting("a4/w8-ch", 4, 8, True),
)

#: Each method's "reasonable parameter range" for the ease-of-use column. The grids span each knob
#: from the spec's default to the edge of what the spec recommends: the averaging constant from
#: 0.01 (many steps) to 0.5 (very few steps); percentile from 3 to 6 nines (the slider range) at the
#: default and 4x the default bins; mse stride from 1 (default) to 10 (coarser stops being a search);
#: kl bins default and 2x, update interval 1 (default) and 4. mix has no tuning knob: only its
#: averaging constant varies.
EASE_GRIDS: dict[str, list[dict]] = {
    "min_max": [{"averaging_constant": c} for c in (0.01, 0.1, 0.5)],
    "percentile": [{"percentile": p, "bins": b} for p in (99.9, 99.99, 99.999, 99.9999) for b in (2048, 8192)],
    "mse": [{"stride": s} for s in (1, 2, 5, 10)],
    "kl": [{"bins": b, "update_interval": u} for b in (2048, 4096) for u in (1, 4)],
    "mix": [{"averaging_constant": c} for c in (0.01, 0.1, 0.5)],
}

#: The method ranking of spec section 4 (1 = best), per column.
SPEC_RANKS: dict[str, dict[str, int]] = {
    "speed": {"min_max": 1, "percentile": 2, "mix": 3, "mse": 4, "kl": 5},
    "accuracy": {"mse": 1, "kl": 2, "mix": 2, "percentile": 4, "min_max": 5},
    "ease": {"min_max": 1, "mix": 1, "mse": 2, "kl": 3, "percentile": 4},
}
#: Column -> (summary key of the measured value, lower is better).
COLUMNS = {"speed": ("speed_seconds", True), "accuracy": ("accuracy", False), "ease": ("ease_range", True)}


# ----------------------------------------------------------------------------------------------------
# notebook 02: one calibration, the quantizer table, the min_max sweep


def _example_inputs(example_inputs, calib) -> tuple:
    if example_inputs is not None:
        return example_inputs
    first = calib[0]
    first = first[0] if isinstance(first, (tuple, list)) else first
    return (first[:2],)


def _check_batches(calib) -> list:
    calib = list(calib)
    if not calib:
        raise CalibrationError("calib is empty: calibration needs at least one batch")
    return calib


def calibrate_and_evaluate(model: nn.Module, qconfig: QConfig, calib: Sequence[torch.Tensor], val_images: torch.Tensor,
                           val_labels: torch.Tensor, example_inputs=None, overrides: Mapping | None = None,
                           eval_batch_size: int = 500, progress: bool = False) -> dict:
    """Prepare a copy of ``model`` with ``qconfig``, calibrate it on ``calib`` and measure accuracy.

    Args:
        model: float model in eval mode (not modified: ``prepare`` works on a copy).
        qconfig / overrides: as for :func:`calibkit.quant.prepare.prepare`.
        calib: calibration batches (normalized float ``[B, 3, H, W]`` tensors).
        val_images / val_labels: validation set (normalized float ``[N, ...]`` / int64 ``[N]``).
        example_inputs: for tracing (default: the first two images of ``calib[0]``).
    Returns ``{"accuracy": float in [0, 1], "calib_seconds": float, "prepared": the model in VALIDATION}``.
    """
    calib = _check_batches(calib)
    prepared = prepare(model, qconfig, _example_inputs(example_inputs, calib), overrides=overrides)
    seconds = calibrate(prepared, calib, progress=progress)
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    acc = evaluate(prepared, val_images, val_labels, eval_batch_size, progress=progress)
    return {"accuracy": acc, "calib_seconds": seconds, "prepared": prepared}


def quantizer_table(prepared: nn.Module) -> list[dict]:
    """One row per quantizer of a prepared model, in execution order.

    Columns: ``name``, ``kind`` (activation / weight), ``observer`` (name), ``bits``, ``granularity``
    (``"per-tensor"`` or ``"per-channel(axis k)"``), ``state`` (last ``FakeQuantState`` set, or ``None``),
    ``observing`` / ``fake_quant`` (current flags), ``steps`` (batches observed), ``scale`` and ``amax``
    (largest over channels; ``None`` until the scale is computed, i.e. before VALIDATION).
    """
    rows = []
    for name, fq in named_quantizers(prepared).items():
        obs = fq.observer
        ready = bool(torch.isfinite(fq.scale).all()) and bool((fq.scale > 0).all())
        qmin_qmax = (2 ** fq.bits - 1) / 2
        rows.append({
            "name": name, "kind": fq.kind, "observer": obs.name or type(obs).__name__, "bits": fq.bits,
            "granularity": "per-tensor" if fq.ch_axis is None else f"per-channel(axis {fq.ch_axis})",
            "state": fq.state.name if fq.state is not None else None, "observing": fq.observing,
            "fake_quant": fq.fake_quantizing, "steps": int(obs.steps),
            "scale": float(fq.scale.max()) if ready else None,
            "amax": float(fq.scale.max()) * qmin_qmax if ready else None,
        })
    return rows


class MinMaxTrace:
    """Per-batch min / max of every activation quantizer, recorded once; ``min_max`` replayed from it.

    :meth:`record` runs the batches through a ``min_max``-prepared copy of the model once (float
    computation, as in CALIBRATION) and keeps, per activation quantizer, the float32 batch min and
    max (``mins[name]``, ``maxs[name]``: ``[B]``) and, per batch, the forward wall time
    (``batch_seconds``). Weight quantizers are calibrated by the same pass (weights are constant,
    so the averaging constant does not matter for them).

    :meth:`amax` reproduces ``MinMaxObserver(averaging_constant=c)`` after the first ``steps``
    batches bit for bit (the first batch sets min and max, then ``v <- v + c * (v_batch - v)`` in
    float32, ``amax = max(|min|, |max|)``); :meth:`apply` loads those scales (``bits`` may differ
    from the recording) so the model can be evaluated in VALIDATION without re-running calibration.
    """

    def __init__(self, prepared: nn.Module, mins: dict[str, torch.Tensor], maxs: dict[str, torch.Tensor],
                 batch_seconds: list[float], batch_size: int):
        self.prepared, self.mins, self.maxs = prepared, mins, maxs
        self.batch_seconds, self.batch_size = list(batch_seconds), batch_size
        self.num_batches = len(self.batch_seconds)

    @classmethod
    @torch.no_grad()
    def record(cls, model: nn.Module, batches: Sequence[torch.Tensor], activation_bits: int = 8, weight_bits: int = 8,
               per_channel_weights: bool = True, example_inputs=None, progress: bool = False) -> "MinMaxTrace":
        """Record the trace of ``batches`` (list of normalized float tensors) on a prepared copy of ``model``."""
        batches = _check_batches(batches)
        setting = QuantSetting("trace", activation_bits, weight_bits, per_channel_weights)
        prepared = prepare(model, setting.qconfig("min_max"), _example_inputs(example_inputs, batches))
        acts = {n: q for n, q in named_quantizers(prepared).items() if q.kind != "weight"}
        mins = {n: [] for n in acts}
        maxs = {n: [] for n in acts}

        def hook(name):
            def pre(module, args):
                lo, hi = torch.aminmax(args[0].detach().to(torch.float32))
                mins[name].append(lo.cpu())
                maxs[name].append(hi.cpu())
            return pre

        handles = [q.register_forward_pre_hook(hook(n)) for n, q in acts.items()]
        set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
        device = model_device(prepared)
        seconds = []
        try:
            for b in tqdm(batches, desc="record min/max", disable=not progress, leave=False):
                b = b[0] if isinstance(b, (tuple, list)) else b
                t0 = time.perf_counter()
                prepared(b.to(device))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds.append(time.perf_counter() - t0)
        finally:
            for h in handles:
                h.remove()
        for q in acts.values():
            q.enable_observer(False)
        first = batches[0][0] if isinstance(batches[0], (tuple, list)) else batches[0]
        return cls(prepared, {n: torch.stack(v) for n, v in mins.items()}, {n: torch.stack(v) for n, v in maxs.items()},
                   seconds, int(first.shape[0]))

    def _check_steps(self, steps: int) -> int:
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.num_batches:
            raise ValueError(f"steps={steps!r} is out of range: use an integer in [1, {self.num_batches}] "
                             "(the number of recorded batches)")
        return steps

    def amax(self, averaging_constant: float = 0.01, steps: int | None = None) -> dict[str, torch.Tensor]:
        """``{name: float32 [] amax}`` that ``min_max`` with ``averaging_constant`` reaches after ``steps``
        batches (default: all recorded)."""
        c = check_averaging_constant(averaging_constant)
        steps = self._check_steps(self.num_batches if steps is None else steps)
        out = {}
        for name in self.mins:
            lo, hi = self.mins[name][0].clone(), self.maxs[name][0].clone()
            for k in range(1, steps):
                lo = lo + c * (self.mins[name][k] - lo)
                hi = hi + c * (self.maxs[name][k] - hi)
            out[name] = torch.maximum(lo.abs(), hi.abs())
        return out

    def apply(self, averaging_constant: float = 0.01, steps: int | None = None, bits: int | None = None) -> nn.Module:
        """Load the replayed activation scales (``bits``: activation bit width, default as recorded) into
        the trace's prepared model and put it into VALIDATION; returns it."""
        acts = {n: q for n, q in named_quantizers(self.prepared).items() if q.kind != "weight"}
        if bits is not None:
            check_bits(bits)
        for name, a in self.amax(averaging_constant, steps).items():
            q = acts[name]
            if bits is not None:
                q.bits = q.observer.bits = bits
            q.load_scale(scale_from_amax(a, q.bits))
        return set_fake_quantize(self.prepared, FakeQuantState.VALIDATION)

    def seconds(self, steps: int | None = None) -> float:
        """Forward wall time of the first ``steps`` batches in the recording pass (seconds)."""
        return float(sum(self.batch_seconds[:self._check_steps(self.num_batches if steps is None else steps)]))


BatchesFn = Callable[[int, int, int], list]


def _batches_fn(data, device=None) -> BatchesFn:
    """``(num_batches, batch_size, seed) -> batches`` from an ``ImageTensors`` dataset or a callable."""
    if isinstance(data, ImageTensors):
        return lambda n, bs, seed: calibration_batches(data, n, bs, seed=seed, flip=True, device=device)
    if callable(data):
        return data
    raise TypeError(f"data must be an ImageTensors dataset (calibkit.cifar.data.load_cifar10) or a callable "
                    f"(num_batches, batch_size, seed) -> list of batches, got {type(data).__name__}")


def _positive_ints(name: str, values) -> list[int]:
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name}={values!r} is out of range: use a non-empty list of integers >= 1")
    return values


def sweep_min_max(model: nn.Module, data, val_images: torch.Tensor, val_labels: torch.Tensor,
                  batch_sizes: Sequence[int] = (32, 128, 512), averaging_constants: Sequence[float] = (0.01, 0.1, 0.5),
                  steps: Sequence[int] = (2, 32), activation_bits: Sequence[int] | int = 8, weight_bits: int = 8,
                  seed: int = 0, example_inputs=None, eval_batch_size: int = 500, progress: bool = False) -> list[dict]:
    """Validation accuracy of ``min_max`` calibration over batch size x averaging constant x steps.

    Args:
        data: ``ImageTensors`` (batches drawn with :func:`calibkit.cifar.data.calibration_batches`, flips on) or
            a callable ``(num_batches, batch_size, seed) -> list of batches``.
        batch_sizes: images per calibration batch. averaging_constants: values of c in [0, 1].
        steps: numbers of calibration batches (include a few-steps case such as 2 and a many-steps case).
        activation_bits: one bit width or several (every grid point is evaluated at each).
        seed: calibration data seed. For one batch size, fewer steps use the leading batches of the
            larger run (the data are nested).
    Returns rows ``{"activation_bits", "batch_size", "averaging_constant", "steps", "images", "accuracy",
    "seconds"}`` where ``seconds`` is the forward time of those ``steps`` batches in the recording pass
    (see :class:`MinMaxTrace`; every c shares one pass per batch size).
    """
    batch_sizes, steps = _positive_ints("batch_sizes", batch_sizes), _positive_ints("steps", steps)
    cs = [check_averaging_constant(c) for c in averaging_constants]
    if not cs:
        raise ValueError("averaging_constants is empty: give at least one value in [0, 1]")
    bits_list = [activation_bits] if isinstance(activation_bits, int) else list(activation_bits)
    for b in bits_list:
        check_bits(b, "activation_bits")
    get = _batches_fn(data, model_device(model))
    rows = []
    total = len(batch_sizes) * len(steps) * len(cs) * len(bits_list)
    bar = tqdm(total=total, desc="min_max sweep", disable=not progress, leave=False)
    for bs in batch_sizes:
        trace = MinMaxTrace.record(model, get(max(steps), bs, seed), bits_list[0], weight_bits,
                                   example_inputs=example_inputs)
        for bits in bits_list:
            for st in steps:
                for c in cs:
                    acc = evaluate(trace.apply(c, st, bits), val_images, val_labels, eval_batch_size, progress=False)
                    rows.append({"activation_bits": bits, "batch_size": bs, "averaging_constant": c, "steps": st,
                                 "images": bs * st, "accuracy": acc, "seconds": trace.seconds(st)})
                    bar.update(1)
    bar.close()
    return rows


def steps_curve(model: nn.Module, data, val_images: torch.Tensor, val_labels: torch.Tensor, batch_size: int = 128,
                averaging_constant: float = 0.01, steps: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                activation_bits: Sequence[int] | int = 8, weight_bits: int = 8, seeds: Sequence[int] = (0,),
                example_inputs=None, eval_batch_size: int = 500, progress: bool = False) -> list[dict]:
    """Accuracy of ``min_max`` calibration against the number of calibration steps (batches).

    One recording of ``max(steps)`` batches per seed, replayed for each prefix length. Rows
    ``{"activation_bits", "seed", "steps", "images", "accuracy", "seconds"}``. Several ``seeds`` show
    how much of the curve is data noise.
    """
    steps = sorted(set(_positive_ints("steps", steps)))
    check_averaging_constant(averaging_constant)
    bits_list = [activation_bits] if isinstance(activation_bits, int) else list(activation_bits)
    get = _batches_fn(data, model_device(model))
    rows = []
    for seed in seeds:
        trace = MinMaxTrace.record(model, get(max(steps), batch_size, seed), bits_list[0], weight_bits,
                                   example_inputs=example_inputs)
        for bits in bits_list:
            for st in tqdm(steps, desc=f"steps curve seed {seed}", disable=not progress, leave=False):
                acc = evaluate(trace.apply(averaging_constant, st, bits), val_images, val_labels, eval_batch_size,
                               progress=False)
                rows.append({"activation_bits": bits, "seed": seed, "steps": st, "images": batch_size * st,
                             "accuracy": acc, "seconds": trace.seconds(st)})
    return rows


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def choose_min_max(rows: Sequence[Mapping], steps: int | None = None, activation_bits: int | None = None) -> dict:
    """Pick batch size and averaging constant from :func:`sweep_min_max` rows.

    Only rows with ``steps`` (default: the largest in the sweep) are considered; for each (batch size,
    c) the accuracy is averaged over the remaining rows (bit widths, unless ``activation_bits`` selects
    one). The best mean wins; exact ties go to the larger batch size, then the smaller c.
    Returns ``{"batch_size", "averaging_constant", "steps", "accuracy"}``.
    """
    rows = [r for r in rows if activation_bits is None or r["activation_bits"] == activation_bits]
    if not rows:
        raise ValueError("rows is empty (or no row has the requested activation_bits)")
    steps = max(r["steps"] for r in rows) if steps is None else steps
    sel = [r for r in rows if r["steps"] == steps]
    if not sel:
        raise ValueError(f"steps={steps} is not in the sweep: use one of {sorted({r['steps'] for r in rows})}")
    groups: dict[tuple, list[float]] = {}
    for r in sel:
        groups.setdefault((r["batch_size"], r["averaging_constant"]), []).append(r["accuracy"])
    (bs, c), accs = max(groups.items(), key=lambda kv: (_mean(kv[1]), kv[0][0], -kv[0][1]))
    return {"batch_size": bs, "averaging_constant": c, "steps": steps, "accuracy": _mean(accs)}


# ----------------------------------------------------------------------------------------------------
# notebook 04: the method table


def calibration_sets(data, seeds: Sequence[int], num_batches: int, batch_size: int, device=None) -> dict[int, list]:
    """``{seed: batches}``: one calibration set per seed (same size, different images / flips)."""
    get = _batches_fn(data, device)
    return {int(s): get(num_batches, batch_size, int(s)) for s in seeds}


def _rotated(seq: Sequence, k: int) -> list:
    k %= len(seq)
    return list(seq[k:]) + list(seq[:k])


def _check_methods(methods) -> list[str]:
    from calibkit.quant.observers import get_observer_class
    methods = list(methods)
    if not methods:
        raise ValueError("methods is empty: give at least one observer name, e.g. calibkit.tutorial.experiments.METHODS")
    for m in methods:
        get_observer_class(m)  # clear ValueError for unknown names
    return methods


def compare_methods(model: nn.Module, calib_sets: Mapping[int, Sequence[torch.Tensor]], val_images: torch.Tensor,
                    val_labels: torch.Tensor, methods: Sequence[str] = METHODS,
                    settings: Sequence[QuantSetting] = SETTINGS, method_params: Mapping[str, Mapping] | None = None,
                    timing_repeats: int = 1, example_inputs=None, eval_batch_size: int = 500,
                    progress: bool = False) -> list[dict]:
    """Calibrate and evaluate every method x setting x seed on identical data, timing each calibration.

    Args:
        calib_sets: ``{seed: batches}`` (e.g. :func:`calibration_sets`); every method gets the same
            batches for a given seed.
        methods: observer names for the activations (default :data:`METHODS`).
        settings: :class:`QuantSetting` list (default :data:`SETTINGS`).
        method_params: ``{method: observer kwargs}`` (default: each observer's own defaults).
        timing_repeats: calibrations per (method, setting, seed) (>= 1): all are timed, the last one is
            evaluated; more repeats separate timing noise from real differences.
    Returns rows ``{"method", "setting", "activation_bits", "weight_bits", "per_channel_weights", "seed",
    "accuracy", "calib_seconds" (median of the repeats), "calib_seconds_all" (list)}``. The loops run seed ->
    setting -> repeat -> method, with the method order rotated at every step.
    """
    methods = _check_methods(methods)
    params = {m: dict((method_params or {}).get(m, {})) for m in methods}
    if isinstance(timing_repeats, bool) or not isinstance(timing_repeats, int) or timing_repeats < 1:
        raise ValueError(f"timing_repeats={timing_repeats!r} is out of range: use an integer >= 1")
    if not calib_sets:
        raise ValueError("calib_sets is empty: give {seed: calibration batches} for at least one seed")
    settings = list(settings)
    rows, turn = [], 0
    bar = tqdm(total=len(calib_sets) * len(settings) * len(methods), desc="compare methods", disable=not progress)
    for seed, calib in calib_sets.items():
        calib = _check_batches(calib)
        ex = _example_inputs(example_inputs, calib)
        for setting in settings:
            times = {m: [] for m in methods}
            prepared = {}
            for _ in range(timing_repeats):
                for m in _rotated(methods, turn):
                    p = prepare(model, setting.qconfig(m, **params[m]), ex)
                    times[m].append(calibrate(p, calib, progress=False))
                    prepared[m] = p
                turn += 1
            for m in methods:
                set_fake_quantize(prepared[m], FakeQuantState.VALIDATION)
                acc = evaluate(prepared[m], val_images, val_labels, eval_batch_size, progress=False)
                rows.append({"method": m, "setting": setting.name, "activation_bits": setting.activation_bits,
                             "weight_bits": setting.weight_bits, "per_channel_weights": setting.per_channel_weights,
                             "seed": seed, "accuracy": acc, "calib_seconds": statistics.median(times[m]),
                             "calib_seconds_all": list(times[m])})
                bar.update(1)
    bar.close()
    return rows


def ease_of_use(model: nn.Module, calib: Sequence[torch.Tensor], val_images: torch.Tensor, val_labels: torch.Tensor,
                grids: Mapping[str, Sequence[Mapping]] | None = None, setting: QuantSetting = SETTINGS[2],
                percentile_from_stats: bool = True, example_inputs=None, eval_batch_size: int = 500,
                progress: bool = False) -> list[dict]:
    """Validation accuracy over each method's parameter grid at one ``setting``.

    Args:
        grids: ``{method: [observer kwargs, ...]}`` (default :data:`EASE_GRIDS`).
        setting: where the grid is evaluated (default 6-bit activations / 8-bit per-channel weights:
            at int8 the differences are mostly within noise, at 4 bits every method loses a lot).
        percentile_from_stats: evaluate the ``percentile`` grid from statistics collected once
            (:func:`percentile_evaluator`; thresholds bit-identical to a fresh calibration) instead of
            calibrating every point; those rows have ``calib_seconds = None``.
    Returns rows ``{"method", "params" (str, e.g. "percentile=99.99, bins=2048"), "accuracy",
    "calib_seconds", **params}``. A kl ``update_interval`` larger than ``len(calib)`` raises
    ``ValueError`` up front (it could never produce a scale).
    """
    grids = dict(EASE_GRIDS if grids is None else grids)
    _check_methods(grids)
    calib = _check_batches(calib)
    for m, grid in grids.items():
        if not grid:
            raise ValueError(f"grids[{m!r}] is empty: give at least one parameter dict")
        for kw in grid:
            if kw.get("update_interval", 1) > len(calib):
                raise ValueError(f"grids[{m!r}] has update_interval={kw['update_interval']} but calib holds only "
                                 f"{len(calib)} batches: use update_interval <= {len(calib)} or more batches")
    ex = _example_inputs(example_inputs, calib)
    evaluators: dict[float, Callable] = {}

    def from_stats(m: str, kw: Mapping) -> bool:
        b = kw.get("bins", 2048)
        return (percentile_from_stats and m == "percentile" and set(kw) <= {"percentile", "bins", "averaging_constant"}
                and isinstance(b, int) and b >= 2 and b & (b - 1) == 0 and b <= 32768)

    rows = []
    todo = [(m, kw) for m, grid in grids.items() for kw in grid]
    for m, kw in tqdm(todo, desc="ease-of-use grid", disable=not progress):
        if from_stats(m, kw):
            c = kw.get("averaging_constant", 0.01)
            if c not in evaluators:
                evaluators[c] = percentile_evaluator(model, calib, val_images, val_labels, setting, c,
                                                     example_inputs=ex, eval_batch_size=eval_batch_size)
            acc, seconds = evaluators[c](kw.get("percentile", 99.99), kw.get("bins", 2048)), None
        else:
            res = calibrate_and_evaluate(model, setting.qconfig(m, **kw), calib, val_images, val_labels, ex,
                                         eval_batch_size=eval_batch_size)
            acc, seconds = res["accuracy"], res["calib_seconds"]
        rows.append({"method": m, "params": ", ".join(f"{k}={v}" for k, v in kw.items()),
                     "accuracy": acc, "calib_seconds": seconds, **kw})
    return rows


def ease_ranges(rows: Sequence[Mapping]) -> dict[str, float]:
    """``{method: max - min accuracy}`` over the rows of :func:`ease_of_use` (the ease-of-use range)."""
    acc: dict[str, list[float]] = {}
    for r in rows:
        acc.setdefault(r["method"], []).append(float(r["accuracy"]))
    if not acc:
        raise ValueError("rows is empty: run ease_of_use first")
    return {m: max(v) - min(v) for m, v in acc.items()}


def _spread_by_setting(rows: Sequence[Mapping], method: str, key: str) -> float:
    """Mean over settings of (max - min of ``key`` over seeds / repeats) for ``method``."""
    by: dict[str, list[float]] = {}
    for r in rows:
        if r["method"] == method:
            vals = r["calib_seconds_all"] if key == "calib_seconds_all" else [r[key]]
            by.setdefault(r["setting"], []).extend(float(v) for v in vals)
    return _mean(max(v) - min(v) for v in by.values()) if by else 0.0


def method_summary(rows: Sequence[Mapping], ease: Mapping[str, float] | Sequence[Mapping],
                   ease_setting: str | None = SETTINGS[2].name, rank_method: str = "min") -> dict[str, dict]:
    """The method table: measured values, their noise, and ranks per column.

    Args:
        rows: :func:`compare_methods` rows. ease: :func:`ease_of_use` rows or :func:`ease_ranges`.
        ease_setting: the setting the ease grid ran at; its seed-to-seed accuracy spread is the
            ease column's noise (``None`` / absent from ``rows``: 0).
        rank_method: tie handling for the displayed ranks (see :func:`rank`; default "min").
    Returns ``{method: {"speed_seconds", "speed_noise", "accuracy", "accuracy_noise", "ease_range",
    "ease_noise", "rank_speed", "rank_accuracy", "rank_ease", "runs"}}`` in the order methods first
    appear in ``rows``.
    """
    ranges = ease_ranges(ease) if not isinstance(ease, Mapping) else dict(ease)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    if not methods:
        raise ValueError("rows is empty: run compare_methods first")
    missing = [m for m in methods if m not in ranges]
    if missing:
        raise ValueError(f"ease has no range for {missing}: run ease_of_use over every compared method")
    out = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        times = [float(t) for r in mine for t in r.get("calib_seconds_all", [r["calib_seconds"]])]
        ease_acc = [r["accuracy"] for r in mine if r["setting"] == ease_setting]
        time_key = "calib_seconds_all" if "calib_seconds_all" in mine[0] else "calib_seconds"
        out[m] = {
            "speed_seconds": statistics.median(times),
            "speed_noise": _spread_by_setting(rows, m, time_key),
            "accuracy": _mean(r["accuracy"] for r in mine),
            "accuracy_noise": _spread_by_setting(rows, m, "accuracy"),
            "ease_range": float(ranges[m]),
            "ease_noise": max(ease_acc) - min(ease_acc) if ease_acc else 0.0,
            "runs": len(mine),
        }
    for col, (key, lower) in COLUMNS.items():
        for m, rk in zip(methods, rank([out[m][key] for m in methods], lower_is_better=lower, method=rank_method)):
            out[m][f"rank_{col}"] = rk
    return out


def rank(values: Sequence[float], lower_is_better: bool = False, method: str = "average") -> list[float]:
    """Ranks of ``values`` (1 = best).

    Args:
        lower_is_better: ``True`` for times / ranges, ``False`` for accuracies.
        method: how exactly equal values share ranks -- ``"average"`` (mean of the positions they
            occupy: 1, 2.5, 2.5, 4; what Spearman's coefficient uses), ``"min"`` (competition ranking:
            1, 2, 2, 4, as in the spec's accuracy column) or ``"dense"`` (1, 2, 2, 3; the spec's ease
            column).
    Returns a list of floats in the input order. NaN values raise ``ValueError``.
    """
    if method not in ("average", "min", "dense"):
        raise ValueError(f"method={method!r} is unknown: use 'average', 'min' or 'dense'")
    vals = [float(v) for v in values]
    if any(math.isnan(v) for v in vals):
        raise ValueError(f"values contain NaN: {vals}")
    keyed = sorted(range(len(vals)), key=lambda i: vals[i] if lower_is_better else -vals[i])
    out = [0.0] * len(vals)
    pos, dense = 0, 0
    while pos < len(keyed):
        end = pos
        while end + 1 < len(keyed) and vals[keyed[end + 1]] == vals[keyed[pos]]:
            end += 1
        dense += 1
        r = {"average": (pos + end) / 2 + 1, "min": pos + 1, "dense": dense}[method]
        for i in keyed[pos:end + 1]:
            out[i] = float(r)
        pos = end + 1
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long sequences (Pearson correlation of their average
    ranks, as ``scipy.stats.spearmanr``). Returns NaN when either sequence is constant; fewer than two
    values or unequal lengths raise ``ValueError``."""
    if len(a) != len(b):
        raise ValueError(f"a and b must have the same length, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError(f"spearman needs at least 2 values, got {len(a)}")
    ra, rb = rank(a, lower_is_better=True), rank(b, lower_is_better=True)
    ma, mb = _mean(ra), _mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return math.nan
    return cov / math.sqrt(va * vb)


def rank_comparison(summary: Mapping[str, Mapping], spec: Mapping[str, Mapping[str, int]] = SPEC_RANKS) -> list[dict]:
    """Side-by-side rows ``{"method", "speed (kit)", "speed (spec)", "accuracy (kit)", ...}`` for the
    methods present in both ``summary`` and ``spec``."""
    rows = []
    for m in summary:
        row = {"method": m}
        for col in COLUMNS:
            row[f"{col} (kit)"] = summary[m][f"rank_{col}"]
            row[f"{col} (spec)"] = spec[col].get(m)
        rows.append(row)
    return rows


def agreement(summary: Mapping[str, Mapping],
              spec: Mapping[str, Mapping[str, int]] = SPEC_RANKS) -> dict[str, float | None]:
    """Spearman correlation between the kit's and the spec's ranks, per column (over the methods in
    both; ``None`` when undefined, e.g. all measured values tied)."""
    out = {}
    for col in COLUMNS:
        ms = [m for m in summary if m in spec[col]]
        kit, ref = [summary[m][f"rank_{col}"] for m in ms], [spec[col][m] for m in ms]
        rho = spearman(kit, ref) if len(ms) >= 2 else math.nan
        out[col] = None if math.isnan(rho) else rho
    return out


def disagreements(summary: Mapping[str, Mapping], spec: Mapping[str, Mapping[str, int]] = SPEC_RANKS) -> list[dict]:
    """Every (column, method) whose measured rank differs from the spec's, with the numbers.

    Rows ``{"column", "method", "kit_rank", "spec_rank", "value", "noise", "within_noise_of"}``:
    ``value`` / ``noise`` are the measured value and its seed-to-seed spread for that column,
    ``within_noise_of`` lists the methods whose value differs from this one by no more than the larger
    of the two spreads (their relative order is not resolved by this run).
    """
    noise_key = {"speed": "speed_noise", "accuracy": "accuracy_noise", "ease": "ease_noise"}
    out = []
    for col, (key, _) in COLUMNS.items():
        for m in summary:
            if m not in spec[col] or summary[m][f"rank_{col}"] == spec[col][m]:
                continue
            v, n = summary[m][key], summary[m][noise_key[col]]
            close = [o for o in summary if o != m and abs(summary[o][key] - v) <= max(n, summary[o][noise_key[col]])]
            out.append({"column": col, "method": m, "kit_rank": summary[m][f"rank_{col}"], "spec_rank": spec[col][m],
                        "value": v, "noise": n, "within_noise_of": close})
    return out


def describe_disagreement(d: Mapping) -> str:
    """One sentence for a :func:`disagreements` row, with the measured numbers and the noise verdict."""
    unit = {"speed": ("s", 1.0, "median calibration time"), "accuracy": ("%", 100.0, "mean accuracy"),
            "ease": (" points", 100.0, "accuracy range over its grid")}[d["column"]]
    suffix, mult, what = unit
    text = (f"{d['column']}: {d['method']} is #{d['kit_rank']:g} here vs #{d['spec_rank']:g} in the spec "
            f"({what} {mult * d['value']:.3g}{suffix}, seed-to-seed spread {mult * d['noise']:.2g}{suffix})")
    if d["within_noise_of"]:
        return text + f"; within noise of {', '.join(d['within_noise_of'])}, so this rank is not resolved by the run."
    return text + "; the difference to its neighbours is larger than the noise."


# ----------------------------------------------------------------------------------------------------
# notebook 04: the percentile tuning path


def tune_percentile(evaluate_fn: Callable[[float, int], float], start_percentile: float = 99.99, start_bins: int = 2048,
                    percentile_step: float | None = None, step_space: str = "linear", max_bins: int = 16384,
                    max_evals: int = 30, patience: int = 2, min_gain: float = 0.0) -> list[dict]:
    """Alternating percentile / bins search (spec section 4), on any ``evaluate_fn(percentile, bins) -> accuracy``.

    Procedure (every evaluated point is recorded; no point is evaluated twice):

    1. evaluate the start point; it is the first accepted point.
    2. **percentile phase** (bins fixed): step the percentile by ``step`` in the direction that last
       helped (up at first), and keep stepping while accuracy improves; if the first step does not
       improve, do the same in the other direction.
    3. **bins phase** (percentile fixed): double ``bins`` while accuracy improves (up to ``max_bins``).
    4. halve the percentile step; repeat 2-4 until ``patience`` consecutive rounds accept nothing, or
       ``max_evals`` points were evaluated.

    A point is accepted when it beats the best accuracy so far by more than ``min_gain``.
    ``step_space="linear"`` steps the percentile itself; the default first step ``(100 - p) / 2`` gives the
    spec's path 99.99 -> 99.995 / 99.985 -> 99.9875 ... ``"nines"`` steps ``-log10(1 - p/100)`` (the
    number of nines; default first step 0.5), which treats 99.9 -> 99.99 like 99.99 -> 99.999 and
    reaches far-away optima in fewer evaluations.

    Because a point is accepted only when it beats the best accuracy seen, the accepted accuracies
    are strictly increasing even when ``evaluate_fn`` is noisy -- but then part of the gain is
    selection on noise: tune on one subset and report the result on data the search did not see.

    Returns rows ``{"step", "percentile", "bins", "accuracy", "accepted", "move", "best_accuracy"}`` (step =
    1-based evaluation order; ``move``: "start", "percentile+", "percentile-" or "bins x2";
    ``best_accuracy``: the best accepted accuracy after this step).
    """
    p = check_percentile(start_percentile)
    if step_space not in ("linear", "nines"):
        raise ValueError(f"step_space={step_space!r} is unknown: use 'linear' or 'nines'")
    if isinstance(start_bins, bool) or not isinstance(start_bins, int) or start_bins < 2:
        raise ValueError(f"start_bins={start_bins!r} is out of range: use an integer >= 2")
    if isinstance(max_bins, bool) or not isinstance(max_bins, int) or max_bins < start_bins:
        raise ValueError(f"max_bins={max_bins!r} is out of range: use an integer >= start_bins ({start_bins})")
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1:
        raise ValueError(f"max_evals={max_evals!r} is out of range: use an integer >= 1")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience={patience!r} is out of range: use an integer >= 1")
    if not (isinstance(min_gain, (int, float)) and min_gain >= 0):
        raise ValueError(f"min_gain={min_gain!r} is out of range: use a number >= 0")
    if step_space == "nines" and p == 100.0:
        raise ValueError("start_percentile=100 has infinitely many nines: use step_space='linear' or a value < 100")

    def nines(q):
        return -math.log10(1.0 - q / 100.0)

    def from_nines(n):
        return 100.0 * (1.0 - 10.0 ** (-n))

    if percentile_step is None:
        step = (100.0 - p) / 2 if step_space == "linear" else 0.5
        if step == 0:
            step = 0.005
    else:
        step = float(percentile_step)
        if not (math.isfinite(step) and step > 0):
            raise ValueError(f"percentile_step={percentile_step!r} is out of range: use a number > 0")

    b = start_bins
    rows: list[dict] = []
    seen: dict[tuple[float, int], float] = {}
    best = -math.inf

    def try_point(q: float, bins: int, move: str) -> bool:
        nonlocal best, p, b
        key = (round(q, 12), bins)
        if key in seen or len(rows) >= max_evals:
            return False
        acc = float(evaluate_fn(q, bins))
        if not math.isfinite(acc):
            raise ValueError(f"evaluate_fn({q}, {bins}) returned {acc}: it must return a finite accuracy")
        seen[key] = acc
        ok = acc > best + min_gain or not rows
        if ok:
            best, p, b = acc, q, bins
        rows.append({"step": len(rows) + 1, "percentile": q, "bins": bins, "accuracy": acc, "accepted": ok,
                     "move": move, "best_accuracy": best})
        return ok

    def moved(q: float, d: int) -> float:
        return q + d * step if step_space == "linear" else from_nines(nines(q) + d * step) if q < 100 else math.inf

    try_point(p, b, "start")
    idle, direction = 0, 1
    while len(rows) < max_evals and idle < patience:
        improved = False
        for d in (direction, -direction):
            went = False
            while len(rows) < max_evals:
                q = moved(p, d)
                if not (0.0 < q <= 100.0) or not try_point(q, b, "percentile+" if d > 0 else "percentile-"):
                    break
                went = True
            if went:
                direction, improved = d, True
                break
        while b * 2 <= max_bins and try_point(p, b * 2, "bins x2"):
            improved = True
        step /= 2
        idle = 0 if improved else idle + 1
    return rows


def percentile_evaluator(model: nn.Module, calib: Sequence[torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                         setting: QuantSetting = SETTINGS[0], averaging_constant: float = 0.01, stats=None,
                         example_inputs=None, eval_batch_size: int = 500, progress: bool = False):
    """A fast ``evaluate_fn(percentile, bins) -> accuracy`` for :func:`tune_percentile`.

    Collects :class:`calibkit.analysis.activation_stats.ActivationStats` of ``calib`` once (or uses ``stats``),
    then every call re-derives the activation clips that ``PercentileObserver(percentile, bins,
    averaging_constant)`` would produce on those batches (bit for bit), loads them and evaluates on
    ``images`` / ``labels``. ``bins`` must be a power of two up to the statistics' ``fine_bins``.
    ``evaluate_fn(percentile, bins, images=..., labels=...)`` evaluates on other data with the same
    statistics (e.g. tune on a subset, then report on the full validation set). The returned function
    has attributes ``prepared``, ``stats`` and ``calls`` (number of evaluations).
    """
    from calibkit.analysis.activation_stats import ActivationStats

    calib = _check_batches(calib)
    prepared = prepare(model, setting.qconfig("percentile", averaging_constant=averaging_constant),
                       _example_inputs(example_inputs, calib))
    if stats is None:
        stats = ActivationStats.collect(prepared, calib, progress=progress)  # also calibrates the weights
    else:  # the weights still need their (data-independent) scales; activation scales are loaded below
        calibrate(prepared, calib[:1], progress=False)

    def evaluate_fn(percentile: float, bins: int, images: torch.Tensor = images,
                    labels: torch.Tensor = labels) -> float:
        stats.apply(prepared, stats.percentile_amax(percentile, bins, averaging_constant), setting.activation_bits)
        set_fake_quantize(prepared, FakeQuantState.VALIDATION)
        evaluate_fn.calls += 1
        return evaluate(prepared, images, labels, eval_batch_size, progress=False)

    evaluate_fn.prepared, evaluate_fn.stats, evaluate_fn.calls = prepared, stats, 0
    return evaluate_fn


def exclude_subset(images: torch.Tensor, labels: torch.Tensor,
                   subset_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` without the images that also appear in ``subset_images`` (exact equality).

    Used to report a tuned setting on validation images the search never saw (the slider subset is
    drawn from the validation set). Images are matched by a fixed random projection (float64) of their
    pixels, so identical images always match; distinct images colliding is practically impossible.
    """
    if images.shape[1:] != subset_images.shape[1:]:
        raise ValueError(f"subset_images have shape {list(subset_images.shape[1:])} per image, images "
                         f"{list(images.shape[1:])}: they must match")
    w = torch.randn(images[0].numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def keys(x):  # in chunks: a float64 copy of a whole validation set would be large
        out = []
        for i in range(0, len(x), 1024):
            out += (x[i:i + 1024].reshape(-1, w.numel()).to("cpu", torch.float64) @ w).tolist()
        return out

    seen = set(keys(subset_images))
    keep = torch.tensor([k not in seen for k in keys(images)], dtype=torch.bool)
    return images[keep.to(images.device)], labels[keep.to(labels.device)]


# ----------------------------------------------------------------------------------------------------
# saving


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        return _jsonable(v.tolist())
    if isinstance(v, QuantSetting):
        return asdict(v)
    return v


def save_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` (dicts / lists / numbers / strings / tensors) as JSON, non-finite floats as ``null``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=1))
    return path


def save_rows(rows: Sequence[Mapping] | Mapping, output_dir: str | Path, name: str) -> dict[str, Path]:
    """Write ``rows`` (list of flat dicts) as ``<output_dir>/<name>.csv`` and ``.json``.

    A mapping ``{key: dict}`` is written as rows with the key in a first column ``"key"``. Lists in cells
    are written as JSON text in the CSV; non-finite floats become empty cells / ``null``.
    Returns ``{"csv": path, "json": path}``.
    """
    if isinstance(rows, Mapping):
        rows = [{"key": k, **dict(v)} for k, v in rows.items()]
    rows = [_jsonable(dict(r)) for r in rows]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    csv_path, json_path = out / f"{name}.csv", out / f"{name}.json"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    json_path.write_text(json.dumps(rows, indent=1))
    return {"csv": csv_path, "json": json_path}
