"""One-shot histograms of a batch (``percentile`` and ``mse`` observers) and the bin counting they share.

Counts are ``int64`` (never float32, which stops counting exactly at 2**24); large tensors are counted in
cache-sized chunks (:mod:`calibkit.quant.chunks`) on the device of the tensor given. Bin ``k`` holds values in
``[k*w, (k+1)*w)`` (``w`` = bin width); in :func:`abs_histogram` and :func:`signed_histogram` the last bin is
closed, so the largest value counts in it. On a CPU, single-row histograms of ``|x|`` are counted by the
compiled one-pass kernel of :mod:`calibkit.quant.native` when it is available (the same counts as the
torch-ops path, which is the fallback and the path on accelerators).

Related modules: :mod:`calibkit.quant.accumulating_histogram` (``kl``: a histogram over all batches),
:mod:`calibkit.quant.kl_search`, :mod:`calibkit.quant.squared_error` (``mse``), and
:mod:`calibkit.quant.order_statistics` (``mix``). The methods are described in docs/methods.md#calibration-methods.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from calibkit.errors import CalibrationError
from calibkit.quant import native
from calibkit.quant.chunks import chunk_elems, column_chunks, filled, workspace

#: Largest ``bins`` accepted by the histogram observers.
MAX_BINS = 1 << 20
#: int32 bin indices of this many elements are counted by one ``bincount`` call (where chunks are smaller:
#: on CPU; an accelerator's chunk is counted on its own).
STAGE_ELEMS = 1 << 20
#: Interleaved histogram copies used when counting one row (see :func:`binned_counts`).
LANES = 4
#: Lanes are used only while ``LANES * bins`` stays below this (the copies must stay cache-resident).
MAX_LANE_BINS = 1 << 18


def nonfinite_error(owner: str, x: torch.Tensor) -> CalibrationError:
    """The error for an input with NaN/Inf values, naming how many of each (the same text for every observer)."""
    n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
    return CalibrationError(
        f"{owner}: input contains {n_nan} NaN and {n_inf} Inf values (shape {tuple(x.shape)}); "
        "only finite activations can be calibrated -- check the model / data for overflow")


@dataclass(frozen=True)
class _Binning:
    """How a value becomes a bin index: ``trunc((|x| or x) * mult + offset)`` with ``mult`` float32 ``[C, 1]``.

    ``nonnegative``: the caller knows ``x >= 0`` (``|x|`` is ``x``). ``overflow``: some ``mult`` is not finite
    (``bins / amax`` for ``amax < ~1e-35``, far below any usable scale): such rows put all their non-zero
    values in the last bin."""

    mult: torch.Tensor
    offset: float
    length: int
    absolute: bool
    nonnegative: bool
    overflow: bool

    def write(self, xc: torch.Tensor, out: torch.Tensor) -> None:
        """Writes the int32 bin index of every value of the chunk ``xc`` into ``out`` (its shape)."""
        b = workspace("bins_f32", xc.shape, torch.float32, xc.device)
        if self.absolute and self.nonnegative:
            torch.mul(xc, self.mult, out=b)
        elif self.absolute:
            torch.abs(xc, out=b).mul_(self.mult)
            if self.offset:
                b.add_(self.offset)
        else:  # x * mult + offset in one op (an offset buffer of the chunk's shape: the fast path)
            torch.addcmul(filled(xc.shape, self.offset, xc.device), xc, self.mult, out=b)
        if self.overflow:
            torch.nan_to_num_(b, nan=self.offset, posinf=self.length - 1, neginf=0.0)
        out.copy_(b)  # float -> int32 truncates toward zero (= floor for the non-negative values here)


class _StagedBincount:
    """int64 counts of int32 indices, with few ``bincount`` calls: on CPU the indices of consecutive chunks are
    staged in one buffer and counted together (one ``bincount``, and one allocation of its result, per
    ``STAGE_ELEMS`` elements instead of one per chunk)."""

    def __init__(self, size: int, x2d: torch.Tensor):
        self.counts = torch.zeros(size, dtype=torch.int64, device=x2d.device)
        chunk = chunk_elems(x2d.device)  # a chunk holds < 1.5 * chunk elements (see column_chunks)
        staged = 3 * chunk // 2 <= STAGE_ELEMS and x2d.numel() > 2 * chunk
        self.stage = workspace("bins_stage", (STAGE_ELEMS,), torch.int32, x2d.device) if staged else None
        self.used = 0

    def slot(self, shape: tuple[int, int]) -> torch.Tensor:
        """An int32 buffer of ``shape`` for the next chunk's indices (counted by :meth:`commit`)."""
        if self.stage is None:
            return workspace("bins_i32", shape, torch.int32, self.counts.device)
        n = math.prod(shape)
        if self.used + n > STAGE_ELEMS:
            self.flush()
        return self.stage[self.used:self.used + n].view(shape)

    def commit(self, indices: torch.Tensor) -> None:
        """Counts the indices written into the last :meth:`slot` (now, or with the next flush)."""
        if self.stage is None:
            self.counts += torch.bincount(indices.reshape(-1), minlength=self.counts.numel())
        else:
            self.used += indices.numel()

    def flush(self) -> torch.Tensor:
        """Counts what is staged; returns the counts so far."""
        if self.used:
            self.counts += torch.bincount(self.stage[:self.used], minlength=self.counts.numel())
            self.used = 0
        return self.counts


