"""ActivationStats: thresholds re-derived from stored statistics equal a fresh percentile calibration."""

import math

import pytest
import torch

from calibkit.analysis.activation_stats import ActivationStats, activation_quantizers
from calibkit.quant.calibrate import calibrate
from calibkit.quant.fake_quantize import named_quantizers
from calibkit.cifar.models import cifar_resnet
from calibkit.quant.prepare import prepare
from calibkit.quant.qconfig import get_default_qconfig
from calibkit.quant.numerics import scale_from_amax


@pytest.fixture(scope="module")
def float_model():
    torch.manual_seed(0)
    return cifar_resnet(width=(8, 16, 16)).eval()


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    # different scales per batch so that the moving average matters; a heavy-tailed batch too
    out = [torch.randn(8, 3, 32, 32, generator=g) * (0.5 + 0.5 * i) for i in range(4)]
    out[2] = out[2] + torch.distributions.StudentT(2.0).sample(out[2].shape)
    return out


@pytest.fixture(scope="module")
def stats(float_model, batches):
    prepared = prepare(float_model, get_default_qconfig("min_max"), batches[0][:2])
    return ActivationStats.collect(prepared, batches, progress=False)


def _percentile_calibration(float_model, batches, percentile, bins, c):
    qc = get_default_qconfig("percentile", activation_kwargs={"percentile": percentile, "bins": bins,
                                                              "averaging_constant": c})
    prepared = prepare(float_model, qc, batches[0][:2])
    calibrate(prepared, batches, progress=False)
    return {n: float(q.observer.get_amax()) for n, q in activation_quantizers(prepared).items()}


@pytest.mark.parametrize("percentile,bins,c", [(99.99, 2048, 0.01), (99.9, 4096, 0.5), (99.9999, 16384, 0.3),
                                               (100.0, 8, 1.0), (50.0, 32768, 0.0), (99.9875, 8192, 0.01)])
def test_rederived_thresholds_equal_fresh_calibration(float_model, batches, stats, percentile, bins, c):
    fresh = _percentile_calibration(float_model, batches, percentile, bins, c)
    got = stats.percentile_amax(percentile, bins, c)
    assert list(got) == list(fresh)
    for name in fresh:  # bit for bit (documented: identical arithmetic, ties included)
        assert got[name] == fresh[name], (name, got[name], fresh[name])
    assert all(v > 0 for v in got.values())


def test_collect_shapes_and_memory(stats, batches):
    assert stats.num_batches == len(batches)
    assert stats.names[0] == "input" and "fc.out" in stats.names
    for name in stats.names:
        assert stats.cum_counts[name].dtype == torch.int32
        assert stats.cum_counts[name].shape == (len(batches), stats.fine_bins)
        assert torch.equal(stats.cum_counts[name][:, -1].to(torch.int64), stats.numel[name])
        fine = stats.fine_counts(name)
        assert torch.equal(fine.sum(1), stats.numel[name]) and bool((fine >= 0).all())
    inp = stats.amax["input"]
    assert torch.equal(inp, torch.stack([b.abs().max() for b in batches]))
    expected = sum(4 * stats.fine_bins * len(batches) + 4 * len(batches) + 8 * len(batches) for _ in stats.names)
    assert stats.nbytes == expected


def test_collect_leaves_activation_observers_alone_and_calibrates_weights(float_model, batches):
    prepared = prepare(float_model, get_default_qconfig("min_max"), batches[0][:2])
    ActivationStats.collect(prepared, batches[:2], progress=False)
    for name, q in named_quantizers(prepared).items():
        assert q.observing and not q.fake_quantizing, name  # flags restored (CALIBRATION defaults)
        assert int(q.observer.steps) == (2 if q.kind == "weight" else 0), name
    prepared2 = prepare(float_model, get_default_qconfig("min_max"), batches[0][:2])
    ActivationStats.collect(prepared2, batches[:1], progress=False, calibrate_weights=False)
    assert all(int(q.observer.steps) == 0 for q in named_quantizers(prepared2).values())


def test_bad_arguments(stats, float_model, batches):
    with pytest.raises(ValueError, match="bins=3000 does not divide fine_bins=32768"):
        stats.percentile_amax(99.99, 3000)
    with pytest.raises(ValueError, match="percentile=100.5 is out of range"):
        stats.percentile_amax(100.5, 2048)
    with pytest.raises(ValueError, match="averaging_constant"):
        stats.percentile_amax(99.9, 2048, 1.5)
    with pytest.raises(ValueError, match="bins=1 is out of range"):
        stats.percentile_amax(99.9, 1)
    with pytest.raises(ValueError, match="fine_bins=30000 is out of range"):
        ActivationStats.collect(prepare(float_model, get_default_qconfig("min_max"), batches[0][:2]), batches,
                                fine_bins=30000, progress=False)
    with pytest.raises(ValueError, match="name='nope'"):
        stats.histogram("nope")
    assert stats.allowed_bins(2048) == [2048, 4096, 8192, 16384, 32768]


def test_batch_clips_match_single_batch_observer(float_model, batches, stats):
    # a one-batch calibration sets the threshold to that batch's clip exactly
    fresh = _percentile_calibration(float_model, batches[2:3], 99.95, 1024, 0.01)
    for name in stats.names:
        assert float(stats.batch_clips(name, 99.95, 1024)[2]) == fresh[name]


def test_thresholds_monotone_in_percentile(stats):
    prev = None
    for p in (99.0, 99.9, 99.99, 99.999, 100.0):
        cur = stats.percentile_amax(p, 2048, 0.01)
        if prev is not None:
            assert all(cur[n] >= prev[n] for n in cur)
        prev = cur
    averaged_max = {}  # 100 % is the moving-averaged batch max |x|
    for name in stats.names:
        v = stats.amax[name][0].clone()
        for a in stats.amax[name][1:]:
            v = v + 0.01 * (a - v)
        averaged_max[name] = float(v)
    assert prev == pytest.approx(averaged_max, rel=1e-6)


def test_apply_loads_scales_and_bits(float_model, batches, stats):
    prepared = prepare(float_model, get_default_qconfig("min_max"), batches[0][:2])
    amaxes = stats.percentile_amax(99.9, 2048)
    stats.apply(prepared, amaxes, bits=6)
    acts = activation_quantizers(prepared)
    for name, a in amaxes.items():
        q = acts[name]
        assert q.is_fixed and q.bits == 6
        assert torch.equal(q.scale, scale_from_amax(a, 6))
    with pytest.raises(ValueError, match="not activation quantizers"):
        stats.apply(prepared, {"fc.weight": 1.0})
    with pytest.raises(ValueError, match="out of range"):
        stats.apply(prepared, {"input": math.nan})
    with pytest.raises(ValueError, match="bits=1"):
        stats.apply(prepared, amaxes, bits=1)


def test_histogram_aggregates_all_values(stats):
    for name in stats.names[:3]:
        edges, counts = stats.histogram(name, bins=256)
        assert edges.shape == (257,) and counts.shape == (256,)
        assert int(counts.sum()) == int(stats.numel[name].sum())
        assert float(edges[-1]) == pytest.approx(float(stats.amax[name].max()))
    ratios = stats.tail_ratio(99.9)
    assert all(r >= 1.0 for r in ratios.values())


def test_save_load_roundtrip(stats, tmp_path):
    path = stats.save(tmp_path / "stats.pt")
    again = ActivationStats.load(path)
    assert again.names == stats.names and again.fine_bins == stats.fine_bins
    assert again.percentile_amax(99.99, 4096, 0.1) == stats.percentile_amax(99.99, 4096, 0.1)
