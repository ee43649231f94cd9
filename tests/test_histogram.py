"""Tests for the histogram modules of calibkit.quant: exact counting (histogram, chunks), exact growth
(accumulating_histogram), KL search (kl_search), error tables and bounds (squared_error), order statistics."""

import math

import numpy as np
import pytest
import torch

from calibkit.quant import chunks
from calibkit.quant import histogram as H
from calibkit.quant import kl_search as KL
from calibkit.quant import squared_error as SE
from calibkit.quant.accumulating_histogram import AccumulatingHistogram
from calibkit.quant.order_statistics import abs_order_statistics, percentile_ranks
from calibkit.quant.numerics import quantize_dequantize, scale_from_amax


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True, params=["kernel", "torch-ops"])
def counting_path(request, monkeypatch):
    """Every test here runs twice: with the compiled counting kernel (calibkit.quant.native, where it can be built)
    and with the torch-ops path."""
    monkeypatch.setenv("CALIBKIT_NATIVE", "1" if request.param == "kernel" else "0")
    return request.param


def _rows(x):
    return x.reshape(1, -1).float()


# ---------------------------------------------------------------- one-shot histograms
def test_abs_histogram_matches_reference_and_is_int64():
    g = torch.Generator().manual_seed(0)
    bins, amax = 64, 4.0
    # values at bin centres (robust to rounding) plus the exact maximum, both signs
    k = torch.randint(0, bins, (5000,), generator=g)
    sign = torch.where(torch.rand(5000, generator=g) < 0.5, -1.0, 1.0)
    x = torch.cat([sign * (k + 0.5) * amax / bins, torch.tensor([amax, -amax])])
    counts = H.abs_histogram(_rows(x), torch.tensor([amax]), bins)
    assert counts.dtype == torch.int64 and counts.shape == (1, bins)
    ref = torch.bincount(k, minlength=bins)
    ref[-1] += 2  # the maximum lands in the closed last bin
    assert torch.equal(counts[0], ref)


def test_abs_histogram_per_row_equals_each_row_alone():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3000, generator=g) * torch.tensor([[0.1], [1.0], [10.0], [0.0], [3.0]])
    amax = x.abs().amax(1)
    together = H.abs_histogram(x, amax, 100)
    for c in range(5):
        alone = H.abs_histogram(x[c:c + 1], amax[c:c + 1], 100)
        assert torch.equal(together[c], alone[0])
    assert together[3, 0] == 3000  # an all-zero row puts everything in bin 0


def test_signed_histogram_mass_and_mirror_symmetry():
    g = torch.Generator().manual_seed(2)
    y = (torch.randint(0, 50, (4000,), generator=g) + 0.5) / 50  # bin centres in (0, 1)
    x = torch.cat([y, -y])
    counts = H.signed_histogram(_rows(x), torch.tensor([1.0]), 50)[0]
    assert int(counts.sum()) == x.numel()
    assert torch.equal(counts[:50], counts[50:].flip(0))


def test_counts_are_exact_beyond_float32_integer_range():
    # float32 counters stop at 2**24 (adding 1 no longer changes them); int64 counts do not.
    n = 2 ** 24 + 5
    x = torch.ones(n)
    x[0] = 2.0
    counts = H.abs_histogram(_rows(x), torch.tensor([2.0]), 4)
    assert counts.dtype == torch.int64
    assert int(counts[0, 2]) == n - 1 and int(counts[0, 3]) == 1
    acc = AccumulatingHistogram(4)
    acc.add(x)
    acc.add(x)
    assert int(acc.counts.sum()) == 2 * n and int(acc.counts.max()) == 2 * (n - 1)
    assert torch.finfo(torch.float32).eps * 2 * (n - 1) > 1  # the count would not be exact in float32


# ---------------------------------------------------------------- percentile interpolation
def test_percentile_from_histogram_interpolates_and_hits_max():
    x = torch.linspace(0, 1, 100001)  # uniform, exactly representable quantiles up to bin width
    amax = torch.tensor([1.0])
    counts = H.abs_histogram(_rows(x), amax, 1000)
    assert float(H.percentile_from_histogram(counts, amax, 100.0)) == 1.0
    for p in (50.0, 90.0, 99.0, 99.99):
        clip = float(H.percentile_from_histogram(counts, amax, p))
        assert abs(clip - p / 100) < 1e-3 + 1e-6  # within one bin width
    clips = [float(H.percentile_from_histogram(counts, amax, p)) for p in (10, 50, 90, 99, 99.9, 100)]
    assert clips == sorted(clips)