@functools.lru_cache(maxsize=8)
def _lane_offsets(n: int, lanes: int, length: int, device: torch.device) -> torch.Tensor:
    """int32 ``[1, n]``: ``(i % lanes) * length`` (the lane of element ``i`` of a chunk)."""
    return (torch.arange(n, device=device, dtype=torch.int32) % lanes).mul_(length).reshape(1, n)


def _index_shifts(x2d: torch.Tensor, lanes: int, length: int) -> torch.Tensor | None:
    """int32 shifts added to the bin indices so that one ``bincount`` counts every row (``[C, 1]``: row ``c``
    counts at ``c * length``) or every lane (``[1, n]``); None for one row in one lane."""
    C = x2d.shape[0]
    if C > 1:
        return torch.arange(C, device=x2d.device, dtype=torch.int32).mul_(length).reshape(C, 1)
    if lanes > 1:  # the widest chunk has < 1.5 * chunk_elems columns (see column_chunks)
        return _lane_offsets(min(x2d.shape[1], 3 * chunk_elems(x2d.device) // 2), lanes, length, x2d.device)
    return None


def _native_counts(x2d: torch.Tensor, mult: float, length: int) -> torch.Tensor:
    """int64 ``[1, length]`` counts of one row from the compiled kernel (every value must fall in a bin)."""
    counts, over, nonfinite, _, _ = native.abs_counts(x2d, mult, length)
    if over or nonfinite:
        raise ValueError(f"{over + nonfinite} values fall outside the {length} bins: the caller must pass "
                         "finite values and a range that holds them")
    return counts.reshape(1, length)


def binned_counts(x2d: torch.Tensor, mult: torch.Tensor, offset: float, length: int, absolute: bool,
                   nonnegative: bool = False) -> torch.Tensor:
    """Per-row counts of ``trunc((|x| or x) * mult + offset)`` for indices ``0..length-1``.

    ``mult``: float32 ``[C]``; every index must already lie in ``[0, length)``. Returns int64 ``[C, length]``.
    ``nonnegative``: the caller knows ``x >= 0`` everywhere (e.g. a ReLU output), so ``|x|`` is ``x``.
    """
    C = x2d.shape[0]
    mult = mult.to(torch.float32).reshape(C, 1)
    overflow = not bool(torch.isfinite(mult).all())
    if C == 1 and absolute and offset == 0.0 and not overflow and float(mult) > 0 \
            and native.usable(x2d):  # one pass of the compiled kernel: the same counts
        return _native_counts(x2d, float(mult), length)
    # One row: consecutive elements are counted in LANES interleaved copies of the histogram (summed at
    # the end). A bin hit by long runs of equal values (the exact zeros of a ReLU) is then not one
    # counter incremented back to back, which serializes on the memory dependency (~1.5x slower).
    # (CPU only: accelerators count with atomics, and their chunks are too large for an offset buffer.)
    lanes = LANES if C == 1 and x2d.device.type == "cpu" and LANES * length <= MAX_LANE_BINS else 1
    shifts = _index_shifts(x2d, lanes, length)
    binning = _Binning(mult, offset, length, absolute, nonnegative, overflow)
    counter = _StagedBincount(lanes * C * length, x2d)
    for xc in column_chunks(x2d, merge_tail=True):
        indices = counter.slot(xc.shape)
        binning.write(xc, indices)
        if shifts is not None:
            indices.add_(shifts if C > 1 else shifts[:, :xc.shape[1]])
        counter.commit(indices)
    counts = counter.flush()
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
    counts = binned_counts(x2d, _row_mult(amax, bins), 0.0, bins + 1, absolute=True, nonnegative=nonnegative)
    counts[:, bins - 1] += counts[:, bins]
    return counts[:, :bins]


def signed_histogram(x2d: torch.Tensor, amax: torch.Tensor, bins_per_side: int, nonnegative: bool = False
                     ) -> torch.Tensor:
    """Histogram of ``x`` per row over ``[-amax_c, amax_c]`` with ``2 * bins_per_side`` equal bins.

    Returns int64 ``[C, 2 * bins_per_side]``; bin ``j`` counts ``(j - B) w <= x < (j - B + 1) w``
    with ``B = bins_per_side`` and ``w = amax / B``; the last bin also counts ``x == amax``.
    ``nonnegative=True`` promises ``x >= 0`` (e.g. a ReLU output): only the upper half is counted, with
    half the bins and without the offset (the bin index is then exactly ``trunc(x / w)``; in general it
    is ``trunc(x / w + B)`` rounded once in float32, which can move a value lying within ~1e-4 bin of an
    edge to the next bin).
    """
    B = bins_per_side
    if nonnegative:
        upper = binned_counts(x2d, _row_mult(amax, B), 0.0, B + 1, absolute=True, nonnegative=True)
        counts = upper.new_zeros(upper.shape[0], 2 * B + 1)
        counts[:, B:] = upper
    else:
        counts = binned_counts(x2d, _row_mult(amax, B), float(B), 2 * B + 1, absolute=False)
    counts[:, 2 * B - 1] += counts[:, 2 * B]
    return counts[:, :2 * B]


def percentile_from_histogram(counts: torch.Tensor, amax: torch.Tensor, percentile: float) -> torch.Tensor:
    """Clip where the cumulative count of an :func:`abs_histogram` reaches ``percentile`` %.

    The clip is interpolated linearly inside the bin where the target count ``percentile/100 * N``
    is reached (uniform density inside a bin), so ``percentile=100`` gives exactly ``amax`` and
    the result moves continuously with ``percentile`` (docs/methods.md#percentile).
    Returns float32 ``[C]``, ``0 <= clip <= amax``.
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
