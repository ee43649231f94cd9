"""The ``kl`` observer's TensorRT-style entropy threshold search over a histogram of ``|x|`` (docs/methods.md#kl).

Every candidate threshold is evaluated at once with prefix sums over the histogram (no Python loop over bins),
in blocks small enough to stay in cache.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

#: Candidates up to this many bins take their group boundaries from a cached table (at most ~17 MB for 8-bit).
BOUNDS_TABLE_BINS = 1 << 14
_bounds_tables: dict = {}


class _Prefix(NamedTuple):
    """float64 prefix sums of a histogram ``h`` ``[L]``, each ``[L + 1]`` (entry ``i``: over ``h[:i]``)."""

    h: torch.Tensor
    total: torch.Tensor   # sum(h)
    mass: torch.Tensor    # sum(h[:i])
    used: torch.Tensor    # number of non-empty bins before i
    hlogh: torch.Tensor   # sum(h log h) before i

    @classmethod
    def of(cls, h: torch.Tensor) -> "_Prefix":
        """The prefix sums of ``h`` (float64 ``[L]``)."""
        zero = h.new_zeros(1)
        return cls(h, h.sum(), torch.cat([zero, h.cumsum(0)]), torch.cat([zero, (h > 0).to(torch.float64).cumsum(0)]),
                   torch.cat([zero, torch.xlogy(h, h).cumsum(0)]))


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
    s = _Prefix.of(h)
    cand = torch.arange(nq, L + 1, device=h.device, dtype=torch.int64)
    keep = _sparse_finite(cand, s)
    if keep is None:
        return _candidate_kl(cand, s, nq, max_block, contiguous=True)
    kl = _candidate_kl(cand.index_select(0, keep), s, nq, max_block, contiguous=False)
    return torch.full((L - nq + 1,), torch.inf, dtype=torch.float64, device=h.device).index_copy_(0, keep, kl)


def _sparse_finite(cand: torch.Tensor, s: _Prefix) -> torch.Tensor | None:
    """Positions of the candidates that can have a finite KL, when they are fewer than half (else None):
    a candidate whose last kept bin is empty while values are clipped has KL = inf (q = 0 < p)."""
    kept, h_last = s.mass.index_select(0, cand), s.h.index_select(0, cand - 1)
    finite = ((h_last > 0) | (kept == s.total)) & (kept > 0)
    return torch.nonzero(finite)[:, 0] if 2 * int(finite.sum()) < cand.numel() else None


def _candidate_kl(cand: torch.Tensor, s: _Prefix, nq: int, max_block: int, contiguous: bool) -> torch.Tensor:
    """float64 KL of each candidate ``i`` in ``cand`` (ascending; ``contiguous``: a run of consecutive ints)."""
    Ci, h_last, N = s.mass.index_select(0, cand), s.h.index_select(0, cand - 1), s.total
    logN = torch.log(N)
    MlogQ = _group_mass_log_q(cand, s, nq, max_block, contiguous)
    last_lo = ((nq - 1) * cand + (nq - 1)) // nq                    # first bin of the last group
    M_last = Ci - s.mass.index_select(0, last_lo)
    Z_last = s.used.index_select(0, cand) - s.used.index_select(0, last_lo)
    logq_last = torch.where(h_last > 0, torch.log(M_last.clamp(min=1e-300) / Z_last.clamp(min=1)), 0.0)
    logC = torch.log(Ci.clamp(min=1e-300))
    # bins j < i-1:  sum h_j [log h_j - log N - log Qu_j + log C_i]   (Qu = unnormalized Q)
    body = s.hlogh.index_select(0, cand - 1) - (Ci - h_last) * (logN - logC) - (MlogQ - h_last * logq_last)
    p_last = h_last + (N - Ci)
    last = torch.where(p_last > 0, p_last * (torch.log(p_last.clamp(min=1e-300)) - logN - logq_last + logC), 0.0)
    kl = (body + last) / N
    kl = torch.where((h_last == 0) & (p_last > 0), torch.inf, kl)
    return torch.where(Ci > 0, kl, torch.inf)


def _group_mass_log_q(cand: torch.Tensor, s: _Prefix, nq: int, max_block: int, contiguous: bool) -> torch.Tensor:
    """float64 ``sum over groups of M log(M / Z)`` per candidate (``M``: the group's count, ``Z``: its non-empty
    bins; both integers, ``0 log 0 = 0``), in blocks of about ``max_block`` entries."""
    out = torch.empty(cand.numel(), dtype=torch.float64, device=cand.device)
    step = max(1, max_block // (nq + 1))
    for lo in range(0, cand.numel(), step):
        b = _group_bounds(cand[lo:lo + step], nq, contiguous=contiguous).reshape(-1)  # [rows * (nq + 1)]
        Mb = s.mass.index_select(0, b).view(-1, nq + 1)
        Zb = s.used.index_select(0, b).view(-1, nq + 1)
        M = Mb[:, 1:] - Mb[:, :-1]
        Z = (Zb[:, 1:] - Zb[:, :-1]).clamp_(min=1)
        torch.sum(M.clamp(min=1).div_(Z).log_().mul_(M), 1, out=out[lo:lo + step])
    return out


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


def abs_histogram_l2(counts: torch.Tensor, width: float, clips: list[float], bits: int) -> torch.Tensor:
    """Estimated L2 quantize-dequantize error (float64 ``[len(clips)]``) of each clip for the values of a histogram
    of ``|x|`` (bin ``k``: ``[k * width, (k + 1) * width)``), each value taken at its bin centre ``v``: clipped
    values (``v`` beyond the largest level ``qmax * s``, ``s = clip / ((qmax - qmin) / 2)``) cost
    ``(v - qmax * s)**2``, the others ``min(v**2, s**2 / 12)`` (rounding noise, or rounding to zero). Bin 0 (the
    exact zeros, which no grid changes) is left out."""
    qmax = 2 ** (bits - 1) - 1
    c = counts.reshape(-1)[1:].to(torch.float64)
    v = (torch.arange(1, c.numel() + 1, dtype=torch.float64, device=c.device) + 0.5) * width
    out = []
    for clip in clips:
        s = clip / (qmax + 0.5)
        top = qmax * s
        err = torch.where(v > top, (v - top) ** 2, torch.clamp(v * v, max=s * s / 12))
        out.append((c * err).sum())
    return torch.stack(out)
