"""Percentile behaviour on the spec's three distributions (notebook 03 gallery)."""

import pytest
import torch

from calibkit.tutorial.gallery import (gallery_distributions, gallery_summary, percentile_curve,
                                         percentile_gallery)

PS = (99.0, 99.5, 99.9, 99.99, 99.999, 100.0)


@pytest.fixture(scope="module")
def dists():
    return gallery_distributions(n=100_000, seed=0)


def _curve(dists, name):
    return percentile_curve(dists[name].values, PS, bits=(4, 6, 8))


def test_distributions_are_seeded(dists):
    again = gallery_distributions(n=100_000, seed=0)
    assert all(torch.equal(dists[k].values, again[k].values) for k in dists)
    other = gallery_distributions(n=100_000, seed=1)
    assert not torch.equal(dists["wide_range"].values, other["wide_range"].values)
    with pytest.raises(ValueError, match="n=10"):
        gallery_distributions(n=10)


def test_ultra_long_tail_wants_a_lower_percentile(dists):
    c = _curve(dists, "ultra_long_tail")
    th = dict(zip(c["percentiles"], c["thresholds"]))
    assert th[100.0] > 10 * th[99.9]  # the maximum sits far beyond the bulk
    i9, i99999 = PS.index(99.9), PS.index(99.999)
    for bits in (4, 6, 8):  # the bulk keeps its resolution only with the lower percentile
        assert c["by_bits"][bits]["bulk_sqnr_db"][i9] > c["by_bits"][bits]["bulk_sqnr_db"][i99999] + 10
    for bits in (4, 6):  # at low bit widths the total error is lower too
        assert c["by_bits"][bits]["sqnr_db"][i9] > c["by_bits"][bits]["sqnr_db"][i99999]
        assert c["by_bits"][bits]["best_percentile"] < 99.999


def test_wide_range_cannot_be_fixed_by_the_percentile(dists):
    c = _curve(dists, "wide_range")
    for bits, cur in c["by_bits"].items():
        tail = cur["sqnr_db"][PS.index(99.9):]
        assert max(tail) - min(tail) < 0.5  # flat: moving the percentile changes nothing
        assert min(cur["zero_fraction"]) > 0.4  # and a large share of values is lost at every clip


def test_dense_spikes_need_large_moves(dists):
    c = _curve(dists, "dense_spikes")
    th = dict(zip(c["percentiles"], c["thresholds"]))
    assert abs(th[99.99] / th[99.9] - 1) < 0.02 and abs(th[99.999] / th[99.9] - 1) < 0.02
    assert th[99.5] < th[99.9] / 5  # only a move below 100 % - spike share reaches the bulk


def test_gallery_and_summary():
    g = percentile_gallery(n=20_000, seed=0, percentiles=(99.0, 99.9, 100.0), bits=(8,), hist_bins=50)
    assert list(g) == ["ultra_long_tail", "wide_range", "dense_spikes"]
    for res in g.values():
        edges, counts = res["hist"]
        assert len(edges) == 51 and int(counts.sum()) == 20_000
    s = gallery_summary(g)
    assert set(s["dense_spikes"]["thresholds"]) == {"99.9", "100"}
    assert s["wide_range"]["bits_8"]["sqnr_db_max"] >= s["wide_range"]["bits_8"]["sqnr_db_min"]
    with pytest.raises(ValueError, match="percentile=101"):
        percentile_curve(torch.randn(100), (101,))
