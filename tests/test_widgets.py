"""The slider compute function and the percentile explorer widgets (no Jupyter frontend needed)."""

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from calibkit.analysis.activation_stats import ActivationStats, activation_quantizers
from calibkit.quant.calibrate import calibrate, evaluate
from calibkit.quant.fake_quantize import FakeQuantState, set_fake_quantize
from calibkit.cifar.models import cifar_resnet
from calibkit.quant.prepare import prepare
from calibkit.quant.qconfig import get_default_qconfig
from calibkit.tutorial.widgets import (explore_percentile, nines_to_percentile, percentile_explorer, percentile_to_nines)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = cifar_resnet(width=(8, 16, 16)).eval()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(3)]
    images = torch.randn(48, 3, 32, 32, generator=g)
    with torch.no_grad():
        labels = model(images).argmax(1)  # the float model's own predictions: float accuracy is 1.0
    prepared = prepare(model, get_default_qconfig("percentile"), batches[0][:2])
    stats = ActivationStats.collect(prepared, batches, progress=False)
    return model, batches, images, labels, prepared, stats


def test_explore_matches_fresh_percentile_calibration(setup):
    model, batches, images, labels, prepared, stats = setup
    res = explore_percentile(stats, prepared, images, labels, percentile=99.9, bins=4096, bits=8, layer="stem.conv.out")
    qc = get_default_qconfig("percentile", activation_kwargs={"percentile": 99.9, "bins": 4096})
    fresh = prepare(model, qc, batches[0][:2])
    calibrate(fresh, batches, progress=False)
    set_fake_quantize(fresh, FakeQuantState.VALIDATION)
    assert res["accuracy"] == evaluate(fresh, images, labels, progress=False)
    assert res["amaxes"] == {n: float(q.observer.get_amax()) for n, q in activation_quantizers(fresh).items()}
    assert 0.0 <= res["accuracy"] <= 1.0 and res["num_images"] == 48
    assert res["layer"] == "stem.conv.out" and res["amax"] == res["amaxes"]["stem.conv.out"]
    edges, counts = res["histogram"]
    assert len(edges) == len(counts) + 1 and int(counts.sum()) == int(stats.numel["stem.conv.out"].sum())
    assert res["seconds"] > 0 and not res["cached"]


def test_explore_threshold_monotone_and_bits(setup):
    model, _, images, labels, prepared, stats = setup
    prev = None
    for p in (99.0, 99.9, 99.99, 100.0):
        res = explore_percentile(stats, prepared, images, labels, percentile=p, bins=2048, bits=8)
        if prev is not None:
            assert all(res["amaxes"][n] >= prev["amaxes"][n] for n in stats.names)
        prev = res
    with torch.no_grad():
        ref = model(images)
    err = {}
    for bits in (4, 8, 16):
        res = explore_percentile(stats, prepared, images, labels, percentile=99.99, bits=bits)
        assert all(q.bits == bits for q in activation_quantizers(prepared).values())
        with torch.no_grad():
            err[bits] = float((prepared(images) - ref).abs().mean())
    assert res["accuracy"] >= 0.9  # 16-bit activations, 8-bit weights: close to the float model (1.0)
    assert err[4] > err[8] > err[16]  # the bit width reaches the activation grids
    with pytest.raises(ValueError, match="layer='nope'"):
        explore_percentile(stats, prepared, images, labels, layer="nope")
    with pytest.raises(ValueError, match="bins=1000 does not divide"):
        explore_percentile(stats, prepared, images, labels, bins=1000)


def test_explore_cache(setup):
    _, _, images, labels, prepared, stats = setup
    cache = {}
    a = explore_percentile(stats, prepared, images, labels, percentile=99.95, cache=cache)
    b = explore_percentile(stats, prepared, images, labels, percentile=99.95, cache=cache, layer="fc.out")
    assert not a["cached"] and b["cached"] and a["accuracy"] == b["accuracy"] and len(cache) == 1


