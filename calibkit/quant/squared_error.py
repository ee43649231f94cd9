"""The L2 quantize-dequantize error ``sum((x - qdq(x, scale))**2)``: measured exactly on data, or read from a
signed histogram as an estimate (closed form) and as guaranteed bounds (the ``mse`` and ``mix`` observers,
docs/methods.md#mse and docs/methods.md#mix).

``qdq`` is ``round(x / s).clamp(qmin, qmax) * s`` as in :func:`calibkit.quant.numerics.quantize_dequantize`.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from calibkit.quant.chunks import column_chunks, workspace
from calibkit.quant.numerics import qrange


# ---------------------------------------------------------------- measured on the data
class SquaredErrors:
    """Accumulates exact L2 quantize-dequantize errors ``sum((x - qdq(x, s))**2)`` chunk by chunk.

    Args:
        scales: float32 ``[C, T]``: ``T`` candidate scales per row; bits: the integer grid.
    Call it on consecutive column chunks ``xc`` (``[C, n]``, float32) of the data; ``out`` holds the
    float64 ``[C, T]`` sums (float32 partial sums per chunk).
    """

    def __init__(self, scales: torch.Tensor, bits: int):
        self.qmin, self.qmax = qrange(bits)
        self.scales = scales.to(torch.float32)
        self.parts: list[torch.Tensor] = []
        # Rows whose scale is tiny or huge would underflow/overflow float32 squares: they are computed
        # on x * 2**-e (e: the exponent of the row's largest scale). Scaling by a power of two is exact,
        # so every rounding is the same as on x itself; the sums are scaled back in float64.
        _, e = torch.frexp(self.scales.amax(1, keepdim=True))
        self.factor = None
        if bool(((e < -40) | (e > 40)).any()):
            self.factor = torch.where((e < -40) | (e > 40), torch.ldexp(torch.ones_like(self.scales[:, :1]), -e),
                                      torch.ones_like(self.scales[:, :1]))
            self.scales = self.scales * self.factor

    def __call__(self, xc: torch.Tensor) -> None:
        if self.factor is not None:
            xc = torch.mul(xc, self.factor, out=workspace("sq_err_x", xc.shape, torch.float32, xc.device))
        C, n = xc.shape
        T = self.scales.shape[1]
        b = workspace("sq_err_f32", (C, T, n), torch.float32, xc.device)
        s, x = self.scales[:, :, None], xc[:, None, :]
        # all candidates in one op each: q = clamp(round(x / s)), then x - q * s, squared and summed
        torch.div(x, s, out=b).round_().clamp_(self.qmin, self.qmax)
        torch.addcmul(x, b, s, value=-1, out=b)
        self.parts.append(b.square_().sum(2))

    @property
    def out(self) -> torch.Tensor:
        """float64 ``[C, T]`` error sums over the chunks seen so far."""
        C, T = self.scales.shape
        if not self.parts:
            return torch.zeros(C, T, dtype=torch.float64, device=self.scales.device)
        total = torch.stack(self.parts).double().sum(0)
        return total if self.factor is None else total / self.factor.double() ** 2


def squared_errors(x2d: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Exact L2 quantize-dequantize errors per row and candidate: float64 ``[C, T]``.

    ``x2d``: float32 ``[C, N]``; ``scales``: float32 ``[C, T]``. All candidates are evaluated together on
    each chunk of ``chunk_elems / T`` elements (see :class:`SquaredErrors`), so the work buffer stays in cache.
    """
    acc = SquaredErrors(scales.to(x2d.device), bits)
    for xc in column_chunks(x2d, merge_tail=True, fan_out=scales.shape[1]):
        acc(xc)
    return acc.out


# ---------------------------------------------------------------- estimated from a histogram
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
    """:func:`squared_error_table` on ``device`` in ``dtype`` (cached)."""
    return _error_table_cpu(bits, bins_per_side, shrinks).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _error_table_cpu(bits: int, bins_per_side: int, shrinks: tuple[float, ...]) -> torch.Tensor:
    """:func:`squared_error_table` in float64 on the CPU (numpy: a one-off table, without intra-op threading)."""
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


# ---------------------------------------------------------------- bounded from a histogram
def squared_error_bound_tables(bits: int, bins_per_side: int, shrinks: tuple[float, ...], margin: float = 2e-3,
                               device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Guaranteed lower and upper bounds of the L2 error from a signed histogram (no pass over the data), as two
    float64 tables ``[K, 2B]`` (lower, upper; step² units), one row per candidate scale
    ``scale_from_amax(amax * shrinks[k])``.

    Each bin contributes its count times the smallest (lower) and the largest (upper) error any value inside it
    can have (see :func:`_bin_error_extremes`). The bin width in steps is ``(qmax - qmin) / 2 / (B * shrinks[k])``
    whatever ``amax``, so the bounds of a row of counts ``c`` are ``(c @ table[k]) * scale_k**2``. Bins are widened
    by ``margin`` of their width on each side, which covers the float32 rounding of the bin index, of
    ``amax * shrink`` and of the scale. Not valid where the scale is clamped at ``MIN_SCALE`` or ``bins / amax``
    overflows. Cached."""
    return _bound_tables(int(bits), int(bins_per_side), tuple(float(s) for s in shrinks), float(margin),
                         torch.device(device) if device is not None else torch.device("cpu"))


@functools.lru_cache(maxsize=32)
def _bound_tables(bits, B, shrinks, margin, device):
    """:func:`squared_error_bound_tables` (cached)."""
    qmin, qmax = qrange(bits)
    r = (qmax - qmin) / 2 / (B * torch.tensor(shrinks, dtype=torch.float64))
    lo, hi = _signed_bin_extremes(r[:, None], B, bits, margin)                   # [K, 2B]
    return lo.to(device), hi.to(device)


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
