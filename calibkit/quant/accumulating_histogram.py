"""The ``kl`` observer's histogram of ``|x|``, accumulated over every batch with exact range growth.

The bin width is a power of two, so bin edges are exact binary fractions and ``floor(|x| / w)`` is computed
without rounding; growing the range (appending empty bins) and halving the resolution (summing adjacent pairs,
``w -> 2w``) are then both *exact*: the result equals a histogram built from scratch at the final width
(docs/methods.md#kl).
"""

from __future__ import annotations

import math

import torch

from calibkit.checks import check_int
from calibkit.quant import native
from calibkit.quant.histogram import binned_counts, nonfinite_error

#: :class:`AccumulatingHistogram` never holds more than ``MAX_LENGTH_FACTOR * bins`` bins.
MAX_LENGTH_FACTOR = 8
#: When a batch grows the range of an :class:`AccumulatingHistogram`, up to this many values beyond the old range
#: are kept by the compiled kernel and binned alone (the rest of the batch is not binned a second time).
OVER_KEEP = 1 << 16


def _pair_sums(counts: torch.Tensor) -> torch.Tensor:
    """Sums of adjacent bin pairs (a histogram at twice the width; an odd last bin is paired with an empty one)."""
    if counts.numel() % 2:
        counts = torch.cat([counts, counts.new_zeros(1)])
    return counts.view(-1, 2).sum(1)


def _start_width(amax: float, bins: int) -> float:
    """The first bin width: the power of two just below ``amax / bins``, at least ``2**-126``."""
    _, e = math.frexp(amax / bins)  # amax / bins = m * 2**e, 0.5 <= m < 1
    return math.ldexp(1.0, max(e - 1, -126))


def _covering(width: float, length: int, amax: float, max_length: int) -> tuple[float, int]:
    """Width and length of a histogram of ``width``, ``length`` grown to cover ``amax``: pairs merged (width
    doubles, length halves rounding up) while the needed length exceeds ``max_length``, then empty bins appended."""
    needed = math.floor(amax / width) + 1
    while needed > max_length:
        length, width = (length + 1) // 2, width * 2
        needed = math.floor(amax / width) + 1
    return width, max(length, needed)


