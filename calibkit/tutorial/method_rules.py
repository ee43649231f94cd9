"""Notebook 04's guide checks: six rules of the method guide, each measured and judged from the run's numbers.

Every experiment is one function that returns rows (flat dicts, accuracies as fractions) and one ``*_check``
function that turns the rows into a :func:`calibkit.tutorial.guide_checks.guide_check` record:

* ``percentile_tuning_gain`` / ``bins_2048_enough``: :func:`percentile_points` evaluates percentile points (start,
  tuned, tuned at other bin counts) on images the search never saw, once per calibration seed;
  :func:`tuning_gain_check`, :func:`bins_check` (docs/methods.md#percentile-tuning).
* ``percentile_highest_ceiling``: :func:`ceiling_check` on those rows and :func:`calibrated_accuracies` (the other
  methods' models that ``compare_methods`` calibrated, evaluated on the same unseen images).
* ``mix_no_tuning``: :func:`mix_check` on the ``ease_of_use`` rows (docs/methods.md#mix).
* ``default_mse_min_max``: :func:`weight_combinations` (activation method x weight observer) and
  :func:`default_check`.
* ``rank_table``: :func:`rank_check` on the method table (docs/methods.md#method-ranking).

**Noise of a difference**: :func:`~calibkit.tutorial.guide_checks.difference_noise` (the seed-to-seed spread of
the difference, at least one binomial standard error).
"""

from __future__ import annotations

import math
from copy import deepcopy
from typing import Callable, Mapping, Sequence

from torch import nn
from tqdm.auto import tqdm

from calibkit.quant.calibrate import calibrate, evaluate
from calibkit.quant.fake_quantize import FakeQuantState, named_quantizers, set_fake_quantize
from calibkit.quant.observers import get_observer_class
from calibkit.quant.prepare import prepare
from calibkit.quant.qat import weight_scales
from calibkit.quant.qconfig import get_default_qconfig
from calibkit.tutorial.comparison import agreement, disagreements, ease_ranges
from calibkit.tutorial.guide_checks import accuracy_noise, difference_noise, guide_check, judge
from calibkit.tutorial.settings import SETTINGS, QuantSetting, check_batches, mean

__all__ = ["SIZES", "GUIDE_TUNING_PATH", "EXTRA_SETTINGS", "RHO_AGREE", "setting_by_name", "tuning_side_by_side",
           "percentile_points", "tuning_gain_check", "bins_check", "calibrated_accuracies",
           "ceiling_check", "mix_check", "KeepCalibrated", "weight_combinations", "combination_table", "default_check",
           "rank_check"]

#: Sizes of the experiments per profile: the bin counts tried at the tuned percentile; how many of the unseen
#: validation images (validation minus the search subset; None: all, 8000 in full) the percentile checks use; the
#: weight observers crossed with every activation method (kl has no per-channel mode) and the settings of that cross
#: (a6: the activation methods separate; per-tensor weights: the weight observers do). Both settings are ones
#: compare_methods runs, so the cross reuses its calibrated models and only evaluates. Full profile: about 60k
#: fake-quantized image evaluations more than before (~7 ms each on one core for the full model, measured).
SIZES = {
    "full": {"bins": [1024, 2048, 4096, 8192, 16384], "holdout_images": 2000, "weight_observers": ["min_max", "mse"],
             "combination_settings": ["a6/w8-ch", "a8/w8-tensor"]},
    "smoke": {"bins": [1024, 2048, 4096, 8192, 16384], "holdout_images": None, "weight_observers": ["min_max", "mse"],
              "combination_settings": ["a6/w8-ch", "a8/w8-tensor"]},
}

#: The guide's percentile tuning path on its own model (accuracy in %): percentile first, then bins, alternating.
GUIDE_TUNING_PATH = [
    {"step": 1, "percentile": 99.99, "bins": 2048, "accuracy": 53.75},
    {"step": 2, "percentile": 99.99, "bins": 4096, "accuracy": 54.38},
    {"step": 3, "percentile": 99.995, "bins": 4096, "accuracy": 16.25},
    {"step": 4, "percentile": 99.985, "bins": 4096, "accuracy": 32.67},
    {"step": 5, "percentile": 99.9875, "bins": 4096, "accuracy": 57.06},
    {"step": 6, "percentile": 99.9875, "bins": 8192, "accuracy": 62.84},
    {"step": 7, "percentile": 99.98875, "bins": 8192, "accuracy": 57.62},
    {"step": 8, "percentile": 99.988125, "bins": 8192, "accuracy": 63.15},
]