# ---------------------------------------------------------------- accumulated histogram
def _reference_counts(values: np.ndarray, width: float, length: int) -> np.ndarray:
    idx = np.floor(np.abs(values).astype(np.float64) / width).astype(np.int64)
    return np.bincount(idx, minlength=length)


@pytest.mark.parametrize("aligned", [True, False])
def test_accumulating_histogram_growth_is_exact(aligned):
    g = torch.Generator().manual_seed(3)
    acc = AccumulatingHistogram(bins=16, max_length=40)
    batches, first_width = [], None
    for scale in (1.0, 1.5, 3.0, 10.0, 40.0, 41.0):
        x = torch.randn(3000, generator=g) * scale
        if aligned and first_width is not None:
            # bin-aligned values: exact multiples of the first width, including bin edges
            x = torch.round(x / first_width) * first_width
        acc.add(x)
        first_width = first_width or acc.width
        batches.append(x)
        assert int(acc.counts.sum()) == sum(b.numel() for b in batches)  # mass preserved exactly
        assert len(acc) <= 40
    assert acc.width > first_width  # merges happened
    assert math.log2(acc.width).is_integer()
    every = torch.cat(batches).numpy()
    ref = _reference_counts(every, acc.width, len(acc))
    assert np.array_equal(acc.counts.numpy(), ref)
    assert acc.max_value == float(np.abs(every).max())


def test_accumulating_histogram_first_range_and_zero_batches():
    acc = AccumulatingHistogram(bins=64)
    acc.add(torch.zeros(7))
    assert acc.counts is None and acc.total == 7
    acc.add(torch.tensor([0.0, 3.0, -1.0]))
    assert 64 + 1 <= len(acc) <= 2 * 64  # width = power of two just below 3/64
    assert acc.width == 2.0 ** -5
    assert int(acc.counts[0]) == 8 and int(acc.counts.sum()) == 10
    with pytest.raises(ValueError, match=r"max_length=10 is out of range for bins=8 .*use an integer >= 16"):
        AccumulatingHistogram(bins=8, max_length=10)


# ---------------------------------------------------------------- KL search
def _kl_reference(hist: np.ndarray, nq: int) -> np.ndarray:
    """Slow TensorRT-style reference: one candidate threshold at a time."""
    h = hist.astype(np.float64)
    out = []
    for i in range(nq, len(h) + 1):
        p = h[:i].copy()
        p[i - 1] += h[i:].sum()
        group = (np.arange(i) * nq) // i
        q = np.zeros(i)
        nonempty = h[:i] > 0
        for gi in range(nq):
            members = group == gi
            if (members & nonempty).any():
                q[members & nonempty] = h[:i][members].sum() / (members & nonempty).sum()
        if q.sum() == 0:
            out.append(np.inf)
            continue
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        out.append(np.inf if (q[m] == 0).any() else float(np.sum(p[m] * np.log(p[m] / q[m]))))
    return np.array(out)