class AccumulatingHistogram:
    """Histogram of ``|x|`` accumulated over batches, with exact range growth.

    Args:
        bins: resolution of the first range: the bin width is the power of two just below
            ``amax_first / bins``, so the first batch's range spans ``bins + 1 .. 2 * bins`` bins.
        max_length: cap on the number of bins, an integer >= ``2 * bins`` (default ``MAX_LENGTH_FACTOR *
            bins``). When a larger value arrives the histogram is extended with empty bins at the same
            width; if that would exceed the cap, adjacent pairs are summed (width doubles) until it fits.
            Both are exact.

    Attributes: ``counts`` (int64 ``[L]`` on the data's device, or ``None`` while only zeros were
    seen), ``width`` (float, a power of two, at least ``2**-126``), ``total`` (elements seen),
    ``max_value`` (largest ``|x|`` seen). Bin ``k`` counts ``k * width <= |x| < (k + 1) * width``.
    """

    def __init__(self, bins: int, max_length: int | None = None):
        self.bins = int(bins)
        length = MAX_LENGTH_FACTOR * self.bins if max_length is None else int(max_length)
        self.max_length = check_int("max_length", length, 2 * self.bins,
                                    why=f" for bins={self.bins} (it must hold 2 * bins)")
        self.reset()

    def reset(self) -> None:
        """Forget all data."""
        self.counts: torch.Tensor | None = None
        self.width = 0.0
        self.total = 0
        self.max_value = 0.0
        self._zeros_before_start = 0  # elements of all-zero batches seen before the first non-zero value

    def __len__(self) -> int:
        return 0 if self.counts is None else self.counts.numel()

    def native_ready(self, x: torch.Tensor) -> bool:
        """True when ``add(x)`` without ``minmax`` takes the one-pass compiled path (the histogram has started,
        ``x`` is a CPU float32 tensor and the kernel is available)."""
        return self.counts is not None and native.usable(x)

    def add(self, x: torch.Tensor, minmax: tuple[torch.Tensor, torch.Tensor] | None = None,
            owner: str = "AccumulatingHistogram") -> None:
        """Add the values of ``x`` (any shape; binned in float32).

        ``minmax``: ``x``'s (min, max) if the caller already has them (saves a pass). Without it, once the
        histogram has started, a CPU float32 ``x`` is binned by the compiled kernel (:mod:`calibkit.quant.native`)
        in one pass that also finds its largest ``|x|``. Non-finite values raise
        :class:`~calibkit.errors.CalibrationError` (naming the NaN and Inf counts; ``owner`` starts the
        message) and leave the histogram unchanged."""
        x2d = x.detach().reshape(1, -1).to(torch.float32)
        if x2d.shape[1] == 0:
            return
        if self.counts is not None and self.counts.device != x2d.device:  # the observer moved devices
            self.counts = self.counts.to(x2d.device)
        if minmax is None and self.native_ready(x2d):
            self._add_native(x2d, x, owner)
        else:
            self._add_torch(x2d, x, minmax, owner)

    def _add_native(self, x2d: torch.Tensor, x: torch.Tensor, owner: str) -> None:
        """One pass of the compiled kernel bins the batch and finds its max and NaN/Inf values."""
        counts, over, nonfinite, amax, beyond = native.abs_counts(x2d, 1.0 / self.width, len(self), OVER_KEEP)
        if nonfinite:
            raise nonfinite_error(owner, x.detach())
        if over:  # values beyond the current range: grow (exactly)
            counts = self._regrown(x2d, counts, amax, beyond)
        self.counts += counts
        self.total += x2d.shape[1]
        self.max_value = max(self.max_value, amax)

    def _regrown(self, x2d: torch.Tensor, counts: torch.Tensor, amax: float, beyond: torch.Tensor | None
                 ) -> torch.Tensor:
        """Grows the histogram to cover ``amax`` and returns the batch's counts at the new width: ``counts`` (at
        the old width, without the ``beyond`` values past the old range) brought over by exact pair sums, plus
        ``beyond`` binned alone; or, when there were too many to keep (``beyond`` None), the batch binned again."""
        width = self.width
        self._cover(amax)
        if beyond is None:
            return native.abs_counts(x2d, 1.0 / self.width, len(self))[0]
        while width < self.width:
            counts = _pair_sums(counts)
            width *= 2
        counts = torch.cat([counts, counts.new_zeros(len(self) - counts.numel())])
        return counts + native.abs_counts(beyond, 1.0 / self.width, len(self))[0]

    def _add_torch(self, x2d: torch.Tensor, x: torch.Tensor, minmax, owner: str) -> None:
        """The torch-ops path: the batch's min/max (given or found) set the range, then the values are binned."""
        lo, hi = torch.aminmax(x2d) if minmax is None else minmax
        amax = max(-float(lo), float(hi))
        if not math.isfinite(amax):
            raise nonfinite_error(owner, x.detach())
        if self._extend(amax, x2d.shape[1], x2d.device):
            self.counts += self.counts_at(x2d, self.width, len(self), nonnegative=float(lo) >= 0)

    def _extend(self, amax: float, n: int, device: torch.device) -> bool:
        """Counts ``n`` more values whose largest ``|x|`` is ``amax`` in ``total`` / ``max_value`` and grows the
        histogram to cover ``amax`` (the first non-zero batch starts it); False while only zeros have been seen
        (they wait for bin 0), else True: the batch's counts are then to be added at the current width."""
        self.total += n
        self.max_value = max(self.max_value, amax)
        if self.counts is None:
            if amax == 0.0:
                self._zeros_before_start += n
                return False
            self._start(amax, device)
        self._cover(amax)
        return True

    def _start(self, amax: float, device: torch.device) -> None:
        """The first non-zero batch sets the width: the power of two just below ``amax / bins`` (and at least
        ``2**-126``, so that ``1 / width`` fits float32); the zeros seen so far go to bin 0."""
        self.width = _start_width(amax, self.bins)
        self.counts = torch.zeros(1, dtype=torch.int64, device=device)
        self.counts[0] = self._zeros_before_start

    def _cover(self, amax: float) -> None:
        """Extend the histogram (empty bins at the same width) so that ``amax`` falls in it, first merging pairs
        (width doubles) while the needed length would exceed ``max_length``. Both steps are exact."""
        width, needed = _covering(self.width, len(self), amax, self.max_length)
        while self.width < width:
            self.counts = _pair_sums(self.counts)
            self.width *= 2
        if needed > len(self):
            self.counts = torch.cat([self.counts, self.counts.new_zeros(needed - len(self))])

    # -- replaying the batches of several ranks (docs/methods.md#many-processes) ------------------------------
    def plan(self, amaxes: list[float]) -> list[tuple[float, int] | None]:
        """The (width, length) this histogram would have after each of the batches whose largest ``|x|`` are
        ``amaxes`` were added in order (``None`` while not started: only zeros so far); the histogram is unchanged."""
        started, width, length, out = self.counts is not None, self.width, len(self), []
        for amax in amaxes:
            if not started and amax == 0.0:
                out.append(None)
                continue
            if not started:
                started, width, length = True, _start_width(amax, self.bins), 1
            width, length = _covering(width, length, amax, self.max_length)
            out.append((width, length))
        return out

    @staticmethod
    def counts_at(x: torch.Tensor, width: float, length: int, nonnegative: bool = False) -> torch.Tensor:
        """int64 ``[length]`` counts of ``|x|`` (binned in float32) on bins of ``width`` (a power of two) from 0."""
        x2d = x.detach().reshape(1, -1).to(torch.float32)
        inv = torch.tensor([1.0 / width], dtype=torch.float32, device=x2d.device)  # exact power of two
        return binned_counts(x2d, inv, 0.0, length, absolute=True, nonnegative=nonnegative)[0]

    def add_counts(self, counts: torch.Tensor, amax: float, n: int) -> None:
        """Adds one batch of ``n`` values whose largest ``|x|`` is ``amax`` from its ``counts`` at the width and
        length :meth:`plan` gave for it (longer ``counts`` are cut): the same state as :meth:`add` of the batch."""
        if self._extend(amax, n, counts.device):
            self.counts += counts[:len(self)].to(self.counts.device)