def test_nines_mapping():
    assert nines_to_percentile(3) == 99.9 and nines_to_percentile(4) == 99.99 and nines_to_percentile(6) == 99.9999
    assert percentile_to_nines(99.999) == pytest.approx(5.0)
    assert percentile_to_nines(100) == float("inf")


def test_static_explorer_returns_result(setup):
    _, _, images, labels, prepared, stats = setup
    res = percentile_explorer(stats, prepared, images, labels, percentile=99.9, bins=8192, bits=6, live=False,
                              show=False, method_clips={"input": {"min_max": 3.0}})
    assert res["bits"] == 6 and res["bins"] == 8192 and 0.0 <= res["accuracy"] <= 1.0
    fig = res["figure"]
    labels_drawn = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith("min_max") for t in labels_drawn) and any(t.startswith("slider") for t in labels_drawn)


def test_live_explorer_widgets(setup):
    _, _, images, labels, prepared, stats = setup
    ex = percentile_explorer(stats, prepared, images, labels, live=True, show=False,
                             subset="48 test images (fixed subset, seed 3)")
    classes = {k: w._dom_classes for k, w in ex.controls.items()}
    assert classes == {"nines": ("calibkit-percentile",), "percentile": ("calibkit-percentile-value",),
                       "bins": ("calibkit-bins",), "bits": ("calibkit-bits",), "layer": ("calibkit-layer",)}
    assert "calibkit-accuracy" in ex.readout._dom_classes and "calibkit-explorer" in ex.widget._dom_classes
    assert all(not getattr(w, "continuous_update", False) for w in ex.controls.values())
    assert ex.controls["bins"].options == (1024, 2048, 4096, 8192, 16384, 32768)
    assert ex.controls["bits"].options == (4, 6, 8, 16)
    assert "48 test images (fixed subset, seed 3)" in ex.readout.value and len(ex.history) == 1
    ex.controls["nines"].value = 3.0  # slider release -> exact percentile box and a new result
    assert ex.controls["percentile"].value == 99.9 and ex.result["percentile"] == 99.9 and len(ex.history) == 2
    ex.controls["percentile"].value = 99.9875  # typed value -> slider follows, result uses the exact value
    assert ex.controls["nines"].value == pytest.approx(percentile_to_nines(99.9875))
    assert ex.result["percentile"] == 99.9875 and len(ex.history) == 3
    ex.controls["layer"].value = "fc.out"
    assert ex.result["layer"] == "fc.out" and ex.result["cached"]
    ex.controls["bits"].value = 4
    assert ex.result["bits"] == 4 and not ex.result["cached"]


def test_table_and_histogram_plot(tmp_path):
    from calibkit.tutorial.figures import plot_histogram_with_clips
    from calibkit.tutorial.table import Table

    rows = [{"method": "mse", "accuracy": 0.91234, "seconds": 3}, {"method": "kl<x>", "accuracy": float("nan")}]
    text = Table(rows, float_format=".2f").to_text().splitlines()
    assert text[0].split() == ["method", "accuracy", "seconds"] and text[2].split() == ["mse", "0.91", "3"]
    assert text[3].split() == ["kl<x>", "nan", "-"]
    assert "<td>kl&lt;x&gt;</td>" in Table(rows)._repr_html_()
    assert "<caption>c</caption>" in Table(rows, title="c")._repr_html_()
    lines = Table(rows).to_csv(tmp_path / "t.csv").read_text().splitlines()
    assert lines == ["method,accuracy,seconds", "mse,0.91234,3", "kl<x>,,"]
    fig = plot_histogram_with_clips(([0.0, 1.0, 2.0], [5, 1]), {"mse": 1.5, "min_max": 2.0}, title="t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["values", "mse: 1.5", "min_max: 2"]
    assert ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="edges"):
        plot_histogram_with_clips(([0.0, 1.0], [5, 1]))
