"""Per-op debugging: error report, sensitivity, overrides, quantizer selection (calibkit.analysis) and the report's
figures (calibkit.tutorial.report_figures)."""

import math

import pytest
import torch

from calibkit.analysis.overrides import apply_overrides, override_quantizers, recalibrate
from calibkit.analysis.report import debug_report, op_histogram
from calibkit.analysis.selection import quantizers_disabled, quantizers_enabled_only
from calibkit.analysis.sensitivity import sensitivity
from calibkit.tutorial.report_figures import plot_op_histogram, plot_overrides_sweep, plot_report
from calibkit.tutorial.table import Table
from calibkit.quant.calibrate import calibrate, evaluate
from calibkit.errors import CalibrationError, StateError
from calibkit.quant.fake_quantize import FakeQuantState, named_quantizers, set_fake_quantize
from calibkit.cifar.models import cifar_resnet
from calibkit.quant.observers import MinMaxObserver, MSEObserver, PercentileObserver
from calibkit.quant.prepare import prepare
from calibkit.quant.qconfig import QuantSpec, get_default_qconfig
from calibkit.quant.numerics import quantize_dequantize, sqnr_db

BAD = "stage2.conv.conv.out"


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, 16, 16, generator=g)
    return [x[:32], x[32:64]], x[64:]


@pytest.fixture(scope="module")
def float_model():
    torch.manual_seed(0)
    return cifar_resnet(width=(8, 8, 8), num_classes=4).eval()


def _prepared(float_model, data, qconfig=None, overrides=None):
    calib, _ = data
    p = prepare(float_model, qconfig or get_default_qconfig("min_max"), (calib[0][:2],), overrides=overrides)
    calibrate(p, calib, progress=False)
    set_fake_quantize(p, FakeQuantState.VALIDATION)
    return p


@pytest.fixture()
def model(float_model, data):
    return _prepared(float_model, data)


def _snapshot(p):
    return {n: (fq.scale.clone(), fq.observing, fq.fake_quantizing, fq.is_fixed,
                {k: v.clone() for k, v in fq.observer.state_dict().items()}) for n, fq in named_quantizers(p).items()}


def _same(a, b):
    return (torch.equal(a[0], b[0]) and a[1:4] == b[1:4]
            and a[4].keys() == b[4].keys() and all(torch.equal(a[4][k], b[4][k]) for k in a[4]))


def test_report_ranks_deliberately_bad_layer_first_and_leaves_model_unchanged(model, data):
    calib, _ = data
    fq = named_quantizers(model)[BAD]
    fq.load_scale(fq.scale / 50)  # 50x too small: most values clip
    before = _snapshot(model)
    rep = debug_report(model, calib, progress=False)
    assert rep.worst(1) == [BAD]
    assert rep.sorted()[0].name == BAD
    row = rep[BAD]
    assert row.clip_ratio > 0.2
    others = [o for o in rep.ops if o.name != BAD]
    assert row.isolated_sqnr_db < min(o.isolated_sqnr_db for o in others) - 10
    after = _snapshot(model)
    assert before.keys() == after.keys() and all(_same(before[n], after[n]) for n in before)
    assert rep.images == 64 and rep.batches == 2
    assert [o.name for o in rep.ops] == list(named_quantizers(model))


def test_report_two_bit_layer_ranks_first(model, data):
    calib, _ = data
    apply_overrides(model, {BAD: {"observer": "min_max", "bits": 2}}, calib, progress=False)
    rep = debug_report(model, calib, progress=False)
    assert rep.worst(1) == [BAD]
    assert rep[BAD].bits == 2 and "bits=2" in rep[BAD].observer


