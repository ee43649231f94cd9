"""``percentile``: the clip where the cumulative histogram of ``|x|`` reaches a percentile
(docs/methods.md#percentile)."""

from __future__ import annotations

import torch

from calibkit.quant.histogram import MAX_BINS, abs_histogram, percentile_from_histogram
from calibkit.quant.observers.base import BatchClipObserver, check_int_range, check_percentile


class PercentileObserver(BatchClipObserver):
    """``percentile``: per batch, the clip where the cumulative histogram of ``|x|`` reaches ``percentile`` %.

    Per batch, a histogram of ``|x|`` with ``bins`` equal bins over ``[0, max|x|]`` (int64 counts, last bin
    closed); the clip is where the cumulative count reaches ``percentile / 100 * N``, interpolated linearly
    inside that bin (see :func:`calibkit.quant.histogram.percentile_from_histogram`), so ``percentile=100`` is
    exactly the batch max. The clip is moving-averaged.

    Args:
        percentile: a number in (0, 100] (default 99.99); 100 gives the batch max.
        bins: histogram bins over ``[0, max|x|]`` of each batch, an integer in [2, 2**20] (default 2048).
        bits, averaging_constant, ch_axis: see :class:`ObserverBase` (per channel supported).

    See docs/methods.md#percentile and docs/methods.md#percentile-tuning.
    """

    name = "percentile"

    def __init__(self, bits: int = 8, averaging_constant: float = 0.01, ch_axis: int | None = None,
                 percentile: float = 99.99, bins: int = 2048):
        super().__init__(bits, averaging_constant, ch_axis)
        self.percentile = check_percentile(percentile)
        self.bins = check_int_range("bins", bins, 2, MAX_BINS)

    def _batch_clip(self, x2d: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        counts = abs_histogram(x2d, amax, self.bins, self._batch_nonnegative())
        return percentile_from_histogram(counts, amax, self.percentile)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", percentile={self.percentile}, bins={self.bins}"