#: Settings beyond :data:`~calibkit.tutorial.settings.SETTINGS`: 4-bit per-channel weights, where weight observers
#: separate.
EXTRA_SETTINGS = (QuantSetting("a8/w4-ch", 8, 4, True),)

#: rank_table: a column agrees with the guide when Spearman's rho >= RHO_AGREE, disagrees when rho <= 0.
RHO_AGREE = 0.5


def setting_by_name(name: str) -> QuantSetting:
    """The :class:`QuantSetting` called ``name`` among SETTINGS and :data:`EXTRA_SETTINGS`."""
    known = {s.name: s for s in (*SETTINGS, *EXTRA_SETTINGS)}
    if name not in known:
        raise ValueError(f"setting={name!r} is unknown: use one of {sorted(known)}")
    return known[name]


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


# -- percentile: tuning gain, bins, ceiling ----------------------------------------------------------------------

def tuning_side_by_side(path: Sequence[Mapping]) -> list[dict]:
    """The kit's tuning ``path`` (:func:`~calibkit.tutorial.tuning.tune_percentile` rows) beside
    :data:`GUIDE_TUNING_PATH`, one row per step (accuracies in %; ``None`` where one path is shorter)."""
    rows = []
    for i in range(max(len(path), len(GUIDE_TUNING_PATH))):
        g = GUIDE_TUNING_PATH[i] if i < len(GUIDE_TUNING_PATH) else {}
        k = path[i] if i < len(path) else {}
        rows.append({"step": i + 1, "guide percentile": g.get("percentile"), "guide bins": g.get("bins"),
                     "guide accuracy (%)": g.get("accuracy"), "kit move": k.get("move"),
                     "kit percentile": k.get("percentile"), "kit bins": k.get("bins"),
                     "kit accuracy (%)": 100 * k["accuracy"] if k else None, "kit accepted": k.get("accepted")})
    return rows


def percentile_points(evaluators: Mapping[int, Callable], points: Sequence[tuple[float, int]], images, labels,
                      progress: bool = False) -> list[dict]:
    """Accuracy of every ``(percentile, bins)`` in ``points`` (duplicates evaluated once) with each calibration
    seed's ``evaluators[seed]`` (:func:`~calibkit.tutorial.tuning.percentile_evaluator`) on ``images`` /
    ``labels``. Rows ``{"seed", "percentile", "bins", "accuracy", "images"}``."""
    if not evaluators:
        raise ValueError("evaluators is empty: give {seed: percentile_evaluator(...)} for at least one seed")
    points = list(dict.fromkeys((float(p), int(b)) for p, b in points))
    if not points:
        raise ValueError("points is empty: give at least one (percentile, bins)")
    todo = [(s, p, b) for s in evaluators for p, b in points]
    return [{"seed": s, "percentile": p, "bins": b, "images": len(labels),
             "accuracy": float(evaluators[s](p, b, images=images, labels=labels))}
            for s, p, b in tqdm(todo, desc="percentile points", disable=not progress)]


def _accs(rows: Sequence[Mapping], percentile: float, bins: int) -> list[float]:
    out = [r["accuracy"] for r in rows if r["percentile"] == float(percentile) and r["bins"] == int(bins)]
    if not out:
        raise ValueError(f"rows hold no accuracy for percentile={percentile}, bins={bins}: run percentile_points "
                         "with that point")
    return out


def tuning_gain_check(path: Sequence[Mapping], rows: Sequence[Mapping], tuned: tuple[float, int]) -> dict:
    """``percentile_tuning_gain``: the gain of ``tuned`` over the search's start point (the first row of ``path``)
    on unseen images (``rows`` of :func:`percentile_points`); agrees when positive beyond the noise."""
    start = (path[0]["percentile"], path[0]["bins"])
    a, b, n = _accs(rows, *tuned), _accs(rows, *start), rows[0]["images"]
    gain, noise = mean(a) - mean(b), difference_noise(a, b, n)
    best = max(r["accuracy"] for r in path)
    g0, g1 = GUIDE_TUNING_PATH[0]["accuracy"], max(r["accuracy"] for r in GUIDE_TUNING_PATH)
    measured = (f"search ({len(path)} evaluations): {start[0]:g}/{start[1]} {_pct(path[0]['accuracy'])} -> "
                f"{tuned[0]:.8g}/{tuned[1]} {_pct(best)} on the search images; on {n} unseen images "
                f"(mean over {len(a)} seed(s)): {_pct(mean(b))} -> {_pct(mean(a))}, gain {100 * gain:+.2f} points; "
                f"guide: {g0} -> {g1} % ({g1 - g0:+.2f} points)")
    note = (f"gain on unseen images vs noise {100 * noise:.2f} points (binomial / seed spread of both accuracies in "
            "quadrature); the search subset's gain is partly selected noise, so only unseen images count. The "
            "guide's model was badly served by 99.99; a model already near its best at the default gains little.")
    return guide_check("percentile_tuning_gain", measured, judge(gain, noise, "positive"), note)