def test_kl_divergences_match_slow_reference_on_random_histograms():
    rng = np.random.default_rng(0)
    for trial in range(16):
        L = int(rng.integers(6, 70))
        nq = int(rng.integers(2, L + 1))
        if trial % 2:  # dense: most candidates finite
            h = rng.integers(0, 40, L) * (rng.random(L) > 0.3)
        else:  # sparse tail with rare far values: most candidates have KL = inf (the skipping path)
            h = np.zeros(L, dtype=np.int64)
            h[:max(2, nq // 2)] = rng.integers(1, 40, max(2, nq // 2))
            h[rng.integers(nq, L, 2)] += 1
        h[0] += 1
        ref = _kl_reference(h, nq)
        got = KL.kl_divergences(torch.tensor(h), nq, max_block=53).numpy()  # small blocks: several chunks
        assert np.array_equal(np.isinf(ref), np.isinf(got))
        fin = np.isfinite(ref)
        np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
def test_kl_group_bounds_from_the_table_equal_computed_ones(sparse, monkeypatch):
    # candidates beyond BOUNDS_TABLE_BINS compute their group boundaries instead of reading the cached table
    g = torch.Generator().manual_seed(6)
    h = (torch.rand(3000, generator=g) * 500).long()
    if sparse:
        h[400:] = 0
        h[[900, 2999]] = 1
    table = KL.kl_divergences(h, 128)
    monkeypatch.setattr(KL, "BOUNDS_TABLE_BINS", 1000)  # candidates above 1000 bins: computed
    mixed = KL.kl_divergences(h, 128, max_block=129 * 700)  # a block that straddles the limit
    assert torch.equal(torch.isinf(table), torch.isinf(mixed))
    fin = torch.isfinite(table)
    assert torch.allclose(table[fin], mixed[fin], rtol=1e-12, atol=0)
    bounds = KL._group_bounds(torch.tensor([128, 999, 1000, 1001, 2900]), 128)
    i = torch.tensor([128, 999, 1000, 1001, 2900])[:, None]
    assert torch.equal(bounds, -((-torch.arange(129) * i) // 128))  # ceil(g * i / nq)


def test_kl_threshold_on_gaussian_matches_reference():
    g = torch.Generator().manual_seed(4)
    acc = AccumulatingHistogram(bins=256)
    acc.add(torch.randn(400_000, generator=g))
    hist = acc.counts.clone()
    ref = _kl_reference(hist.numpy(), 128)
    i_ref = 128 + int(np.flatnonzero(ref == ref.min())[-1])
    assert KL.kl_threshold_bins(hist, 128) == i_ref
    clip = i_ref * acc.width
    assert 2.0 < clip < 5.0  # a plausible 8-bit entropy threshold for N(0, 1), well inside the max
    assert KL.kl_threshold_bins(torch.zeros(300, dtype=torch.int64), 128) == 0


# ---------------------------------------------------------------- mse error table
def test_sawtooth_integral_matches_numeric_integration():
    for m in (1, 7, 127):
        for z in (0.3, 0.5, 2.2, m + 0.25, m + 0.5, m + 3.7):
            y = np.linspace(0, z, 400001)
            e = (y - np.clip(np.round(y), 0, m)) ** 2
            numeric = np.trapezoid(e, y)
            got = float(SE._sawtooth_integral(np.float64(z), m))
            assert abs(got - numeric) < 1e-6 * max(1.0, numeric)


@pytest.mark.parametrize("bits", [4, 8])
def test_error_table_scores_match_exact_errors(bits):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200_000, generator=g)
    amax = x.abs().max().reshape(1)
    shrinks = tuple(1 - k / 100 for k in range(0, 96, 5))
    B = 2048
    counts = H.signed_histogram(_rows(x), amax, B)
    table = SE.squared_error_table(bits, B, shrinks)
    assert table.shape == (2 * B, len(shrinks)) and table.dtype == torch.float64
    score = (torch.cat([counts[:, B:], counts[:, :B].flip(1)], 1).double() @ table)[0] * float(amax) ** 2
    exact = torch.tensor([float(((quantize_dequantize(x, scale_from_amax(amax[0] * s, bits), bits) - x) ** 2)
                                .double().sum()) for s in shrinks])
    np.testing.assert_allclose(score.numpy(), exact.numpy(), rtol=0.02)
    assert int(score.argmin()) == int(exact.argmin())


@pytest.mark.parametrize("bits", [2, 4, 8, 12])
def test_bound_tables_enclose_the_exact_error(bits):
    g = torch.Generator().manual_seed(8)
    shrinks = (1.0, 0.8, 0.3)
    lo_t, hi_t = SE.squared_error_bound_tables(bits, 2048, shrinks)
    assert lo_t.shape == hi_t.shape == (len(shrinks), 4096) and lo_t.dtype == torch.float64
    assert SE.squared_error_bound_tables(bits, 2048, shrinks)[0] is lo_t  # cached
    for x in (torch.randn(50_000, generator=g), torch.randn(50_000, generator=g).relu(),
              torch.round(torch.randn(5_000, generator=g) * 7), torch.randn(3_000, generator=g) ** 3,
              torch.randn(40_000, generator=g).relu() * 1e-3, torch.randn(3_000, generator=g) ** 3 * 100):
        amax = x.abs().max().reshape(1)
        counts = H.signed_histogram(_rows(x), amax, 2048)
        for k, shrink in enumerate(shrinks):
            scale = scale_from_amax(amax * shrink, bits)
            lower, upper = (float((counts.double() @ t[k]) * scale.double() ** 2) for t in (lo_t, hi_t))
            exact = float(((quantize_dequantize(x, scale, bits) - x).double() ** 2).sum())
            assert 0 <= lower <= exact <= upper
            if bits <= 4 and shrink == 1.0:
                assert lower > 0.9 * exact and upper < 1.1 * exact  # fine bins relative to the step: tight


# ---------------------------------------------------------------- order statistics
def test_abs_order_statistics_equal_full_sort_for_large_rows():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(300_000, generator=g).relu()
    x[:1000] = 7.0  # ties
    x[5] = -50.0
    ranks = percentile_ranks([50.0, 99.0, 99.9, 99.99, 99.9999, 100.0], x.numel())
    got = abs_order_statistics(_rows(x), ranks)
    ref = torch.sort(x.abs()).values[ranks - 1]
    assert torch.equal(got[0], ref)
    small = torch.randn(4, 300, generator=g)
    r = percentile_ranks([99.0, 100.0], 300)
    assert torch.equal(abs_order_statistics(small, r), torch.sort(small.abs(), 1).values[:, r - 1])


def test_percentile_ranks():
    r = percentile_ranks([99.0, 99.99, 100.0, 1e-9], 10_000)
    assert r.tolist() == [9900, 9999, 10000, 1]


@pytest.mark.parametrize("bins", [64, H.MAX_LANE_BINS // H.LANES + 1])  # with and without interleaved lanes
def test_single_row_counts_match_reference_with_long_runs_of_equal_values(bins):
    # ReLU-like: long runs of exact zeros (the case the lanes exist for), a chunk boundary inside the data
    g = torch.Generator().manual_seed(7)
    x = torch.relu(torch.randn(chunks.CPU_CHUNK + 1000, generator=g))
    x[:5000] = 0.0
    amax = float(x.max())
    counts = H.abs_histogram(_rows(x), torch.tensor([amax]), bins)[0]
    idx = (x * torch.tensor(bins / amax, dtype=torch.float32)).to(torch.int64).clamp(max=bins - 1)
    assert torch.equal(counts, torch.bincount(idx, minlength=bins))


@pytest.mark.parametrize("n", [chunks.CPU_CHUNK + 10, chunks.CPU_CHUNK + chunks.CPU_CHUNK // 2 + 10,
                               3 * chunks.CPU_CHUNK - 7, 12 * chunks.CPU_CHUNK + 5])
def test_counts_do_not_depend_on_chunking(n, monkeypatch):
    # a short last chunk is merged into the one before it, and on CPU the indices of several chunks are counted
    # together: the counts must equal those of one chunk holding everything
    g = torch.Generator().manual_seed(8)
    x = _rows(torch.randn(n, generator=g))
    amax = x.abs().max()[None]
    chunked = (H.signed_histogram(x, amax, 300), H.abs_histogram(x, amax, 300))
    sizes = [c.shape[1] for c in chunks.column_chunks(x, merge_tail=True)]
    assert sum(sizes) == n and all(c >= chunks.CPU_CHUNK for c in sizes[:-1]) and sizes[-1] >= chunks.CPU_CHUNK // 2
    plain = [c.shape[1] for c in chunks.column_chunks(x)]
    assert len(sizes) == len(plain) - (plain[-1] < chunks.CPU_CHUNK // 2)
    monkeypatch.setattr(chunks, "CPU_CHUNK", 2 * n)
    assert len(list(chunks.column_chunks(x))) == 1
    whole = (H.signed_histogram(x, amax, 300), H.abs_histogram(x, amax, 300))
    assert all(torch.equal(a, b) for a, b in zip(chunked, whole)) and int(chunked[0].sum()) == n
