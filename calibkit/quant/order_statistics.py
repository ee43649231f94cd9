"""Exact order statistics of ``|x|``: the ``mix`` observer's candidate clips (docs/methods.md#mix).

No histogram approximation: the results are identical to a full sort, but a single large row (an activation)
is not sorted whole.
"""

from __future__ import annotations

import torch

from calibkit.quant.chunks import column_chunks, workspace

_BUCKET_SHIFT = 16  # float32 bit pattern >> 16: sign(0) + 8 exponent bits + 7 mantissa bits


def percentile_ranks(percentiles: torch.Tensor | list[float], n: int) -> torch.Tensor:
    """1-based rank ``ceil(p/100 * n)`` (clamped to ``[1, n]``) of each percentile ``p``."""
    p = torch.as_tensor(percentiles, dtype=torch.float64)
    r = torch.ceil(p * n / 100.0 * (1 - 1e-12))
    return r.clamp_(1, n).to(torch.int64)


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
    floor, below = _bucket_floor(x2d, int(ranks.min()))
    picked = []
    for xc in column_chunks(x2d):
        a = torch.abs(xc, out=workspace("bins_f32", xc.shape, torch.float32, x2d.device))
        picked.append(a[a >= floor])
    top = torch.sort(torch.cat(picked)).values
    return top.index_select(0, (ranks - 1 - below).to(top.device)).reshape(1, -1)


def _bucket_floor(x2d: torch.Tensor, rank: int) -> tuple[float, int]:
    """For one row: the smallest ``|x|`` of the bit-pattern bucket holding the ``rank``-th smallest ``|x|``, and
    how many values lie in the buckets below it."""
    nb = 1 << (31 - _BUCKET_SHIFT)
    counts = torch.zeros(nb, dtype=torch.int64, device=x2d.device)
    for xc in column_chunks(x2d):
        b = workspace("bins_f32", xc.shape, torch.float32, x2d.device)
        ib = workspace("bins_i32", xc.shape, torch.int32, x2d.device)
        torch.abs(xc, out=b)
        torch.bitwise_right_shift(b.view(torch.int32), _BUCKET_SHIFT, out=ib)
        counts += torch.bincount(ib.reshape(-1), minlength=nb)
    cum = counts.cumsum(0)
    b0 = int((cum < rank).sum())
    below = int(cum[b0 - 1]) if b0 > 0 else 0
    return torch.tensor(b0 << _BUCKET_SHIFT, dtype=torch.int32).view(torch.float32).item(), below