def bins_check(rows: Sequence[Mapping], percentile: float, bins: Sequence[int], reference: int = 2048) -> dict:
    """``bins_2048_enough``: at ``percentile``, does any bin count above ``reference`` beat it beyond the noise
    (disagrees) or not (agrees)? Fewer bins are shown but do not count against the rule."""
    n, ref = rows[0]["images"], _accs(rows, percentile, reference)
    more = [b for b in bins if b > reference]
    if not more:
        raise ValueError(f"bins={list(bins)} has no count above reference={reference}")
    best = max(more, key=lambda b: mean(_accs(rows, percentile, b)))
    gain, noise = mean(_accs(rows, percentile, best)) - mean(ref), difference_noise(_accs(rows, percentile, best),
                                                                                     ref, n)
    measured = f"percentile {percentile:.8g} on {n} unseen images: " + ", ".join(
        f"{b} bins {_pct(mean(_accs(rows, percentile, b)))}" for b in bins)
    note = (f"best count above {reference}: {best} bins, {100 * gain:+.2f} points vs noise {100 * noise:.2f} points "
            f"(both accuracies' noise in quadrature, seed spread of the difference); agrees unless more bins gain "
            f"more than the noise")
    return guide_check("bins_2048_enough", measured, judge(max(gain, 0.0), noise, "none"), note)


def calibrated_accuracies(calibrated: Mapping, setting: str, methods: Sequence[str], images, labels,
                          eval_batch_size: int = 500) -> list[dict]:
    """Accuracy on ``images`` / ``labels`` of the models :class:`KeepCalibrated` kept for ``setting`` and ``methods``
    (no calibration is repeated). Rows ``{"seed", "method", "accuracy", "images"}``."""
    keys = [k for k in calibrated if k[0] == setting and k[2] in methods]
    if not keys:
        raise ValueError(f"calibrated holds no model of {list(methods)} at setting={setting!r}: keep that setting")
    return [{"seed": seed, "method": m, "images": len(labels),
             "accuracy": evaluate(calibrated[(s, seed, m)][0], images, labels, eval_batch_size, progress=False)}
            for s, seed, m in keys]


def ceiling_check(rows: Sequence[Mapping], tuned: tuple[float, int], others: Sequence[Mapping], setting: str) -> dict:
    """``percentile_highest_ceiling``: the tuned percentile on unseen images (``rows`` of :func:`percentile_points`)
    against the best method of ``others`` (rows of :func:`calibrated_accuracies`: the other methods at their
    defaults on the same images); agrees when higher beyond the noise."""
    a, n = _accs(rows, *tuned), rows[0]["images"]
    by: dict[str, list] = {}
    for r in others:
        by.setdefault(r["method"], []).append(r["accuracy"])
    if not by or {r["images"] for r in others} != {n}:
        raise ValueError(f"others must hold accuracies on the same {n} images as rows")
    best = max(by, key=lambda m: mean(by[m]))
    diff, noise = mean(a) - mean(by[best]), difference_noise(a, by[best], n)
    measured = (f"{setting} on {n} unseen images (mean over {len(a)} seed(s)): tuned percentile {tuned[0]:.8g}/"
                f"{tuned[1]} {_pct(mean(a))}; " + ", ".join(f"{m} {_pct(mean(v))}" for m, v in by.items()))
    note = (f"tuned percentile - best other ({best}) = {100 * diff:+.2f} points vs noise {100 * noise:.2f} points "
            "(both accuracies' noise in quadrature, seed spread of the difference); the others at their defaults, "
            "never tuned on these images")
    return guide_check("percentile_highest_ceiling", measured, judge(diff, noise, "positive"), note)


# -- mix: no tuning ---------------------------------------------------------------------------------------------

