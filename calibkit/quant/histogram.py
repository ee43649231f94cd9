"""Histogram machinery shared by the ``percentile``, ``kl``, ``mse`` and ``mix`` observers.

Everything here runs on the device of the tensor it is given, counts in ``int64`` (never float32,
which stops counting exactly at 2**24) and processes large tensors in cache-sized chunks, which on
a CPU is several times faster than one pass of full-size temporaries.

Bin conventions (``w`` = bin width):

* bin ``k`` holds values in ``[k*w, (k+1)*w)``; in the one-shot histograms (:func:`abs_histogram`,
  :func:`signed_histogram`) the last bin is closed, so the largest value counts in it.
* :class:`AccumulatingHistogram` keeps ``w`` a power of two. Bin edges are then exact binary
  fractions, ``floor(|x| / w)`` is computed without rounding, growing the range (appending empty
  bins) and halving the resolution (summing adjacent pairs, ``w -> 2w``) are both *exact*: the
  result equals a histogram built from scratch at the final width.

Searches over thresholds are vectorized over all candidates (prefix sums over the histogram); no
Python loop over bins anywhere.

On a CPU, single-row histograms of ``|x|`` are counted by the compiled one-pass kernel of
:mod:`calibkit.quant.native` when it is available (the same counts as the torch-ops path, which is the fallback and
the path on accelerators).
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np
import torch

from calibkit.quant import native
from calibkit.errors import CalibrationError
from calibkit.quant.numerics import qrange

#: Elements per chunk on CPU (512 KiB of float32: the chunk and its work buffers stay in L2 cache).
CPU_CHUNK = 1 << 17
#: Elements per chunk on accelerators (a single pass for any realistic activation).
DEVICE_CHUNK = 1 << 26
#: int32 bin indices of this many elements are counted by one ``bincount`` call (where chunks are smaller:
#: on CPU; an accelerator's chunk is counted on its own).
STAGE_ELEMS = 1 << 20
#: Largest ``bins`` accepted by the histogram observers.
MAX_BINS = 1 << 20
#: :class:`AccumulatingHistogram` never holds more than ``MAX_LENGTH_FACTOR * bins`` bins.
MAX_LENGTH_FACTOR = 8
#: When a batch grows the range of an :class:`AccumulatingHistogram`, up to this many values beyond the old range
#: are kept by the compiled kernel and binned alone (the rest of the batch is not binned a second time).
OVER_KEEP = 1 << 16


#: Interleaved histogram copies used when counting one row (see :func:`_binned_counts`).
LANES = 4
#: Lanes are used only while ``LANES * bins`` stays below this (the copies must stay cache-resident).
MAX_LANE_BINS = 1 << 18


@functools.lru_cache(maxsize=8)
def _lane_offsets(n: int, lanes: int, length: int, device: torch.device) -> torch.Tensor:
    """int32 ``[1, n]``: ``(i % lanes) * length`` (the lane of element ``i`` of a chunk)."""
    return (torch.arange(n, device=device, dtype=torch.int32) % lanes).mul_(length).reshape(1, n)


def chunk_elems(device: torch.device) -> int:
    """Number of elements processed per chunk on ``device``."""
    return CPU_CHUNK if torch.device(device).type == "cpu" else DEVICE_CHUNK


_scratch = threading.local()


def workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable scratch tensor (per thread, name, dtype and device; contents undefined).

    Reusing chunk buffers across calls avoids fresh allocations (and page faults) on every batch.
    """
    cache = _scratch.__dict__.setdefault("buffers", {})
    key = (name, dtype, torch.device(device))
    n = math.prod(shape)
    buf = cache.get(key)
    if buf is None or buf.numel() < n:
        buf = cache[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def column_chunks(x2d: torch.Tensor, merge_tail: bool = False, fan_out: int = 1):
    """Yield column slices of ``x2d`` ``[C, N]`` holding about ``chunk_elems / fan_out`` elements each
    (``fan_out``: how many work values the caller makes per element, e.g. one per candidate scale).

    ``merge_tail``: a last slice shorter than half a chunk is merged into the one before it (fewer
    small ops for tensors just above a chunk)."""
    cols = max(1, chunk_elems(x2d.device) // (x2d.shape[0] * max(1, int(fan_out))))
    n = x2d.shape[1]
    stops = list(range(cols, n, cols)) + [n]
    if merge_tail and len(stops) > 1 and n - stops[-2] < cols // 2:
        del stops[-2]
    start = 0
    for stop in stops:
        yield x2d[:, start:stop]
        start = stop


def _offset_buffer(shape: tuple[int, int], offset: float, device: torch.device) -> torch.Tensor:
    """A float32 tensor of ``shape`` filled with ``offset`` (per thread and device; kept between calls and
    refilled only when the offset changes or a larger one is needed). Read-only for the caller."""
    cache = _scratch.__dict__.setdefault("offsets", {})
    n, dev = math.prod(shape), torch.device(device)
    held = cache.get(dev)
    if held is None or held[0] != offset or held[1].numel() < n:
        held = cache[dev] = (offset, torch.full((n,), offset, dtype=torch.float32, device=dev))
    return held[1][:n].view(shape)


def _binned_counts(x2d: torch.Tensor, mult: torch.Tensor, offset: float, length: int, absolute: bool,
                   per_chunk=None, nonnegative: bool = False) -> torch.Tensor:
    """Per-row counts of ``trunc((|x| or x) * mult + offset)`` for indices ``0..length-1``.

    ``mult``: float32 ``[C]``; every index must already lie in ``[0, length)``. Returns int64 ``[C, length]``.
    ``per_chunk``: optional callable run on every chunk while it is in cache (fusing another pass).
    ``nonnegative``: the caller knows ``x >= 0`` everywhere (e.g. a ReLU output), so ``|x|`` is ``x``.
    """
    C = x2d.shape[0]
    mult = mult.to(torch.float32).reshape(C, 1)
    # bins / amax overflows float32 only for amax < ~1e-35 (far below any usable scale): such rows
    # put all their non-zero values in the last bin
    overflow = not bool(torch.isfinite(mult).all())
    if C == 1 and absolute and offset == 0.0 and per_chunk is None and not overflow and float(mult) > 0 \
            and native.usable(x2d):  # one pass of the compiled kernel: the same counts
        counts, over, nonfinite, _, _ = native.abs_counts(x2d, float(mult), length)
        if over or nonfinite:
            raise ValueError(f"{over + nonfinite} values fall outside the {length} bins: the caller must pass "
                             "finite values and a range that holds them")
        return counts.reshape(1, length)
    # One row: consecutive elements are counted in LANES interleaved copies of the histogram (summed at
    # the end). A bin hit by long runs of equal values (the exact zeros of a ReLU) is then not one
    # counter incremented back to back, which serializes on the memory dependency (~1.5x slower).
    # (CPU only: accelerators count with atomics, and their chunks are too large for an offset buffer.)
    lanes = LANES if C == 1 and x2d.device.type == "cpu" and LANES * length <= MAX_LANE_BINS else 1
    if C > 1:
        rows = torch.arange(C, device=x2d.device, dtype=torch.int32).mul_(length).reshape(C, 1)
    elif lanes > 1:  # the widest chunk has < 1.5 * chunk_elems columns (see column_chunks)
        rows = _lane_offsets(min(x2d.shape[1], 3 * chunk_elems(x2d.device) // 2), lanes, length, x2d.device)
    else:
        rows = None
    counts = torch.zeros(lanes * C * length, dtype=torch.int64, device=x2d.device)
    # The int32 indices of consecutive chunks are staged in one buffer and counted together: one bincount
    # (and one allocation of its result) per STAGE_ELEMS elements instead of one per chunk.
    chunk = chunk_elems(x2d.device)  # a chunk holds < 1.5 * chunk elements (see column_chunks)
    staged = 3 * chunk // 2 <= STAGE_ELEMS and x2d.numel() > 2 * chunk
    stage = workspace("bins_stage", (STAGE_ELEMS,), torch.int32, x2d.device) if staged else None
    filled = 0

    def flush():
        nonlocal counts, filled
        if filled:
            counts += torch.bincount(stage[:filled], minlength=counts.numel())
            filled = 0

    off = None
    for xc in column_chunks(x2d, merge_tail=per_chunk is None):
        b = workspace("bins_f32", xc.shape, torch.float32, x2d.device)
        if stage is not None:
            if filled + xc.numel() > STAGE_ELEMS:
                flush()
            ib = stage[filled:filled + xc.numel()].view(xc.shape)
        else:
            ib = workspace("bins_i32", xc.shape, torch.int32, x2d.device)
        if absolute and nonnegative:
            torch.mul(xc, mult, out=b)
        elif absolute:
            torch.abs(xc, out=b).mul_(mult)
            if offset:
                b.add_(offset)
        else:  # x * mult + offset in one op (the offset buffer has the chunk's shape: fast path)
            if off is None or off.shape[1] < xc.shape[1]:
                off = _offset_buffer(xc.shape, offset, x2d.device)
            torch.addcmul(off[:, :xc.shape[1]], xc, mult, out=b)
        if overflow:
            torch.nan_to_num_(b, nan=offset, posinf=length - 1, neginf=0.0)
        ib.copy_(b)  # float -> int32 truncates toward zero (= floor for the non-negative values here)
        if rows is not None:
            ib.add_(rows if C > 1 else rows[:, :xc.shape[1]])
        if stage is None:
            counts += torch.bincount(ib.reshape(-1), minlength=counts.numel())
        else:
            filled += xc.numel()
        if per_chunk is not None:
            per_chunk(xc)
    if stage is not None:
        flush()
    if lanes > 1:
        counts = counts.view(lanes, length).sum(0)
    return counts.reshape(C, length)


def _row_mult(amax: torch.Tensor, bins: int) -> torch.Tensor:
    """``bins / amax`` per row (float32); rows with ``amax == 0`` get 0 (everything lands in bin 0)."""
    amax = amax.to(torch.float32).reshape(-1)
    return torch.where(amax > 0, bins / amax, torch.zeros_like(amax))


def abs_histogram(x2d: torch.Tensor, amax: torch.Tensor, bins: int, nonnegative: bool = False) -> torch.Tensor:
    """Histogram of ``|x|`` per row over ``[0, amax_c]`` with ``bins`` equal bins.

    Args:
        x2d: float32 ``[C, N]`` (one row per channel; ``C = 1`` per tensor).
        amax: ``[C]`` the row maxima of ``|x|`` (the histogram range).
        bins: number of bins (>= 1).
    Returns: int64 ``[C, bins]``; bin ``k`` counts ``k*w <= |x| < (k+1)*w`` with ``w = amax/bins``,
    the last bin also counts ``|x| == amax``. ``nonnegative=True`` promises ``x >= 0`` (saves a pass).
    """
    counts = _binned_counts(x2d, _row_mult(amax, bins), 0.0, bins + 1, absolute=True, nonnegative=nonnegative)
    counts[:, bins - 1] += counts[:, bins]
    return counts[:, :bins]


def signed_histogram(x2d: torch.Tensor, amax: torch.Tensor, bins_per_side: int, per_chunk=None,
                     nonnegative: bool = False) -> torch.Tensor:
    """Histogram of ``x`` per row over ``[-amax_c, amax_c]`` with ``2 * bins_per_side`` equal bins.

    Returns int64 ``[C, 2 * bins_per_side]``; bin ``j`` counts ``(j - B) w <= x < (j - B + 1) w``
    with ``B = bins_per_side`` and ``w = amax / B``; the last bin also counts ``x == amax``.
    ``per_chunk(xc)``, if given, runs on each column chunk ``xc`` of ``x2d`` while it is in cache.
    ``nonnegative=True`` promises ``x >= 0`` (e.g. a ReLU output): only the upper half is counted, with
    half the bins and without the offset (the bin index is then exactly ``trunc(x / w)``; in general it
    is ``trunc(x / w + B)`` rounded once in float32, which can move a value lying within ~1e-4 bin of an
    edge to the next bin).
    """
    B = bins_per_side
    if nonnegative:
        upper = _binned_counts(x2d, _row_mult(amax, B), 0.0, B + 1, absolute=True, per_chunk=per_chunk, nonnegative=True)
        counts = upper.new_zeros(upper.shape[0], 2 * B + 1)
        counts[:, B:] = upper
    else:
        counts = _binned_counts(x2d, _row_mult(amax, B), float(B), 2 * B + 1, absolute=False, per_chunk=per_chunk)
    counts[:, 2 * B - 1] += counts[:, 2 * B]
    return counts[:, :2 * B]


def percentile_from_histogram(counts: torch.Tensor, amax: torch.Tensor, percentile: float) -> torch.Tensor:
    """Clip where the cumulative count of an :func:`abs_histogram` reaches ``percentile`` %.

    The clip is interpolated linearly inside the bin where the target count ``percentile/100 * N``
    is reached (uniform density inside a bin), so ``percentile=100`` gives exactly ``amax`` and
    the result moves continuously with ``percentile``. Returns float32 ``[C]``, ``0 <= clip <= amax``.
    """
    C, B = counts.shape
    cum = counts.cumsum(1)
    total = cum[:, -1].double()
    target = total * (percentile / 100.0)
    j = (cum.double() < target[:, None]).sum(1).clamp_(max=B - 1)
    prev = torch.where(j > 0, cum.gather(1, (j - 1).clamp(min=0)[:, None])[:, 0], torch.zeros_like(j)).double()
    cnt = counts.gather(1, j[:, None])[:, 0].double()
    frac = ((target - prev) / cnt.clamp(min=1)).clamp_(0, 1)
    amax64 = amax.double().reshape(-1)
    clip = torch.minimum((j.double() + frac) * (amax64 / B), amax64)
    return clip.to(torch.float32)


# --------------------------------------------------------------------------------------------
# Exact order statistics of |x| (mix observer)
# --------------------------------------------------------------------------------------------
_BUCKET_SHIFT = 16  # float32 bit pattern >> 16: sign(0) + 8 exponent bits + 7 mantissa bits


def abs_order_statistics(x2d: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Exact order statistics of ``|x|`` per row: the ``ranks``-th smallest (1-based) values.

    ``ranks``: int64 ``[R]`` in ``[1, N]``. Returns float32 ``[C, R]``.

    Small inputs are sorted. A single large row (an activation) is not: the float32 bit patterns
    of ``|x|`` are monotonic in value, so a 32768-bucket histogram of ``bits >> 16`` (bucket width
    < 1 % of the value) locates the bucket of the smallest requested rank; only the values from
    that bucket up are selected and sorted. Results are identical to a full sort.
    """
    C, N = x2d.shape
    if C > 1 or N <= (1 << 16):
        return torch.sort(x2d.abs(), dim=1).values.index_select(1, ranks - 1)
    nb = 1 << (31 - _BUCKET_SHIFT)
    counts = torch.zeros(nb, dtype=torch.int64, device=x2d.device)
    for xc in column_chunks(x2d):
        b = workspace("bins_f32", xc.shape, torch.float32, x2d.device)
        ib = workspace("bins_i32", xc.shape, torch.int32, x2d.device)
        torch.abs(xc, out=b)
        torch.bitwise_right_shift(b.view(torch.int32), _BUCKET_SHIFT, out=ib)
        counts += torch.bincount(ib.reshape(-1), minlength=nb)
    cum = counts.cumsum(0)
    rmin = int(ranks.min())
    b0 = int((cum < rmin).sum())
    below = int(cum[b0 - 1]) if b0 > 0 else 0
    t0 = torch.tensor(b0 << _BUCKET_SHIFT, dtype=torch.int32).view(torch.float32).item()
    picked = []
    for xc in column_chunks(x2d):
        a = torch.abs(xc, out=workspace("bins_f32", xc.shape, torch.float32, x2d.device))
        picked.append(a[a >= t0])
    top = torch.sort(torch.cat(picked)).values
    return top.index_select(0, (ranks - 1 - below).to(top.device)).reshape(1, -1)


def percentile_ranks(percentiles: torch.Tensor | list[float], n: int) -> torch.Tensor:
    """1-based rank ``ceil(p/100 * n)`` (clamped to ``[1, n]``) of each percentile ``p``."""
    p = torch.as_tensor(percentiles, dtype=torch.float64)
    r = torch.ceil(p * n / 100.0 * (1 - 1e-12))
    return r.clamp_(1, n).to(torch.int64)


# --------------------------------------------------------------------------------------------
# Accumulated histogram with exact growth (kl observer)
# --------------------------------------------------------------------------------------------
class AccumulatingHistogram:
    """Histogram of ``|x|`` accumulated over batches, with exact range growth.

    Args:
        bins: resolution of the first range: the bin width is the power of two just below
            ``amax_first / bins``, so the first batch's range spans ``bins + 1 .. 2 * bins`` bins.
        max_length: cap on the number of bins (default ``MAX_LENGTH_FACTOR * bins``, at least
            ``2 * bins``). When a larger value arrives the histogram is extended with empty bins at the
            same width; if that would exceed the cap, adjacent pairs are summed (width doubles) until
            it fits. Both are exact.

    Attributes: ``counts`` (int64 ``[L]`` on the data's device, or ``None`` while only zeros were
    seen), ``width`` (float, a power of two, at least ``2**-126``), ``total`` (elements seen),
    ``max_value`` (largest ``|x|`` seen). Bin ``k`` counts ``k * width <= |x| < (k + 1) * width``.
    """

    def __init__(self, bins: int, max_length: int | None = None):
        self.bins = int(bins)
        self.max_length = int(max_length) if max_length is not None else MAX_LENGTH_FACTOR * self.bins
        if self.max_length < 2 * self.bins:
            raise ValueError(f"max_length={self.max_length} is too small: use max_length >= 2 * bins = {2 * self.bins}")
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

    @property
    def edges(self) -> torch.Tensor:
        """Bin edges (float64 ``[L + 1]``): ``k * width``."""
        return torch.arange(len(self) + 1, dtype=torch.float64) * self.width

    def _exponent_for(self, amax: float) -> int:
        _, e = math.frexp(amax / self.bins)  # amax / bins = m * 2**e, 0.5 <= m < 1
        return max(e - 1, -126)               # width = 2**(e-1) <= amax / bins; 1/width fits float32

    def _merge_pairs(self) -> None:
        self.counts = _pair_sums(self.counts)
        self.width *= 2

    def add(self, x: torch.Tensor, minmax: tuple[torch.Tensor, torch.Tensor] | None = None,
            owner: str = "AccumulatingHistogram") -> None:
        """Add the values of ``x`` (any shape; binned in float32).

        ``minmax``: ``x``'s (min, max) if the caller already has them (saves a pass). Without it, once the
        histogram has started, a CPU float32 ``x`` is binned by the compiled kernel (:mod:`calibkit.quant.native`)
        in one pass that also finds its largest ``|x|``. Non-finite values raise
        :class:`~calibkit.errors.CalibrationError` (naming the NaN and Inf counts; ``owner`` starts the
        message) and leave the histogram unchanged."""
        x2d = x.detach().reshape(1, -1).to(torch.float32)
        n = x2d.shape[1]
        if n == 0:
            return
        if self.counts is not None and self.counts.device != x2d.device:  # the observer moved devices
            self.counts = self.counts.to(x2d.device)
        if minmax is None and self.native_ready(x2d):
            counts, over, nonfinite, amax, beyond = native.abs_counts(x2d, 1.0 / self.width, len(self), OVER_KEEP)
            if nonfinite:
                raise nonfinite_error(owner, x.detach())
            if over:  # values beyond the current range: grow (exactly)
                width = self.width
                self._cover(amax)
                if beyond is None:  # many of them: bin everything again at the new width
                    counts = native.abs_counts(x2d, 1.0 / self.width, len(self))[0]
                else:  # few: bring the counts to the new width (exact pair sums), then add those values
                    while width < self.width:
                        counts = _pair_sums(counts)
                        width *= 2
                    counts = torch.cat([counts, counts.new_zeros(len(self) - counts.numel())])
                    counts += native.abs_counts(beyond, 1.0 / self.width, len(self))[0]
            self.counts += counts
            self.total += n
            self.max_value = max(self.max_value, amax)
            return
        lo, hi = torch.aminmax(x2d) if minmax is None else minmax
        amax = max(-float(lo), float(hi))
        if not math.isfinite(amax):
            raise nonfinite_error(owner, x.detach())
        self.total += n
        self.max_value = max(self.max_value, amax)
        if self.counts is None:
            if amax == 0.0:
                self._zeros_before_start += n
                return
            self.width = math.ldexp(1.0, self._exponent_for(amax))
            self.counts = torch.zeros(1, dtype=torch.int64, device=x2d.device)
            self.counts[0] = self._zeros_before_start
        self._cover(amax)
        inv = torch.tensor([1.0 / self.width], dtype=torch.float32, device=x2d.device)  # exact power of two
        self.counts += _binned_counts(x2d, inv, 0.0, len(self), absolute=True, nonnegative=float(lo) >= 0)[0]

    def native_ready(self, x: torch.Tensor) -> bool:
        """True when ``add(x)`` without ``minmax`` takes the one-pass compiled path (the histogram has started,
        ``x`` is a CPU float32 tensor and the kernel is available)."""
        return self.counts is not None and native.usable(x)

    def _cover(self, amax: float) -> None:
        """Extend the histogram (empty bins at the same width) so that ``amax`` falls in it, first merging pairs
        (width doubles) while the needed length would exceed ``max_length``. Both steps are exact."""
        needed = math.floor(amax / self.width) + 1
        while needed > self.max_length:
            self._merge_pairs()
            needed = math.floor(amax / self.width) + 1
        if needed > len(self):
            self.counts = torch.cat([self.counts, self.counts.new_zeros(needed - len(self))])


def _pair_sums(counts: torch.Tensor) -> torch.Tensor:
    """Sums of adjacent bin pairs (a histogram at twice the width; an odd last bin is paired with an empty one)."""
    if counts.numel() % 2:
        counts = torch.cat([counts, counts.new_zeros(1)])
    return counts.view(-1, 2).sum(1)


def nonfinite_error(owner: str, x: torch.Tensor) -> CalibrationError:
    """The error for an input with NaN/Inf values, naming how many of each (the same text for every observer)."""
    n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
    return CalibrationError(
        f"{owner}: input contains {n_nan} NaN and {n_inf} Inf values (shape {tuple(x.shape)}); "
        "only finite activations can be calibrated -- check the model / data for overflow")


# --------------------------------------------------------------------------------------------
# KL (TensorRT-style entropy) threshold search
# --------------------------------------------------------------------------------------------
def kl_divergences(hist: torch.Tensor, num_levels: int, max_block: int = 1 << 17) -> torch.Tensor:
    """KL(P_i || Q_i) for every candidate threshold ``i = num_levels .. L`` (bins kept).

    ``hist``: counts ``[L]`` of ``|x|`` (bin 0 starting at 0). For candidate ``i``:

    * reference ``P_i``: ``hist[:i]`` with all the mass of ``hist[i:]`` (clipped values) added to
      bin ``i-1``;
    * candidate ``Q_i``: ``hist[:i]`` merged into ``num_levels`` groups (bin ``j`` belongs to group
      ``floor(j * num_levels / i)``), each group's count spread evenly over its non-empty bins;
      empty bins stay empty;
    * both normalized; ``KL = sum_j p_j log(p_j / q_j)`` over ``p_j > 0``; ``inf`` when ``q_j = 0 < p_j``
      (last kept bin empty but clipped mass present).

    All candidates are evaluated with prefix sums: for each candidate the group sums come from
    ``cumsum(hist)`` at the group boundaries, so the cost is ``O(L * num_levels)`` arithmetic in
    blocks of about ``max_block`` entries (small enough to stay in cache), without a Python loop over
    bins. Candidates known to be ``inf`` (empty last bin with clipped mass) are skipped when they are
    the majority (sparse histograms, e.g. rare far outliers). Returns float64 ``[L - num_levels + 1]``.
    """
    h = hist.to(torch.float64).reshape(-1)
    L, nq = h.numel(), int(num_levels)
    if L < nq:
        raise ValueError(f"histogram has {L} bins: the KL search needs at least num_levels={nq}")
    dev = h.device
    zero = h.new_zeros(1)
    N = h.sum()
    csum = torch.cat([zero, h.cumsum(0)])                          # csum[i] = sum(h[:i])
    nz = torch.cat([zero, (h > 0).to(torch.float64).cumsum(0)])    # non-empty bins before i
    hl_cum = torch.cat([zero, torch.xlogy(h, h).cumsum(0)])        # sum(h log h) before i
    logN = torch.log(N)

    cand = torch.arange(nq, L + 1, device=dev, dtype=torch.int64)
    Ci, h_last = csum.index_select(0, cand), h.index_select(0, cand - 1)
    # a candidate whose last kept bin is empty while values are clipped has KL = inf (q = 0 < p)
    finite = ((h_last > 0) | (Ci == N)) & (Ci > 0)
    keep = None
    if 2 * int(finite.sum()) < cand.numel():                        # sparse: evaluate the finite ones only
        keep = torch.nonzero(finite)[:, 0]
        cand, Ci, h_last = (t.index_select(0, keep) for t in (cand, Ci, h_last))
    # sum over groups of M log(M / Z) (M: group sum, Z: its non-empty bins; both integers, 0 log 0 = 0)
    MlogQ = torch.empty(cand.numel(), dtype=torch.float64, device=dev)
    step = max(1, max_block // (nq + 1))
    for lo in range(0, cand.numel(), step):
        b = _group_bounds(cand[lo:lo + step], nq, contiguous=keep is None).reshape(-1)  # [rows * (nq + 1)]
        Mb = csum.index_select(0, b).view(-1, nq + 1)
        Zb = nz.index_select(0, b).view(-1, nq + 1)
        M = Mb[:, 1:] - Mb[:, :-1]
        Z = (Zb[:, 1:] - Zb[:, :-1]).clamp_(min=1)
        torch.sum(M.clamp(min=1).div_(Z).log_().mul_(M), 1, out=MlogQ[lo:lo + step])
    last_lo = ((nq - 1) * cand + (nq - 1)) // nq                    # first bin of the last group
    M_last = Ci - csum.index_select(0, last_lo)
    Z_last = nz.index_select(0, cand) - nz.index_select(0, last_lo)
    logq_last = torch.where(h_last > 0, torch.log(M_last.clamp(min=1e-300) / Z_last.clamp(min=1)), 0.0)
    logC = torch.log(Ci.clamp(min=1e-300))
    # bins j < i-1:  sum h_j [log h_j - log N - log Qu_j + log C_i]   (Qu = unnormalized Q)
    body = hl_cum.index_select(0, cand - 1) - (Ci - h_last) * (logN - logC) - (MlogQ - h_last * logq_last)
    p_last = h_last + (N - Ci)
    last = torch.where(p_last > 0, p_last * (torch.log(p_last.clamp(min=1e-300)) - logN - logq_last + logC), 0.0)
    kl = (body + last) / N
    kl = torch.where((h_last == 0) & (p_last > 0), torch.inf, kl)
    kl = torch.where(Ci > 0, kl, torch.inf)
    if keep is None:
        return kl
    return torch.full((L - nq + 1,), torch.inf, dtype=torch.float64, device=dev).index_copy_(0, keep, kl)


#: Candidates up to this many bins take their group boundaries from a cached table (at most ~17 MB for 8-bit).
BOUNDS_TABLE_BINS = 1 << 14
_bounds_tables: dict = {}


def _group_bounds(cand: torch.Tensor, nq: int, contiguous: bool = False) -> torch.Tensor:
    """int64 ``[len(cand), nq + 1]``: the group boundaries ``ceil(g * i / nq)``, ``g = 0 .. nq``, of each
    candidate ``i`` in ``cand`` (int64, ascending, ``nq <= i``). They do not depend on the data, so for ``i <=
    BOUNDS_TABLE_BINS`` they are rows of one table per ``(nq, device)``, built once (a view of the table when
    ``contiguous`` promises that ``cand`` is a run of consecutive integers)."""
    dev = cand.device
    g = torch.arange(nq + 1, device=dev, dtype=torch.int64)
    if cand.numel() == 0 or int(cand[-1]) > BOUNDS_TABLE_BINS:  # cand is ascending
        return (g[None, :] * cand[:, None] + (nq - 1)) // nq
    key = (nq, dev)
    table = _bounds_tables.get(key)
    if table is None:
        i = torch.arange(nq, max(BOUNDS_TABLE_BINS, nq) + 1, device=dev, dtype=torch.int64)
        table = _bounds_tables[key] = (g[None, :] * i[:, None] + (nq - 1)) // nq
    if contiguous:
        first = int(cand[0]) - nq
        return table[first:first + cand.numel()]
    return table.index_select(0, cand - nq)


def kl_threshold_bins(hist: torch.Tensor, num_levels: int) -> int:
    """Number of bins ``i`` to keep (clip at ``i * width``) that minimizes :func:`kl_divergences`.

    Ties go to the largest ``i`` (the widest range). A histogram with no mass returns 0.
    """
    hist = hist.reshape(-1)
    if float(hist.sum()) == 0:
        return 0
    if hist.numel() < num_levels:  # only possible for values near the float32 underflow limit
        hist = torch.cat([hist, hist.new_zeros(num_levels - hist.numel())])
    kl = kl_divergences(hist, num_levels)
    best = torch.nonzero(kl == kl.min())[-1, 0]
    return int(best) + int(num_levels)


# --------------------------------------------------------------------------------------------
# Histogram-based squared-error table (mse observer's candidate scoring)
# --------------------------------------------------------------------------------------------
def _sawtooth_integral(z: np.ndarray, m: int) -> np.ndarray:
    """``int_0^z e(y) dy`` in units of the step, where ``e(y) = (y - clamp(round(y), 0, m))**2``, ``z >= 0``.

    Up to ``m + 1/2`` the error is the rounding sawtooth (each full step contributes 1/12); beyond
    it the value is clipped to ``m`` and the error grows as ``(y - m)**2``. float64 numpy.
    """
    zc = np.minimum(z, m + 0.5)
    n = np.round(zc)
    r = zc - n
    saw = n / 12 + (r ** 3 + 0.125) / 3 - 1 / 24
    tail = (np.maximum(z - m, 0.5) ** 3 - 0.125) / 3
    return saw + tail


@functools.lru_cache(maxsize=64)
def _error_table_cpu(bits: int, bins_per_side: int, shrinks: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    # numpy: a one-off table, computed without intra-op threading
    qmin, qmax = qrange(bits)
    half_range = (qmax - qmin) / 2
    B = bins_per_side
    u = np.arange(B + 1, dtype=np.float64) / B                             # bin edges of |x| / amax
    step = np.asarray(shrinks, dtype=np.float64) / half_range              # scale / amax per candidate
    z = u[:, None] / step[None, :]                                         # [B+1, K] edges in steps
    tables = []
    for m in (qmax, -qmin):
        F = _sawtooth_integral(z, m)
        tables.append((F[1:] - F[:-1]) / (z[1:] - z[:-1]) * step[None, :] ** 2)  # mean error per value
    return torch.from_numpy(np.concatenate(tables))


def _bin_error_extremes(lo: torch.Tensor, hi: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest ``e(z) = (z - clamp(round(z), 0, m))**2`` over ``z`` in ``[lo, hi]`` (``0 <= lo <= hi``,
    units of the step), elementwise. Inside the grid ``e`` is the rounding sawtooth: zero at a grid point, a
    quarter at a midpoint, monotonic in between; beyond ``m + 1/2`` it grows (clipping). So the smallest value is
    zero if the interval holds a grid point, else that of its nearer end; the largest is a quarter if the interval
    holds a midpoint, else that of its worse end."""
    def err(z):
        return (z - torch.clamp(torch.round(z), 0, m)) ** 2

    e_lo, e_hi = err(lo), err(hi)
    n = torch.ceil(lo)
    has_point = (n <= torch.floor(hi)) & (n <= m)
    k = torch.ceil(lo - 0.5)                                   # first midpoint k + 0.5 >= lo
    has_mid = (k + 0.5 <= hi) & (k <= m)                       # midpoints up to m + 0.5 (error 1/4 there)
    smallest = torch.where(has_point, 0.0, torch.minimum(e_lo, e_hi))
    largest = torch.maximum(torch.maximum(e_lo, e_hi), torch.where(has_mid, 0.25, 0.0))
    return smallest, largest


def _signed_bin_extremes(steps_per_bin: torch.Tensor, B: int, bits: int, margin: float):
    """Per signed-histogram bin (``2B`` columns) the smallest and largest error in step² units, for rows
    whose bin width is ``steps_per_bin`` ``[R, 1]`` float64 quantization steps. Returns two ``[R, 2B]``."""
    qmin, qmax = qrange(bits)
    j = torch.arange(B + 1, dtype=torch.float64, device=steps_per_bin.device)      # |x| edges, in bins
    lo = (j[:-1] - margin).clamp(min=0) * steps_per_bin                            # [R, B] bins of |x|, in steps
    hi = (j[1:] + margin) * steps_per_bin
    pos_lo, pos_hi = _bin_error_extremes(lo, hi, qmax)     # positive bins: B + b holds b*w <= x < (b+1)*w
    neg_lo, neg_hi = _bin_error_extremes(lo, hi, -qmin)    # negative bins: b holds values of |x| in bin B-1-b
    return torch.cat([neg_lo.flip(1), pos_lo], 1), torch.cat([neg_hi.flip(1), pos_hi], 1)


def squared_error_bounds(counts: torch.Tensor, amax: torch.Tensor, scale: torch.Tensor, bits: int,
                         margin: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Guaranteed lower and upper bounds of ``sum((x - quantize_dequantize(x, scale))**2)`` from a
    :func:`signed_histogram` of ``x`` (no pass over the data).

    Each bin contributes its count times the smallest (lower) and the largest (upper) error any value
    inside it can have (see :func:`_bin_error_extremes`). Bins are widened by ``margin`` of their width on
    each side, which covers the float32 rounding of the bin index.
    Args: ``counts`` int64 ``[C, 2B]``, ``amax``/``scale`` ``[C]``. Returns float64 ``([C], [C])``; where
    ``bins / amax`` overflows the lower bound is 0 and the upper bound ``inf``.
    """
    C, twoB = counts.shape
    B = twoB // 2
    s = scale.double().reshape(C, 1)
    lo_err, hi_err = _signed_bin_extremes(amax.double().reshape(C, 1) / B / s, B, bits, margin)
    c = counts.double()
    lower = (c * lo_err).sum(1) * s[:, 0] ** 2
    upper = (c * hi_err).sum(1) * s[:, 0] ** 2
    ok = torch.isfinite(B / amax.float().reshape(-1))
    return torch.where(ok, lower, 0.0), torch.where(ok, upper, torch.inf)


def squared_error_bound_tables(bits: int, bins_per_side: int, shrinks: tuple[float, ...], margin: float = 2e-3,
                               device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`squared_error_bounds` as two float64 tables ``[K, 2B]`` (lower, upper; step² units), one row per
    candidate scale ``scale_from_amax(amax * shrinks[k])``: the bin width in steps is then
    ``(qmax - qmin) / 2 / (B * shrinks[k])`` whatever ``amax``, so the bounds of a row of counts ``c`` are
    ``(c @ table[k]) * scale_k**2`` (a dot product instead of ~30 elementwise ops). ``margin`` (bins) is
    twice that of :func:`squared_error_bounds`: it also covers the float32 rounding of ``amax * shrink`` and of
    the scale. Not valid where the scale is clamped at ``MIN_SCALE`` or ``bins / amax`` overflows. Cached."""
    return _bound_tables(int(bits), int(bins_per_side), tuple(float(s) for s in shrinks), float(margin),
                         torch.device(device) if device is not None else torch.device("cpu"))


@functools.lru_cache(maxsize=32)
def _bound_tables(bits, B, shrinks, margin, device):
    qmin, qmax = qrange(bits)
    r = (qmax - qmin) / 2 / (B * torch.tensor(shrinks, dtype=torch.float64))
    lo, hi = _signed_bin_extremes(r[:, None], B, bits, margin)                   # [K, 2B]
    return lo.to(device), hi.to(device)


def squared_error_table(bits: int, bins_per_side: int, shrinks: tuple[float, ...], device=None,
                        dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Mean squared quantization error per value in each bin of ``|x|``, for every candidate clip.

    For candidate clip ``amax * shrinks[k]`` (scale ``amax * shrinks[k] / ((qmax - qmin) / 2)``) and a
    value spread uniformly in a bin, the mean of ``(x - quantize_dequantize(x))**2`` in units of
    ``amax**2``, in closed form (integral of the rounding sawtooth plus the clipping parabola).
    Returns ``dtype`` ``[2 * bins_per_side, K]``: rows ``b < B`` are positive values
    ``b*w <= x < (b+1)*w`` (clipped at ``qmax``), rows ``B + b`` the negative values with
    ``b*w < |x| <= (b+1)*w`` (clipped at ``qmin``), ``w = amax / B``. Cached per arguments.
    """
    return _error_table(int(bits), int(bins_per_side), tuple(float(s) for s in shrinks), dtype,
                        torch.device(device) if device is not None else torch.device("cpu"))


@functools.lru_cache(maxsize=64)
def _error_table(bits, bins_per_side, shrinks, dtype, device) -> torch.Tensor:
    return _error_table_cpu(bits, bins_per_side, shrinks).to(device=device, dtype=dtype)
