"""The measurements behind notebook 04: the method comparison (docs/methods.md#method-ranking).

Every function is plain: a float model, calibration batches and a labelled validation set in, rows of flat dicts
out (accuracies are fractions in [0, 1], times wall-clock seconds).

* :func:`compare_methods`: every method x quantization setting x calibration seed, accuracy and calibration time
  on identical batches, in one run.
* :func:`ease_of_use`: accuracy over each method's parameter grid (:data:`EASE_GRIDS`); :func:`ease_ranges`
  reduces it to the *ease-of-use range* (max - min accuracy over the grid).
* :func:`method_summary`, :func:`rank`, :func:`spearman`, :func:`rank_comparison`, :func:`agreement`,
  :func:`disagreements`: the ranks next to the documented ones (:data:`SPEC_RANKS`), agreement, and the
  differences that are within seed-to-seed noise.

Definitions (also printed by the notebook):

* **speed**: median calibration wall time (``calibkit.quant.calibrate.calibrate``: forward passes plus the
  final scale computation) over every (setting, seed, repeat) run of a method; every method sees the
  same batches in each run, and the method order is rotated from run to run so that none is always first.
* **accuracy**: validation accuracy after calibration, averaged over settings and seeds.
* **ease of use**: ``max - min`` validation accuracy over the method's grid in :data:`EASE_GRIDS`,
  at one setting (smaller = the parameter choice matters less = easier).
* **noise**: per method, the seed-to-seed spread -- speed and accuracy: ``max - min`` over seeds (and
  timing repeats) at a fixed setting, averaged over the settings; ease: the accuracy spread over seeds
  at the ease setting. Two methods whose values differ by no more than the larger of their two
  spreads are *within noise* of each other (with one seed the spread is 0: noise not estimated).
* **ranks**: 1 = best; ties share the average of their positions (``method="average"``, what
  Spearman's coefficient needs) or the smallest (``"min"``, competition ranking as in the documented
  accuracy column); ``"dense"`` (the documented ease column: 1, 1, 2, 3, 4) is also available.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from calibkit.checks import check_int
from calibkit.quant.calibrate import calibrate, evaluate
from calibkit.quant.fake_quantize import FakeQuantState, set_fake_quantize
from calibkit.quant.observers import check_averaging_constant, get_observer_class
from calibkit.quant.prepare import prepare
from calibkit.tutorial.settings import (METHODS, SETTINGS, QuantSetting, check_batches, example_inputs_of, mean)
from calibkit.tutorial.tuning import percentile_evaluator
from calibkit.tutorial.workflow import calibrate_and_evaluate

__all__ = ["EASE_GRIDS", "SPEC_RANKS", "COLUMNS", "compare_methods", "ease_of_use", "ease_ranges", "method_summary",
           "rank", "spearman", "rank_comparison", "agreement", "disagreements", "describe_disagreement"]

#: Each method's "reasonable parameter range" for the ease-of-use column. The grids span each knob
#: from the documented default to the edge of what the docs recommend: the averaging constant from
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

#: The documented method ranking (docs/methods.md#method-ranking; 1 = best), per column.
SPEC_RANKS: dict[str, dict[str, int]] = {
    "speed": {"min_max": 1, "percentile": 2, "mix": 3, "mse": 4, "kl": 5},
    "accuracy": {"mse": 1, "kl": 2, "mix": 2, "percentile": 4, "min_max": 5},
    "ease": {"min_max": 1, "mix": 1, "mse": 2, "kl": 3, "percentile": 4},
}
#: Column -> (summary key of the measured value, lower is better).
COLUMNS = {"speed": ("speed_seconds", True), "accuracy": ("accuracy", False), "ease": ("ease_range", True)}


def _rotated(seq: Sequence, k: int) -> list:
    k %= len(seq)
    return list(seq[k:]) + list(seq[:k])


def _check_methods(methods) -> list[str]:
    methods = list(methods)
    if not methods:
        raise ValueError("methods is empty: give at least one observer name, e.g. calibkit.tutorial.settings.METHODS")
    for m in methods:
        get_observer_class(m)  # clear ValueError for unknown names
    return methods


def _calibrate_every_method(model: nn.Module, setting: QuantSetting, calib: list, example_inputs: tuple,
                            methods: list[str], params: Mapping[str, Mapping], repeats: int, turn: int):
    """Prepare and calibrate each method ``repeats`` times on ``calib``, the method order rotated by ``turn`` (+1
    per repeat). Returns ``({method: prepared model of its last repeat}, {method: [seconds]}, next turn)``."""
    times: dict[str, list[float]] = {m: [] for m in methods}
    prepared = {}
    for _ in range(repeats):
        for m in _rotated(methods, turn):
            p = prepare(model, setting.qconfig(m, **params[m]), example_inputs)
            times[m].append(calibrate(p, calib, progress=False))
            prepared[m] = p
        turn += 1
    return prepared, times, turn


def compare_methods(model: nn.Module, calib_sets: Mapping[int, Sequence[torch.Tensor]], val_images: torch.Tensor,
                    val_labels: torch.Tensor, methods: Sequence[str] = METHODS,
                    settings: Sequence[QuantSetting] = SETTINGS, method_params: Mapping[str, Mapping] | None = None,
                    timing_repeats: int = 1, example_inputs=None, eval_batch_size: int = 500,
                    progress: bool = False, on_run: Callable[[dict, nn.Module], None] | None = None) -> list[dict]:
    """Calibrate and evaluate every method x setting x seed on identical data, timing each calibration.

    For one (setting, seed) this is, per method: ``prepare(model, setting.qconfig(method))``, ``calibrate`` on the
    seed's batches, VALIDATION, ``evaluate`` (notebook 04 writes that loop out by hand once).

    Args:
        calib_sets: ``{seed: batches}`` (e.g. :func:`calibkit.tutorial.settings.calibration_sets`); every method
            gets the same batches for a given seed.
        methods: observer names for the activations (default :data:`METHODS`).
        settings: :class:`QuantSetting` list (default :data:`SETTINGS`).
        method_params: ``{method: observer kwargs}`` (default: each observer's own defaults).
        timing_repeats: calibrations per (method, setting, seed) (>= 1): all are timed, the last one is
            evaluated; more repeats separate timing noise from real differences.
        on_run: called as ``on_run(row, prepared)`` after each evaluation (the model in VALIDATION), to measure
            more on a calibrated model without calibrating again (e.g. ``method_rules.KeepCalibrated``).
    Returns rows ``{"method", "setting", "activation_bits", "weight_bits", "per_channel_weights", "seed",
    "accuracy", "calib_seconds" (median of the repeats), "calib_seconds_all" (list)}``. The loops run seed ->
    setting -> repeat -> method, with the method order rotated at every step.
    """
    methods = _check_methods(methods)
    params = {m: dict((method_params or {}).get(m, {})) for m in methods}
    check_int("timing_repeats", timing_repeats, 1)
    if not calib_sets:
        raise ValueError("calib_sets is empty: give {seed: calibration batches} for at least one seed")
    settings = list(settings)
    rows, turn = [], 0
    bar = tqdm(total=len(calib_sets) * len(settings) * len(methods), desc="compare methods", disable=not progress)
    for seed, calib in calib_sets.items():
        calib = check_batches(calib)
        ex = example_inputs_of(example_inputs, calib)
        for setting in settings:
            prepared, times, turn = _calibrate_every_method(model, setting, calib, ex, methods, params,
                                                            timing_repeats, turn)
            for m in methods:
                set_fake_quantize(prepared[m], FakeQuantState.VALIDATION)
                acc = evaluate(prepared[m], val_images, val_labels, eval_batch_size, progress=False)
                rows.append({"method": m, "setting": setting.name, "activation_bits": setting.activation_bits,
                             "weight_bits": setting.weight_bits, "per_channel_weights": setting.per_channel_weights,
                             "seed": seed, "accuracy": acc, "calib_seconds": statistics.median(times[m]),
                             "calib_seconds_all": list(times[m])})
                if on_run is not None:
                    on_run(rows[-1], prepared[m])
                bar.update(1)
    bar.close()
    return rows


def _check_grids(grids: Mapping[str, Sequence[Mapping]], num_batches: int) -> None:
    _check_methods(grids)
    for m, grid in grids.items():
        if not grid:
            raise ValueError(f"grids[{m!r}] is empty: give at least one parameter dict")
        for kw in grid:
            if kw.get("update_interval", 1) > num_batches:
                raise ValueError(f"grids[{m!r}] has update_interval={kw['update_interval']} but calib holds only "
                                 f"{num_batches} batches: use update_interval <= {num_batches} or more batches")


def ease_of_use(model: nn.Module, calib: Sequence[torch.Tensor], val_images: torch.Tensor, val_labels: torch.Tensor,
                grids: Mapping[str, Sequence[Mapping]] | None = None, setting: QuantSetting = SETTINGS[2],
                percentile_from_stats: bool = True, example_inputs=None, eval_batch_size: int = 500,
                progress: bool = False, averaging_constant: float = 0.01) -> list[dict]:
    """Validation accuracy over each method's parameter grid at one ``setting``.

    Args:
        grids: ``{method: [observer kwargs, ...]}`` (default :data:`EASE_GRIDS`).
        setting: where the grid is evaluated (default 6-bit activations / 8-bit per-channel weights:
            at int8 the differences are mostly within noise, at 4 bits every method loses a lot).
        percentile_from_stats: evaluate the ``percentile`` grid from statistics collected once
            (:func:`percentile_evaluator`; thresholds bit-identical to a fresh calibration) instead of
            calibrating every point; those rows have ``calib_seconds = None``.
        averaging_constant: the observers' averaging constant wherever a grid point does not set its own
            (e.g. notebook 02's choice; default 0.01, the observers' default).
    Returns rows ``{"method", "params" (str, e.g. "percentile=99.99, bins=2048"), "accuracy",
    "calib_seconds", **params}``. A kl ``update_interval`` larger than ``len(calib)`` raises
    ``ValueError`` up front (it could never produce a scale).
    """
    grids = dict(EASE_GRIDS if grids is None else grids)
    check_averaging_constant(averaging_constant)
    calib = check_batches(calib)
    _check_grids(grids, len(calib))
    ex = example_inputs_of(example_inputs, calib)
    evaluators: dict[float, Callable] = {}

    def from_stats(m: str, kw: Mapping) -> bool:
        b = kw.get("bins", 2048)
        return (percentile_from_stats and m == "percentile" and set(kw) <= {"percentile", "bins", "averaging_constant"}
                and isinstance(b, int) and b >= 2 and b & (b - 1) == 0 and b <= 32768)

    rows = []
    todo = [(m, kw) for m, grid in grids.items() for kw in grid]
    for m, kw in tqdm(todo, desc="ease-of-use grid", disable=not progress):
        if from_stats(m, kw):
            c = kw.get("averaging_constant", averaging_constant)
            if c not in evaluators:
                evaluators[c] = percentile_evaluator(model, calib, val_images, val_labels, setting, c,
                                                     example_inputs=ex, eval_batch_size=eval_batch_size)
            acc, seconds = evaluators[c](kw.get("percentile", 99.99), kw.get("bins", 2048)), None
        else:
            res = calibrate_and_evaluate(model, setting.qconfig(m, **{"averaging_constant": averaging_constant, **kw}),
                                         calib, val_images, val_labels, ex,
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
    return mean(max(v) - min(v) for v in by.values()) if by else 0.0


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
            "accuracy": mean(r["accuracy"] for r in mine),
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
            1, 2, 2, 4, as in the documented accuracy column) or ``"dense"`` (1, 2, 2, 3; the documented
            ease column).
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
    ma, mb = mean(ra), mean(rb)
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
    """Spearman correlation between the kit's and the documented ranks (:data:`SPEC_RANKS`), per column (over
    the methods in both; ``None`` when undefined, e.g. all measured values tied)."""
    out = {}
    for col in COLUMNS:
        ms = [m for m in summary if m in spec[col]]
        kit, ref = [summary[m][f"rank_{col}"] for m in ms], [spec[col][m] for m in ms]
        rho = spearman(kit, ref) if len(ms) >= 2 else math.nan
        out[col] = None if math.isnan(rho) else rho
    return out


def disagreements(summary: Mapping[str, Mapping], spec: Mapping[str, Mapping[str, int]] = SPEC_RANKS) -> list[dict]:
    """Every (column, method) whose measured rank differs from the documented one, with the numbers.

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