def mix_check(ease_rows: Sequence[Mapping], runs: Sequence[Mapping], ease_setting: str, num_images: int,
              others: Sequence[str] = ("percentile", "mse", "kl")) -> dict:
    """``mix_no_tuning``: mix's accuracy range over its only knob (the averaging constant) against the smallest range
    of ``others`` over theirs (``ease_of_use`` rows); agrees when mix's is smaller beyond the noise. min_max is shown
    but not compared: the guide ranks it as easy as mix."""
    ranges = ease_ranges(ease_rows)
    if "mix" not in ranges or not any(m in ranges for m in others):
        raise ValueError(f"ease_rows need mix and one of {list(others)}: got {sorted(ranges)}")
    rivals = {m: ranges[m] for m in others if m in ranges}
    closest = min(rivals, key=rivals.get)
    acc = {m: [r["accuracy"] for r in runs if r["method"] == m and r["setting"] == ease_setting]
           for m in ("mix", closest)}
    if not all(acc.values()):
        raise ValueError(f"runs hold no accuracy of mix or {closest} at ease_setting={ease_setting!r}: run "
                         "compare_methods at that setting")
    diff = rivals[closest] - ranges["mix"]
    noise = math.hypot(accuracy_noise(acc["mix"], num_images), accuracy_noise(acc[closest], num_images))
    measured = f"{ease_setting}, accuracy range over each grid: " + ", ".join(
        f"{m} {100 * v:.2f}" for m, v in ranges.items()) + " points"
    note = (f"smallest rival range ({closest}) - mix's = {100 * diff:+.2f} points vs noise {100 * noise:.2f} points "
            f"(each method's accuracy noise at {ease_setting} over seeds / binomial on {num_images} images, in "
            "quadrature); min_max is not a rival (the guide ranks it as easy as mix)")
    return guide_check("mix_no_tuning", measured, judge(diff, noise, "positive"), note)


# -- the default: mse activations, min_max weights ------------------------------------------------------------

class KeepCalibrated:
    """A ``compare_methods(on_run=...)`` hook that keeps ``(prepared model, accuracy)`` of every run at
    ``settings`` in ``models[(setting, seed, method)]``, for :func:`weight_combinations` to reuse."""

    def __init__(self, settings: Sequence[str]):
        self.settings, self.models = set(settings), {}

    def __call__(self, row: Mapping, prepared: nn.Module) -> None:
        if row["setting"] in self.settings:
            self.models[(row["setting"], row["seed"], row["method"])] = (prepared, row["accuracy"])


def _weight_scales(model, setting: QuantSetting, observer: str, calib: list, example_inputs) -> dict:
    """The weight scales ``observer`` gives at ``setting`` (weights do not depend on the data: one batch)."""
    qc = get_default_qconfig("min_max", observer, weight_kwargs=None if setting.per_channel_weights else
                             {"ch_axis": None}, activation_bits=setting.activation_bits, weight_bits=setting.weight_bits)
    p = prepare(model, qc, example_inputs)
    calibrate(p, calib[:1], progress=False)
    set_fake_quantize(p, FakeQuantState.VALIDATION)
    return weight_scales(p)


def weight_combinations(model: nn.Module, calib_sets: Mapping[int, Sequence], images, labels,
                        settings: Sequence[QuantSetting], methods: Sequence[str], weight_observers: Sequence[str],
                        averaging_constant: float = 0.01, calibrated: Mapping | None = None,
                        eval_batch_size: int = 500, progress: bool = False) -> list[dict]:
    """Accuracy of every activation method x weight observer at each setting and calibration seed.

    One calibration per (seed, setting, method) with ``min_max`` weights (or the model ``calibrated`` holds for it,
    :class:`KeepCalibrated`); each other weight observer's scales are then loaded into a copy. That equals a fresh
    calibration with that weight observer: in CALIBRATION the network computes in float, so the activation scales do
    not depend on the weights' quantizer, and weight scales do not depend on the data.
    Rows ``{"setting", "seed", "activation", "weights", "accuracy"}``.
    """
    weight_observers, calibrated = list(weight_observers), dict(calibrated or {})
    for w in weight_observers:
        if not get_observer_class(w).supports_per_channel:
            raise ValueError(f"weight_observers has {w!r}, which has no per-channel mode: use e.g. min_max or mse")
    if "min_max" not in weight_observers:
        raise ValueError(f"weight_observers={weight_observers!r} must hold 'min_max' (the calibration's own)")
    sets = {seed: check_batches(calib) for seed, calib in calib_sets.items()}
    if not sets:
        raise ValueError("calib_sets is empty: give {seed: calibration batches} for at least one seed")
    first = next(iter(sets.values()))  # weight scales do not depend on the data: computed once per setting
    scales = {s.name: {w: _weight_scales(model, s, w, first, (first[0][:2],)) for w in weight_observers
                       if w != "min_max"} for s in settings}
    rows = []
    todo = [(seed, s, m) for seed in sets for s in settings for m in methods]
    for seed, s, m in tqdm(todo, desc="activation x weight observers", disable=not progress):
        got = calibrated.get((s.name, seed, m))
        if got is None:
            p = prepare(model, s.qconfig(m, averaging_constant=averaging_constant), (sets[seed][0][:2],))
            calibrate(p, sets[seed], progress=False)
            set_fake_quantize(p, FakeQuantState.VALIDATION)
            got = (p, evaluate(p, images, labels, eval_batch_size, progress=False))
        rows.append({"setting": s.name, "seed": seed, "activation": m, "weights": "min_max", "accuracy": got[1]})
        for w, ws in scales[s.name].items():
            q = deepcopy(got[0])
            qs = named_quantizers(q)
            for name, scale in ws.items():
                qs[name].load_scale(scale)
            rows.append({"setting": s.name, "seed": seed, "activation": m, "weights": w,
                         "accuracy": evaluate(q, images, labels, eval_batch_size, progress=False)})
    return rows


