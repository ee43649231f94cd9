"""``mse``: the shrunk clip with the least L2 quantize-dequantize error on each batch (docs/methods.md#mse)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from calibkit.quant.histogram import signed_histogram
from calibkit.quant.numerics import MIN_SCALE, scale_from_amax
from calibkit.quant.observers.base import BatchClipObserver, check_int_range
from calibkit.quant.squared_error import squared_error_bound_tables, squared_error_table, squared_errors

#: Relative slack of every comparison of bounds and measured errors (float rounding of their sums).
SLACK = 1e-5


class _Bounds(NamedTuple):
    """Guaranteed float64 ``[C]`` bounds of the L2 error on the batch: of ``k = 0`` and of the best candidate."""

    lower0: torch.Tensor
    upper0: torch.Tensor
    lower_best: torch.Tensor
    upper_best: torch.Tensor


class MSEObserver(BatchClipObserver):
    """``mse``: per batch, the clip ``max|x| * (1 - k/100)`` with the least L2 error ``sum((x - qdq(x))**2)``.

    Args:
        stride: step of ``k`` over ``0, stride, 2*stride, ... <= 95``, an integer in [1, 95] (default 1).
        bits, averaging_constant, ch_axis: see :class:`ObserverBase` (per channel supported).

    1. *Score*: a signed histogram (``SCORE_BINS`` bins per sign) scores every candidate at once with the
       closed-form error table of :func:`calibkit.quant.squared_error.squared_error_table` (for values spread
       evenly in a bin: the rounding sawtooth inside the range plus the clipping parabola outside), one matrix
       product. Bin ``[0, w)``, home of the exact zeros (no error for any candidate), is left out. The first
       minimum wins, so ties go to the larger clip.
    2. *Decide*: the best-scored candidate replaces ``k = 0`` (the ``min_max`` clip) only if its L2 error on the
       batch is smaller (ties keep ``k = 0``). Guaranteed lower and upper bounds of both errors, read from the
       same histogram (:func:`calibkit.quant.squared_error.squared_error_bound_tables`), settle that where they
       do not overlap; otherwise the errors are measured on the batch.

    Hence, on its batch, ``mse`` never has a larger L2 error than ``min_max``; it usually costs one histogram
    pass plus at most one quantize-dequantize pass. The clip is moving-averaged. See docs/methods.md#mse.
    """

    name = "mse"
    SCORE_BINS = 2048
    #: Per tensor, the histogram is counted with ``BOUND_REFINE`` times finer bins: the scores use it summed
    #: back to ``SCORE_BINS`` (exactly the coarse histogram, since the bin edges nest), the error bounds use
    #: the fine bins, which makes them about ``BOUND_REFINE`` times tighter, so they settle the comparison
    #: with ``k = 0`` far more often. Per channel (``C`` rows) the coarse bins are kept (``C`` fine histograms
    #: would not stay in cache); the decision is the same either way, only its cost differs.
    BOUND_REFINE = 4
    MAX_SHRINK_PERCENT = 95

    def __init__(self, bits: int = 8, averaging_constant: float = 0.01, ch_axis: int | None = None, stride: int = 1):
        super().__init__(bits, averaging_constant, ch_axis)
        self.stride = check_int_range("stride", stride, 1, self.MAX_SHRINK_PERCENT)
        self.shrinks = tuple(1.0 - k / 100.0 for k in range(0, self.MAX_SHRINK_PERCENT + 1, self.stride))

    def _batch_clip(self, x2d: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        fine = self._histogram(x2d, amax)
        score = self._scores(fine, amax.device)                                         # [C, K]
        best = score.argmin(1)                            # first minimum: ties go to the larger clip
        if not bool(best.any()):  # k = 0 (the min_max clip) scored best everywhere
            return amax
        best_clip = amax * self._tables(amax.device)[1].index_select(0, best)
        take_best = self._beats_min_max(x2d, fine, amax, best, best_clip, score)
        return torch.where(take_best, best_clip, amax)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stride={self.stride}"

    # -- 1. score every candidate from the histogram ------------------------------------------------
    def _histogram(self, x2d: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        """The batch's signed histogram: ``SCORE_BINS`` per sign, ``BOUND_REFINE`` times finer per tensor."""
        B = self.SCORE_BINS
        refine = self.BOUND_REFINE if x2d.shape[0] == 1 else 1
        if refine > 1 and not bool(torch.isfinite(B * refine / amax.float()).all()):
            refine = 1  # amax ~1e-35: finer bins would overflow where the scoring bins do not (no longer nested)
        return signed_histogram(x2d, amax, B * refine, nonnegative=self._batch_nonnegative())

    def _scores(self, fine: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Estimated L2 error of every candidate (float32 ``[C, K]``, units of ``amax**2``) from the histogram."""
        B = self.SCORE_BINS
        refine = fine.shape[1] // (2 * B)
        counts = fine if refine == 1 else fine.view(-1, 2 * B, refine).sum(2)  # nested edges: exact
        table, _, order = self._tables(device)
        scored = counts.index_select(1, order)                                          # |x| bins: +, -
        # Bin [0, w) is left out of the scores: it holds the exact zeros (ReLU), which have no error
        # for any candidate; its other values are few and tiny, their error ~constant over candidates.
        scored[:, 0] = 0
        return torch.stack([_row_scores(row, table) for row in scored])

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """On ``device``, built once per observer (not state): the float32 error table ``[2B, K]``, the
        candidate shrinks ``[K]``, and the int64 order ``[2B]`` that turns a signed histogram into the
        table's row order (``|x|`` bins of the positive values, then of the negative ones)."""
        key = (device, self.bits, self.shrinks)
        cached = self.__dict__.get("_table_cache")
        if cached is None or cached[0] != key:
            B = self.SCORE_BINS
            table = squared_error_table(self.bits, B, self.shrinks, device, torch.float32)
            order = torch.cat([torch.arange(B, 2 * B), torch.arange(B - 1, -1, -1)]).to(device)
            cached = (key, table, torch.tensor(self.shrinks, dtype=torch.float32, device=device), order)
            self.__dict__["_table_cache"] = cached
        return cached[1:]

    # -- 2. decide, exactly, whether the best candidate beats k = 0 ----------------------------------
    def _beats_min_max(self, x2d, fine, amax, best, best_clip, score) -> torch.Tensor:
        """Per row, exactly whether the best candidate's L2 error on the batch is below that of ``k = 0``: settled
        by the histogram's guaranteed bounds where they do not overlap, else by measuring the errors."""
        scale0, scale_best = scale_from_amax(amax, self.bits), scale_from_amax(best_clip, self.bits)
        bounds = self._bounds(fine, amax, best, scale0, scale_best)
        if bounds is None:
            err0, err_best = _measure(x2d, self.bits, scale0, scale_best)
            return err_best < err0
        take_best = bounds.upper_best * (1 + SLACK) <= bounds.lower0
        undecided = ~take_best & (bounds.lower_best < bounds.upper0 * (1 + SLACK))
        if not bool(undecided.any()):
            return take_best
        est_best = score.gather(1, best[:, None])[:, 0].double() * amax.double() ** 2
        return self._measured_decision(x2d, bounds, take_best, undecided, est_best, scale0, scale_best)

    def _bounds(self, counts, amax, best, scale0, scale_best) -> _Bounds | None:
        """The error bounds of ``k = 0`` and of the best candidate from the cached bound tables for the signed
        histogram ``counts`` ``[C, 2B]`` (any ``B``), or None where those do not apply (a scale clamped at
        ``MIN_SCALE``, or ``bins / amax`` overflowing float32). One row: tables of just the two candidates (the
        fine bins make a table of all of them large); several rows: the table of every candidate."""
        bins = counts.shape[1] // 2
        if not (bool((scale_best > MIN_SCALE).all()) and bool(torch.isfinite(bins / amax).all())):
            return None
        if counts.shape[0] == 1:
            shrinks, rows = (self.shrinks[0], self.shrinks[int(best[0])]), best.new_ones(1)
        else:
            shrinks, rows = self.shrinks, best
        lo_t, hi_t = squared_error_bound_tables(self.bits, bins, shrinks, device=amax.device)
        c = counts.double()
        lo = torch.stack([c @ lo_t[0], (c * lo_t.index_select(0, rows)).sum(1)], 1)        # [C, 2]: k = 0, best
        hi = torch.stack([c @ hi_t[0], (c * hi_t.index_select(0, rows)).sum(1)], 1)
        s2 = torch.stack([scale0, scale_best], 1).double() ** 2
        lo, hi = lo * s2, hi * s2
        return _Bounds(lo[:, 0] * (1 - SLACK), hi[:, 0], lo[:, 1], hi[:, 1])

    def _measured_decision(self, x2d, bounds: _Bounds, take_best, undecided, est_best, scale0, scale_best
                           ) -> torch.Tensor:
        """Settles the rows the bounds left undecided by measuring: the best candidate alone, which settles a row
        if its error falls outside ``k = 0``'s bounds; both clips in one pass where the score ``est_best``
        (close to the error) predicts that it will not, or where measuring the best alone did not settle it."""
        if bool(((est_best > bounds.lower0) & (est_best < bounds.upper0) & undecided).any()):
            err0, err_best = _measure(x2d, self.bits, scale0, scale_best)
        else:
            (err_best,) = _measure(x2d, self.bits, scale_best)
            take_best = take_best | (undecided & (err_best * (1 + SLACK) <= bounds.lower0))
            undecided = undecided & ~take_best & (err_best < bounds.upper0 * (1 + SLACK))
            if not bool(undecided.any()):
                return take_best
            (err0,) = _measure(x2d, self.bits, scale0)
        return torch.where(undecided, err_best < err0, take_best)


def _row_scores(counts: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Estimated error of every candidate (float32 ``[K]``) for one row of ``|x|`` bin counts.

    float32 (the estimate itself is good to ~0.1 %; the float32 table stays in cache); one row
    at a time so that a channel scores exactly as the same data would per tensor."""
    used = torch.nonzero(counts)[:, 0]
    if used.numel() <= 256:  # small tensors: only the non-empty bins
        return (counts.index_select(0, used).float()[:, None] * table.index_select(0, used)).sum(0)
    return counts.float() @ table


def _measure(x2d: torch.Tensor, bits: int, *scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The exact L2 errors (float64 ``[C]`` each) of one or two per-row scales, measured in one pass."""
    return squared_errors(x2d, torch.stack(scales, 1), bits).unbind(1)
