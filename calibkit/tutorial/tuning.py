"""The percentile tuning search of notebook 04 (docs/methods.md#percentile-tuning).

The rule, as the docs give it: fix the percentile first (step it up and down while accuracy improves), then the
number of bins (double it while accuracy improves), alternate, and halve the percentile step each round until
nothing improves any more. :func:`tune_percentile` runs it on any ``evaluate_fn(percentile, bins) -> accuracy``;
:func:`percentile_evaluator` builds a fast one from statistics collected once, and :func:`exclude_subset` gives the
validation images the search never saw.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from calibkit.checks import check_int, check_number
from calibkit.quant.calibrate import calibrate, evaluate
from calibkit.quant.fake_quantize import FakeQuantState, set_fake_quantize
from calibkit.quant.observers import check_percentile
from calibkit.quant.prepare import prepare
from calibkit.tutorial.settings import SETTINGS, QuantSetting, check_batches, example_inputs_of

__all__ = ["tune_percentile", "percentile_evaluator", "exclude_subset"]


def _check_search(start_percentile, step_space, start_bins, max_bins, max_evals, patience, min_gain) -> float:
    """Every argument check of :func:`tune_percentile`; returns the start percentile."""
    p = check_percentile(start_percentile)
    if step_space not in ("linear", "nines"):
        raise ValueError(f"step_space={step_space!r} is unknown: use 'linear' or 'nines'")
    check_int("start_bins", start_bins, 2)
    check_int("max_bins", max_bins, start_bins, why=" (it must be at least start_bins)")
    check_int("max_evals", max_evals, 1)
    check_int("patience", patience, 1)
    check_number("min_gain", min_gain, 0)
    if step_space == "nines" and p == 100.0:
        raise ValueError("start_percentile=100 has infinitely many nines: use step_space='linear' or a value < 100")
    return p


def _first_step(p: float, step_space: str, percentile_step: float | None) -> float:
    """The first percentile step: given, or ``(100 - p) / 2`` (linear; 0.005 at p = 100), or half a nine."""
    if percentile_step is not None:
        return check_number("percentile_step", percentile_step, 0, math.inf, low_open=True, high_open=True)
    if step_space == "nines":
        return 0.5
    return (100.0 - p) / 2 or 0.005


def _moved(q: float, direction: int, step: float, step_space: str) -> float:
    """``q`` moved by ``step`` up (``direction`` 1) or down (-1), in percent or in nines (``-log10(1 - q/100)``)."""
    if step_space == "linear":
        return q + direction * step
    if q >= 100:
        return math.inf
    nines = -math.log10(1.0 - q / 100.0) + direction * step
    return 100.0 * (1.0 - 10.0 ** (-nines))


class _Search:
    """The search state: every evaluated point (``rows``), the best accepted one (``p``, ``bins``, ``best``)."""

    def __init__(self, evaluate_fn: Callable[[float, int], float], max_evals: int, min_gain: float):
        self.evaluate_fn, self.max_evals, self.min_gain = evaluate_fn, max_evals, min_gain
        self.rows: list[dict] = []
        self.seen: set[tuple[float, int]] = set()
        self.best, self.p, self.bins = -math.inf, math.nan, 0

    @property
    def budget_left(self) -> bool:
        return len(self.rows) < self.max_evals

    def try_point(self, q: float, bins: int, move: str) -> bool:
        """Evaluate ``(q, bins)`` unless already seen or out of budget; accept it (and return True) when it
        beats the best accuracy so far by more than ``min_gain`` (the first point is always accepted)."""
        key = (round(q, 12), bins)
        if key in self.seen or not self.budget_left:
            return False
        acc = float(self.evaluate_fn(q, bins))
        if not math.isfinite(acc):
            raise ValueError(f"evaluate_fn({q}, {bins}) returned {acc}: it must return a finite accuracy")
        self.seen.add(key)
        ok = acc > self.best + self.min_gain or not self.rows
        if ok:
            self.best, self.p, self.bins = acc, q, bins
        self.rows.append({"step": len(self.rows) + 1, "percentile": q, "bins": bins, "accuracy": acc, "accepted": ok,
                          "move": move, "best_accuracy": self.best})
        return ok


def _percentile_phase(search: _Search, step: float, step_space: str, direction: int) -> int | None:
    """Bins fixed: step the percentile in ``direction`` while that is accepted; if the first step is not, try the
    other direction. Returns the direction that helped, or ``None``."""
    for d in (direction, -direction):
        went = False
        while search.budget_left:
            q = _moved(search.p, d, step, step_space)
            if not (0.0 < q <= 100.0) or not search.try_point(q, search.bins, "percentile+" if d > 0 else "percentile-"):
                break
            went = True
        if went:
            return d
    return None


def _bins_phase(search: _Search, max_bins: int) -> bool:
    """Percentile fixed: double the bins (up to ``max_bins``) while that is accepted. True if it helped."""
    improved = False
    while search.bins * 2 <= max_bins and search.try_point(search.p, search.bins * 2, "bins x2"):
        improved = True
    return improved


def tune_percentile(evaluate_fn: Callable[[float, int], float], start_percentile: float = 99.99, start_bins: int = 2048,
                    percentile_step: float | None = None, step_space: str = "linear", max_bins: int = 16384,
                    max_evals: int = 30, patience: int = 2, min_gain: float = 0.0) -> list[dict]:
    """Alternating percentile / bins search (docs/methods.md#percentile-tuning) on any
    ``evaluate_fn(percentile, bins) -> accuracy``.

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
    path 99.99 -> 99.995 / 99.985 -> 99.9875 ... ``"nines"`` steps ``-log10(1 - p/100)`` (the
    number of nines; default first step 0.5), which treats 99.9 -> 99.99 like 99.99 -> 99.999 and
    reaches far-away optima in fewer evaluations.

    Because a point is accepted only when it beats the best accuracy seen, the accepted accuracies
    are strictly increasing even when ``evaluate_fn`` is noisy -- but then part of the gain is
    selection on noise: tune on one subset and report the result on data the search did not see.

    Returns rows ``{"step", "percentile", "bins", "accuracy", "accepted", "move", "best_accuracy"}`` (step =
    1-based evaluation order; ``move``: "start", "percentile+", "percentile-" or "bins x2";
    ``best_accuracy``: the best accepted accuracy after this step).
    """
    p = _check_search(start_percentile, step_space, start_bins, max_bins, max_evals, patience, min_gain)
    step = _first_step(p, step_space, percentile_step)
    search = _Search(evaluate_fn, max_evals, min_gain)
    search.try_point(p, start_bins, "start")
    idle, direction = 0, 1
    while search.budget_left and idle < patience:
        helped = _percentile_phase(search, step, step_space, direction)
        direction = helped or direction
        improved = _bins_phase(search, max_bins) or helped is not None
        step /= 2
        idle = 0 if improved else idle + 1
    return search.rows


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

    calib = check_batches(calib)
    prepared = prepare(model, setting.qconfig("percentile", averaging_constant=averaging_constant),
                       example_inputs_of(example_inputs, calib))
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