def test_report_numbers_match_direct_computation(model, data):
    calib, _ = data
    rep = debug_report(model, calib[:1], progress=False)
    qs = named_quantizers(model)
    name = "stage1.conv.conv.out"
    fq = qs[name]
    seen = []
    h = fq.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with quantizers_enabled_only(model, []), torch.no_grad():
        model(calib[0])
    h.remove()
    x = seen[0]
    x_hat = quantize_dequantize(x, fq.scale, fq.bits)
    assert rep[name].isolated_sqnr_db == pytest.approx(sqnr_db(x, x_hat), abs=1e-3)
    amax = float(fq.scale) * (2 ** fq.bits - 1) / 2
    assert rep[name].clip_ratio == pytest.approx(float((x.abs() > amax).float().mean()), abs=1e-9)
    assert rep[name].range_max == pytest.approx(float(x.max()))
    # the input quantizer has no upstream error: accumulated == isolated
    assert rep["input"].accumulated_sqnr_db == pytest.approx(rep["input"].isolated_sqnr_db, abs=1e-6)
    for o in rep.ops:
        assert -1 - 1e-6 <= o.accumulated_cosine <= 1 + 1e-6 and 0 <= o.clip_ratio <= 1
        assert o.accumulated_sqnr_db == pytest.approx(-20 * math.log10(o.accumulated_rel_l2), abs=1e-6)
        assert o.kind == qs[o.name].kind
    # upstream errors accumulate: the last activation is worse end to end than in isolation
    assert rep["fc.out"].accumulated_sqnr_db < rep["fc.out"].isolated_sqnr_db
    # weight rows: isolated error measured at the op output with only that weight quantized
    w = rep["fc.weight"]
    assert w.kind == "weight" and math.isfinite(w.isolated_sqnr_db) and w.isolated_sqnr_db > 20


def test_report_sorting_table_and_json(model, data):
    calib, _ = data
    rep = debug_report(model, calib[:1], sort_by="accumulated_sqnr_db", progress=False)
    vals = [o.accumulated_sqnr_db for o in rep.sorted()]
    assert vals == sorted(vals)
    acts = rep.sorted(kind="activation")
    assert acts and all(o.kind == "activation" for o in acts)
    clip_sorted = [o.clip_ratio for o in rep.sorted("clip_ratio")]
    assert clip_sorted == sorted(clip_sorted, reverse=True)
    t = Table(**rep.table_data(top=3))
    text = t.to_text()
    assert len(t.rows) == 3 and rep.sorted()[0].name in text and "<table>" in t._repr_html_()
    rows = rep.to_json_rows(top=4)
    assert len(rows) == 4 and set(rows[0]) == {"name", "kind", "accumulated_sqnr_db", "isolated_sqnr_db", "clip_ratio"}


def test_table_csv_and_formats(tmp_path):
    t = Table([{"a": "x", "b": 1.23456, "c": math.inf}, {"a": "y<", "b": None, "c": 2}], formats={"b": ".2f"})
    assert "1.23" in t.to_text() and "inf" in t.to_text() and "-" in t.to_text()
    assert "y&lt;" in t._repr_html_()
    p = t.to_csv(tmp_path / "t.csv")
    assert p.read_text().splitlines()[0] == "a,b,c"


def test_op_histogram_and_plots(model, data):
    import matplotlib
    matplotlib.use("Agg")
    calib, _ = data
    h = op_histogram(model, "stage1.conv.conv.out", calib, bins=64)
    assert int(h["counts"].sum()) == h["numel"] == 64 * 8 * 15 * 15
    assert h["edges"][-1] >= h["clip"] and len(h["edges"]) == 65
    hw = op_histogram(model, "fc.weight", calib, bins=16)
    assert hw["numel"] == 4 * 8
    rep = debug_report(model, calib[:1], progress=False)
    ax = plot_report(rep, top=5)
    assert len(ax.get_yticklabels()) == 5
    plot_op_histogram(h)
    ax = plot_overrides_sweep([(0, 0.5), (1, 0.6), (2, 0.65)], 0.7, 0.66, "every activation: mse")
    assert list(ax.get_xticks()) == [0, 1, 2] and len(ax.get_legend().get_texts()) == 3
    import matplotlib.pyplot as plt
    plt.close("all")


def _fq_sets_during(model, fn):
    """Sets of quantizers that fake-quantized in each forward pass made by ``fn``."""
    sets, cur = [], {}
    qs = named_quantizers(model)
    hooks = [model.register_forward_pre_hook(lambda m, i: cur.clear())]
    hooks.append(model.register_forward_hook(lambda m, i, o: sets.append(frozenset(cur))))
    for n, fq in qs.items():
        hooks.append(fq.register_forward_pre_hook(
            lambda m, i, n=n: cur.__setitem__(n, True) if m.fake_quantizing else None))
    try:
        result = fn()
    finally:
        for h in hooks:
            h.remove()
    return result, set(sets)


