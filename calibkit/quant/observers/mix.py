"""``mix``: the percentile setting whose clip has the least measured L2 error (docs/methods.md#mix)."""

from __future__ import annotations

import torch

from calibkit.quant.numerics import scale_from_amax
from calibkit.quant.observers.base import BatchClipObserver
from calibkit.quant.order_statistics import abs_order_statistics, percentile_ranks
from calibkit.quant.squared_error import squared_errors


class MixObserver(BatchClipObserver):
    """``mix``: per batch, the percentile setting whose clip has the least *measured* L2 error.

    No parameters to tune besides ``bits``, ``averaging_constant``, ``ch_axis`` (see :class:`ObserverBase`; per
    channel supported). Candidates are exact percentiles of ``|x|`` (order statistics, rank ``ceil(p/100 * N)``,
    see :func:`calibkit.quant.order_statistics.abs_order_statistics`) for ``PERCENTILES`` = 99 %, then tail
    fractions ``10**(-2 - j/4)`` down to 99.99999 %, and 100 % (the max). The L2 quantize-dequantize error
    ``sum((x - qdq(x))**2)`` is measured on the batch for the ``COARSE`` settings, then for the settings two and
    one grid steps on either side of the best so far (10 measured settings at most); the least measured error
    wins (ties keep the earlier best). A few rare huge values that carry most of the error keep ``mix`` at the
    max, where a fixed percentile clips them. The clip is moving-averaged. See docs/methods.md#mix.
    """

    name = "mix"
    PERCENTILES = tuple(100.0 - 10.0 ** (-j / 4) for j in range(21)) + (100.0,)
    COARSE = (0, 4, 8, 12, 16, 21)

    def _batch_clip(self, x2d: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        C, N = x2d.shape
        clips = abs_order_statistics(x2d, percentile_ranks(self.PERCENTILES, N).to(x2d.device))   # [C, P]
        last = len(self.PERCENTILES) - 1

        def errors(idx: torch.Tensor) -> torch.Tensor:
            return squared_errors(x2d, scale_from_amax(clips.gather(1, idx), self.bits), self.bits)

        idx = torch.tensor(self.COARSE, device=x2d.device).expand(C, -1)
        best_err, pos = errors(idx).min(1)
        best = idx.gather(1, pos[:, None])[:, 0]
        for step in (2, 1):
            idx = torch.stack([best - step, best + step], 1).clamp_(0, last)
            err, pos = errors(idx).min(1)
            better = err < best_err
            best = torch.where(better, idx.gather(1, pos[:, None])[:, 0], best)
            best_err = torch.where(better, err, best_err)
        return clips.gather(1, best[:, None])[:, 0]
