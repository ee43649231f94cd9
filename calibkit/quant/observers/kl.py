"""``kl``: TensorRT-style entropy calibration on a histogram of ``|x|`` accumulated over batches
(docs/methods.md#kl)."""

from __future__ import annotations

import math
import warnings

import torch

from calibkit.errors import CalibrationError
from calibkit.quant import distributed
from calibkit.quant.accumulating_histogram import AccumulatingHistogram
from calibkit.quant.histogram import MAX_BINS
from calibkit.quant.kl_search import abs_histogram_l2, kl_threshold_bins
from calibkit.quant.observers.base import ObserverBase, check_int_range


class LeftOutBatchesWarning(UserWarning):
    """A kl threshold was read while the batches after its last search were not yet searched
    (``steps`` is not a multiple of ``update_interval``): those batches are in the histogram but not in the
    threshold (docs/methods.md#kl)."""


class KLObserver(ObserverBase):
    """``kl``: the clip ``min(i * width, max|x|)`` whose kept bins ``i`` minimize ``KL(P_i || Q_i)``.

    One histogram of ``|x|`` collects every batch (:class:`~calibkit.quant.accumulating_histogram.
    AccumulatingHistogram`: power-of-two bin width, exact growth and pair merging, at most ``8 * bins`` bins).
    Every ``update_interval`` steps, inside ``forward``, all candidate thresholds ``i = 2**(bits-1) .. L`` are
    searched at once (:func:`calibkit.quant.kl_search.kl_divergences`): ``P_i`` is the first ``i`` bins with
    the clipped mass added to bin ``i - 1``, ``Q_i`` merges them into ``2**(bits-1)`` groups spread evenly over
    their non-empty bins; ties go to the widest range. Each search result is one sample of the moving average
    (the first sets it). Before the search, bin 0 (``[0, width)``) gets the count of bin 1 (as in NVIDIA
    ModelOpt): it holds the exact zeros of ReLU outputs, which every grid represents exactly and which would
    otherwise dominate the divergence; for smooth densities of ``|x|`` bins 0 and 1 hold about the same count.
    Search cost ``O(L * 2**(bits-1))`` for ``L <= 8 * bins`` bins.

    *Fallback* (docs/methods.md#kl): the search only means something when the histogram shows the grid's rounding
    error. With few distinct values (``Q`` spreads each group over its non-empty bins, so a histogram of isolated
    bins looks unharmed by any grid) it sees only the clipping and clips far too hard (the 1 x 1 outputs of
    squeeze-excitation layers: a few hundred values in a few dozen bins, clipped at ~5 % of their max). So a search
    whose histogram has fewer than ``MIN_USED_BINS_PER_LEVEL * 2**(bits-1)`` non-empty bins above bin 0 (too
    little spread) or fewer than ``MIN_VALUES_PER_LEVEL * 2**(bits-1)`` values above bin 0 (too few values) keeps
    the max: its sample is ``max|x|`` seen so far. So does a search whose clip *collapses*: its estimated L2 error
    (:func:`calibkit.quant.kl_search.abs_histogram_l2`, from the histogram) exceeds ``COLLAPSE_RATIO`` times that of
    the max *and* it clips at least ``MIN_CLIPPED`` values: those are then a population (one channel sitting at
    the max, the search clipping just below it), not the rare outliers entropy calibration means to cut.
    :attr:`fallback` says why the last search fell back (``None`` after an entropy search); ``fallbacks`` counts
    them.

    Args:
        bins: resolution of the first batch's range (the power-of-two bin width just below
            ``max|x| / bins``); an integer in [2**(bits-1) + 1, 2**20] (default 2048): the search needs
            more bins than the ``2**(bits-1)`` quantization levels per sign.
        update_interval: search for the threshold every this many steps (an integer >= 1, default 1);
            it must not exceed the number of calibration steps, else no threshold exists and reading
            the qparams raises :class:`CalibrationError`.
        bits, averaging_constant: see :class:`ObserverBase`. Per tensor only (``ch_axis=None``).

    Reading the threshold (``get_amax`` / ``calculate_qparams``) does not search: after ``n`` steps the threshold
    comes from the ``n // update_interval`` searches, and the last ``n % update_interval`` batches are left out of
    it. In eval mode (calibration and validation; ``calibrate`` requires it) such a read warns
    (:class:`LeftOutBatchesWarning`, once per step count) naming ``update_interval``, the batches left out and
    the remedy; in train mode (QAT, where the scale follows the searches as they come) it does not. The scale
    is the same either way.

    Buffers: ``amax``, ``steps``, ``searches`` (saved); the histogram is not saved, so calibrating again after
    loading starts a new one. See docs/methods.md#kl.
    """

    name = "kl"
    supports_per_channel = False
    #: Fallback to the max below this many non-empty bins above bin 0 per quantization level (class docstring).
    MIN_USED_BINS_PER_LEVEL = 1
    #: Fallback to the max below this many values above bin 0 per quantization level (class docstring).
    MIN_VALUES_PER_LEVEL = 4
    #: Fallback to the max when the entropy clip's estimated L2 error exceeds this multiple of the max's.
    COLLAPSE_RATIO = 4.0
    #: ... and it clips at least this many values (fewer are outliers, which the entropy clip is meant to cut).
    MIN_CLIPPED = 16

    def __init__(self, bits: int = 8, averaging_constant: float = 0.01, ch_axis: None = None,
                 bins: int = 2048, update_interval: int = 1):
        super().__init__(bits, averaging_constant, ch_axis)
        levels = 2 ** (self.bits - 1)
        self.bins = check_int_range("bins", bins, levels + 1, MAX_BINS,
                                    f" for the kl observer at bits={self.bits} (it needs more bins than the "
                                    f"2**(bits-1) = {levels} quantization levels per sign)")
        self.update_interval = check_int_range("update_interval", update_interval, 1)
        self.register_buffer("searches", torch.tensor(0, dtype=torch.int64))
        self.histogram = AccumulatingHistogram(self.bins)
        self._warned_at = -1  # the step count of the last LeftOutBatchesWarning (not state)
        #: Why the last search kept the max instead of searching (``None``: an entropy search, or none yet).
        self.fallback: str | None = None
        #: Number of searches that kept the max (since the last ``reset``).
        self.fallbacks = 0

    def _scans_input(self, x: torch.Tensor) -> bool:
        # after the first batch, the compiled kernel bins a CPU float32 batch and finds its max and NaN/Inf in one pass
        # (one process only: under torch.distributed the batch max is shared before binning)
        return distributed.world_size() == 1 and self.histogram.native_ready(x)

    def _observe_ranks(self, x: torch.Tensor) -> None:
        """Under ``torch.distributed`` (docs/methods.md#many-processes): the ranks share their batch's max ``|x|`` and
        size, so each knows the histogram's width and length after every rank's batch; each bins its batch at its
        own, the counts are gathered and added rank by rank, with the searches due in between: the histograms and
        searches of one process fed the batches step by step, rank by rank."""
        lo, hi = self._batch_minmax
        own = torch.stack([torch.maximum(-lo, hi).double(), torch.tensor(float(x.numel()), dtype=torch.float64,
                                                                          device=lo.device)])
        info = distributed.gather_in_step_order(own).tolist()
        plan = self.histogram.plan([a for a, _ in info])
        length = max((p[1] for p in plan if p is not None), default=1)
        counts = torch.zeros(length, dtype=torch.int64, device=x.device)
        mine = plan[distributed.rank()]
        if mine is not None:
            counts[:mine[1]] = self.histogram.counts_at(x, *mine, nonnegative=float(lo) >= 0)
        for (amax, n), batch_counts in zip(info, distributed.gather_in_step_order(counts)):
            self.histogram.add_counts(batch_counts, amax, int(n))
            if (int(self.steps) + 1) % self.update_interval == 0:
                self._search()
            self.steps += 1

    def _observe(self, x: torch.Tensor) -> None:
        self.histogram.add(x, self._tensor_minmax(), owner=type(self).__name__)
        if (int(self.steps) + 1) % self.update_interval == 0:
            self._search()

    def _search(self) -> None:
        """One search over the histogram so far; its clip is one sample of the moving average."""
        clip, self.fallback = self._clip(self.histogram)
        if self.fallback is not None:
            self.fallbacks += 1
        new = torch.tensor(clip, dtype=torch.float32, device=self.amax.device)
        self.amax = new if int(self.searches) == 0 else self.amax + self.averaging_constant * (new - self.amax)
        self.searches += 1

    def min_used_bins(self) -> int:
        """Non-empty bins above bin 0 a histogram needs for an entropy search (see the class docstring)."""
        return self.MIN_USED_BINS_PER_LEVEL * 2 ** (self.bits - 1)

    def min_values(self) -> int:
        """Values above bin 0 a histogram needs for an entropy search (see the class docstring)."""
        return self.MIN_VALUES_PER_LEVEL * 2 ** (self.bits - 1)

    def _fallback_reason(self, counts: torch.Tensor) -> str | None:
        """Why the histogram ``counts`` is unfit for an entropy search, or None (the rule of the class docstring)."""
        above = counts[1:]
        used, values = int(torch.count_nonzero(above)), int(above.sum())
        if used < self.min_used_bins():
            return f"too little spread: {used} non-empty bins < {self.min_used_bins()}; kept the max"
        if values < self.min_values():
            return f"too few values: {values} < {self.min_values()}; kept the max"
        return None

    def _clip(self, hist: AccumulatingHistogram) -> tuple[float, str | None]:
        """This search's clip and, where it kept the max instead of the entropy clip, why (the class docstring)."""
        if hist.counts is None:
            return 0.0, None
        reason = self._fallback_reason(hist.counts)
        if reason is None:
            counts = hist.counts.clone()
            if counts.numel() > 1:
                counts[0] = counts[1]  # bin 0 holds the exact zeros (ReLU): see the class docstring
            clip = min(kl_threshold_bins(counts, 2 ** (self.bits - 1)) * hist.width, hist.max_value)
            reason = self._collapse_reason(hist, clip)
            if reason is None:
                return clip, None
        return hist.max_value, reason

    def _collapse_reason(self, hist: AccumulatingHistogram, clip: float) -> str | None:
        """Why the entropy ``clip`` collapsed (its estimated L2 error exceeds ``COLLAPSE_RATIO`` times the max's
        and it cuts at least ``MIN_CLIPPED`` values), or None."""
        if clip >= hist.max_value or clip <= 0:
            return None
        err_clip, err_max = abs_histogram_l2(hist.counts, hist.width, [clip, hist.max_value], self.bits).tolist()
        clipped = int(hist.counts[math.ceil(clip / hist.width):].sum())
        if err_clip <= self.COLLAPSE_RATIO * err_max or clipped < self.MIN_CLIPPED:
            return None
        return (f"collapse: the entropy clip {clip:.4g} cuts {clipped} values and has "
                f"{err_clip / max(err_max, 1e-300):.3g} x the estimated L2 error of the max {hist.max_value:.4g}; "
                "kept the max")

    def _require_data(self) -> None:
        super()._require_data()
        if int(self.searches) == 0:
            raise CalibrationError(
                f"update_interval={self.update_interval} is larger than the {int(self.steps)} calibration steps run: "
                "use update_interval <= number of calibration steps")

    def get_amax(self) -> torch.Tensor:
        """Clipping threshold (float32 ``[]``) from the searches so far; warns when batches after the last search
        are left out (class docstring)."""
        amax = super().get_amax()
        self._warn_left_out()
        return amax

    def left_out(self) -> int:
        """Batches observed after the last search, which the threshold does not include: ``steps % update_interval``."""
        return int(self.steps) % self.update_interval

    def _warn_left_out(self) -> None:
        steps, left = int(self.steps), self.left_out()
        if left == 0 or self.training or self._warned_at == steps:
            return
        self._warned_at = steps
        warnings.warn(
            f"kl observer: update_interval={self.update_interval} leaves the last {left} of {steps} calibration "
            f"batches out of the threshold (it was searched after batch {steps - left}); use an update_interval that "
            f"divides the number of calibration batches, or a multiple of {self.update_interval} batches",
            LeftOutBatchesWarning, stacklevel=3)

    def reset(self) -> None:
        super().reset()
        self._warned_at = -1
        self.searches.zero_()
        self.histogram.reset()
        self.fallback, self.fallbacks = None, 0

    def extra_repr(self) -> str:
        rule = (f"fallback to max below {self.min_used_bins()} used bins or {self.min_values()} values or above "
                f"{self.COLLAPSE_RATIO:g} x its L2 error with >= {self.MIN_CLIPPED} values clipped")
        last = f", last search: {self.fallback}" if self.fallback else ""
        return (super().extra_repr() + f", bins={self.bins}, update_interval={self.update_interval}, {rule}"
                f"{last}, fallbacks={self.fallbacks}")