@pytest.mark.parametrize("mode", ["only_enabled", "only_disabled"])
def test_sensitivity_touches_exactly_the_intended_quantizers(model, data, mode):
    _, (vx) = data
    with quantizers_enabled_only(model, []), torch.no_grad():
        vy = model(vx).argmax(1)  # labels = float predictions: float accuracy is 1
    names = ["stage1.conv.conv.out", "fc.weight", "input"]
    before = _snapshot(model)
    res, sets = _fq_sets_during(model, lambda: sensitivity(model, names, vx, vy, top_k=None, mode=mode,
                                                                   batch_size=32, progress=False))
    all_names = frozenset(named_quantizers(model))
    if mode == "only_enabled":
        expected = {frozenset(), all_names} | {frozenset([n]) for n in names}
    else:
        expected = {frozenset(), all_names} | {all_names - {n} for n in names}
    assert sets == expected
    after = _snapshot(model)
    assert all(_same(before[n], after[n]) for n in before)
    assert res.float_accuracy == 1.0
    assert res.quant_accuracy == pytest.approx(evaluate(model, vx, vy, progress=False))
    assert sorted(r["name"] for r in res.rows) == sorted(names)
    deltas = [r["delta"] for r in res.rows]
    assert deltas == sorted(deltas, reverse=True)
    r = res.rows[0]
    ctx = quantizers_enabled_only if mode == "only_enabled" else quantizers_disabled
    with ctx(model, [r["name"]]):
        acc = evaluate(model, vx, vy, progress=False)
    assert r["accuracy"] == acc
    assert r["delta"] == pytest.approx(1.0 - acc if mode == "only_enabled" else acc - res.quant_accuracy)
    assert "sensitivity" in Table(**res.table_data()).to_text()


def test_sensitivity_from_report_uses_top_k(model, data):
    calib, vx = data
    fq = named_quantizers(model)[BAD]
    fq.load_scale(fq.scale / 50)
    rep = debug_report(model, calib[:1], progress=False)
    vy = torch.zeros(len(vx), dtype=torch.int64)
    res = sensitivity(model, rep, vx, vy, top_k=2, progress=False)
    assert sorted(r["name"] for r in res.rows) == sorted(rep.worst(2))


def test_overrides_change_exactly_the_named_quantizers(float_model, data):
    calib, _ = data
    model = _prepared(float_model, data)
    before = _snapshot(model)
    old = named_quantizers(model)
    spec = QuantSpec("percentile", bits=8, kwargs={"percentile": 99.0})
    targets = {"stage1.conv.conv.out": spec, "stage2.residual.0.add.out": {"observer": "mse"}}
    names = apply_overrides(model, targets, calib, progress=False)
    assert names == list(targets)
    new = named_quantizers(model)
    assert list(new) == list(old)
    for n in new:
        if n in targets:
            assert new[n] is not old[n] and not torch.equal(new[n].scale, before[n][0])
        else:
            assert new[n] is old[n] and _same(before[n], _snapshot(model)[n])
    assert isinstance(new["stage1.conv.conv.out"].observer, PercentileObserver)
    assert isinstance(new["stage2.residual.0.add.out"].observer, MSEObserver)
    assert isinstance(old["stage1.conv.conv.out"].observer, MinMaxObserver)
    # the conv that consumes the overridden activation is linked to the new quantizer
    conv = model.get_submodule("stage1.residual.0.body.conv")
    assert conv.__dict__["_input_quantizer"] is new["stage1.conv.conv.out"]
    # same result as preparing with these per-op overrides and calibrating everything from scratch
    ref = _prepared(float_model, data, overrides={"stage1.conv.conv.out": spec,
                                                  "stage2.residual.0.add.out": QuantSpec("mse")})
    for n, fq in named_quantizers(ref).items():
        assert torch.equal(fq.scale, new[n].scale), n
    x = calib[0]
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert all(fq.state is FakeQuantState.VALIDATION for fq in new.values())