def combination_table(rows: Sequence[Mapping]) -> list[dict]:
    """:func:`weight_combinations` rows as one row per (setting, activation method), one column per weight observer
    (accuracy in %, mean over seeds)."""
    cells: dict[tuple, dict[str, list]] = {}
    for r in rows:
        cells.setdefault((r["setting"], r["activation"]), {}).setdefault(f"{r['weights']} weights (%)", []).append(
            100 * r["accuracy"])
    return [{"setting": s, "activation": m, **{k: mean(v) for k, v in cols.items()}} for (s, m), cols in cells.items()]


def default_check(rows: Sequence[Mapping], num_images: int, default: tuple[str, str] = ("mse", "min_max")) -> dict:
    """``default_mse_min_max``: per setting, does any other (activation, weights) combination beat ``default`` beyond
    the noise? Disagrees if one does at some setting, else agrees (the default is as good as the best)."""
    by: dict[str, dict[tuple, list]] = {}
    for r in rows:
        by.setdefault(r["setting"], {}).setdefault((r["activation"], r["weights"]), []).append(r["accuracy"])
    parts, notes, verdicts = [], [], []
    for s, combos in by.items():
        if default not in combos:
            raise ValueError(f"rows hold no {default} combination at setting {s!r}")
        d = combos[default]
        best = max((c for c in combos if c != default), key=lambda c: mean(combos[c]))
        gain, noise = mean(combos[best]) - mean(d), difference_noise(combos[best], d, num_images)
        verdicts.append(judge(max(gain, 0.0), noise, "none"))
        parts.append(f"{s}: default {_pct(mean(d))}, best other {best[0]}/{best[1]} {_pct(mean(combos[best]))}")
        notes.append(f"{s}: best other - default {100 * gain:+.2f} vs noise {100 * noise:.2f} points")
    verdict = "disagrees" if "disagrees" in verdicts else "agrees"
    note = ("; ".join(notes) + f" ({num_images} images, mean over seeds; noise: both accuracies' noise in quadrature, "
            "seed spread of the difference); disagrees where another combination beats the default beyond the noise")
    return guide_check("default_mse_min_max", "; ".join(parts), verdict, note)


# -- the rank table --------------------------------------------------------------------------------------------

def rank_check(summary: Mapping[str, Mapping]) -> dict:
    """``rank_table``: per column Spearman's rho between the kit's and the guide's ranks (``comparison.agreement``):
    agrees at rho >= :data:`RHO_AGREE`; disagrees at rho <= 0 unless every rank that differs from the guide's is
    within noise of another method (then inconclusive); inconclusive in between or when rho is undefined. The table
    agrees when every column does, disagrees when one does, else inconclusive."""
    rho, dis = agreement(summary), disagreements(summary)
    verdicts = {}
    for col, r in rho.items():
        if r is None or 0 < r < RHO_AGREE:
            verdicts[col] = "inconclusive"
        elif r >= RHO_AGREE:
            verdicts[col] = "agrees"
        else:
            mine = [d for d in dis if d["column"] == col]
            verdicts[col] = "inconclusive" if mine and all(d["within_noise_of"] for d in mine) else "disagrees"
    overall = ("disagrees" if "disagrees" in verdicts.values() else
               "agrees" if all(v == "agrees" for v in verdicts.values()) else "inconclusive")
    measured = "Spearman rho: " + ", ".join(f"{c} {'undefined' if r is None else f'{r:+.2f}'}" for c, r in rho.items())
    outside = sum(1 for d in dis if not d["within_noise_of"])
    note = ("per column: " + ", ".join(f"{c} {v}" for c, v in verdicts.items()) +
            f" (agrees at rho >= {RHO_AGREE}, disagrees at rho <= 0 unless every differing rank is within noise); "
            f"{len(dis)} rank(s) differ from the guide, {outside} of them outside the seed-to-seed noise "
            "(0 noise with one seed)")
    return guide_check("rank_table", measured, overall, note)