def test_recalibrate_only_named_keeps_others_bit_identical(model, data):
    calib, _ = data
    before = _snapshot(model)
    other_batches = [c * 3 for c in calib]  # different data: only the named quantizer may react
    recalibrate(model, other_batches, ["stage3.conv.conv.out"], progress=False)
    after = _snapshot(model)
    for n in before:
        if n == "stage3.conv.conv.out":
            assert not torch.equal(before[n][0], after[n][0])
        else:
            assert _same(before[n], after[n]), n


def test_bad_inputs(model, data):
    calib, vx = data
    vy = torch.zeros(len(vx), dtype=torch.int64)
    with pytest.raises(ValueError, match="close matches.*stage2.conv.conv.out"):
        override_quantizers(model, {"stage2.conv.conv.ou": {"observer": "mse"}})
    with pytest.raises(ValueError, match="close matches"):
        sensitivity(model, ["stage1.conv.conv.outt"], vx, vy, progress=False)
    with pytest.raises(ValueError, match="top_k=0"):
        sensitivity(model, ["input"], vx, vy, top_k=0, progress=False)
    with pytest.raises(ValueError, match="mode="):
        sensitivity(model, ["input"], vx, vy, mode="sometimes", progress=False)
    with pytest.raises(ValueError, match="sort_by="):
        debug_report(model, calib, sort_by="beauty", progress=False)
    rep = debug_report(model, calib[:1], progress=False)
    with pytest.raises(ValueError, match="k=0"):
        rep.worst(0)
    with pytest.raises(ValueError, match="kind='activations'"):
        rep.worst(2, kind="activations")
    with pytest.raises(KeyError, match="close matches"):
        rep["fc.outt"]
    with pytest.raises(ValueError, match="non-empty"):
        override_quantizers(model, {})
    with pytest.raises(ValueError, match="'observer' key"):
        override_quantizers(model, {"input": {"percentile": 99.0}})
    with pytest.raises(ValueError, match="percentile=120"):
        override_quantizers(model, {"input": {"observer": "percentile", "percentile": 120}})
    kept = named_quantizers(model)["fc.out"]
    with pytest.raises(ValueError, match="percentile=120"):  # every override is checked before any is applied
        override_quantizers(model, {"fc.out": {"observer": "mse"}, "input": {"observer": "percentile", "percentile": 120}})
    assert named_quantizers(model)["fc.out"] is kept
    with pytest.raises(TypeError, match="QuantSpec"):
        override_quantizers(model, {"input": "mse"})
    with pytest.raises(ValueError, match="batches is empty"):
        debug_report(model, [], progress=False)
    with pytest.raises(ValueError, match="bins=1"):
        op_histogram(model, "input", calib, bins=1)
    model.train()
    with pytest.raises(StateError, match="eval"):
        debug_report(model, calib, progress=False)
    model.eval()


def test_uncalibrated_model_is_an_error(float_model, data):
    calib, _ = data
    p = prepare(float_model, get_default_qconfig("min_max"), (calib[0][:2],))
    with pytest.raises(CalibrationError, match="no scale"):
        debug_report(p, calib, progress=False)


class _InplaceNet(torch.nn.Module):
    """torchvision's habits: ``ReLU(inplace=True)`` after a conv and ``out += identity``."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        out = self.relu(self.conv1(x))
        identity = out
        out = self.conv2(out)
        out += identity
        return self.fc(out.mean((2, 3)))


def test_report_is_not_fooled_by_in_place_ops():
    """The float reference of a layer must be a copy: an in-place ReLU or ``+=`` after it would otherwise change
    the reference, and an 8-bit weight would look tens of dB worse than it is."""
    torch.manual_seed(0)
    net = _InplaceNet().eval()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    q = prepare(net, get_default_qconfig(activation_observer="min_max", weight_observer="min_max"),
                example_inputs=(batches[0],))
    calibrate(q, batches, progress=False)
    set_fake_quantize(q, FakeQuantState.VALIDATION)
    rep = debug_report(q, batches, progress=False)
    for name in ("conv1.weight", "conv2.weight"):
        assert rep[name].isolated_sqnr_db > 30, (name, rep[name].isolated_sqnr_db)
