"""Reliability (issue 16): every call that changes a prepared model completes or leaves it as it was; the cases a
careless user walks into get named errors or warnings; a shared module's call sites are quantized separately."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import calibkit as ck
from calibkit.analysis import overrides as ov
from calibkit.errors import CalibrationError, CheckpointError, DataNotFoundError, PrepareError
from calibkit.quant import io, qat
from calibkit.quant.calibrate import CalibrationStateWarning, FixedScaleWarning
from calibkit.quant.fake_quantize import named_quantizers

X = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(1))


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def prepared(observer="min_max", bits=8, calibrated=True):
    p = ck.prepare(small(), ck.get_default_qconfig(observer, activation_bits=bits), (X[:2],))
    if calibrated:
        ck.calibrate(p, [X[:32], X[32:]], progress=False)
        ck.set_fake_quantize(p, ck.FakeQuantState.VALIDATION)
    return p


# -- comparing a model with its earlier self ---------------------------------------------------------------
def _t_equal(a, b) -> bool:
    if not isinstance(a, torch.Tensor):
        return a == b
    return a.shape == b.shape and a.dtype == b.dtype and (torch.equal(a, b) or (
        a.is_floating_point() and bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())))


def fingerprint(model):
    """Everything a call may change: state_dict, every quantizer's object, flags, state, scale and observer
    statistics (state_dict and tensor attributes), every module's train/eval flag."""
    qs = {}
    for n, fq in named_quantizers(model).items():
        ob = fq.observer
        stats = {k: v.detach().clone() for k, v in ob.state_dict().items()}
        stats.update({f"attr.{k}": v.detach().clone() for k, v in vars(ob).items() if isinstance(v, torch.Tensor)})
        qs[n] = dict(obj=id(fq), config=fq.config(), fixed=fq.is_fixed, observing=fq.observing,
                     fake_quant=fq.fake_quantizing, state=fq.state, ready=fq._scale_ready, stale=fq._scale_stale,
                     scale=fq.scale.detach().clone(), stats=stats)
    return dict(state={k: v.detach().clone() for k, v in model.state_dict().items()}, quantizers=qs,
                training=[m.training for m in model.modules()])


def assert_same(a, b):
    assert a["training"] == b["training"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert _t_equal(a["state"][k], b["state"][k]), k
    assert a["quantizers"].keys() == b["quantizers"].keys()
    for n, qa in a["quantizers"].items():
        qb = b["quantizers"][n]
        for k in qa:
            if k == "stats":
                assert qa[k].keys() == qb[k].keys(), n
                assert all(_t_equal(qa[k][s], qb[k][s]) for s in qa[k]), (n, k)
            else:
                assert _t_equal(qa[k], qb[k]), (n, k)


# -- the listed cases ------------------------------------------------------------------------------------------
def test_calibrate_empty_with_reset_keeps_scales_and_state():
    p = prepared()
    before = fingerprint(p)
    with pytest.raises(CalibrationError, match="batches is empty"):
        ck.calibrate(p, [], reset=True, progress=False)
    with pytest.raises(CalibrationError, match="batches is empty"):
        ck.calibrate(p, iter([]), reset=True, progress=False)  # unsized: found out after the reset, then undone
    assert_same(before, fingerprint(p))
    assert ck.get_fake_quantize_state(p) is ck.FakeQuantState.VALIDATION


@pytest.mark.parametrize("bad, error, match", [
    ({"x": X[:4]}, TypeError, r"batches\[1\] is a dict"),
    (X[:4].numpy(), TypeError, r"batches\[1\] is a ndarray"),
    (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), TypeError, r"batches\[1\] is a Tensor of torch.uint8"),
    (torch.randn(4, 5, 8, 8), CalibrationError, r"batches\[1\] of shape \(4, 5, 8, 8\) failed in the model"),
])
def test_calibrate_bad_batches_named_and_model_unchanged(bad, error, match):
    p = prepared()
    before = fingerprint(p)
    with pytest.raises(error, match=match):
        ck.calibrate(p, [X[:4], bad], reset=True, progress=False)
    with pytest.raises(error, match=match):
        ck.calibrate(p, iter([X[:4], bad]), reset=True, progress=False)  # found during the run: restored
    assert_same(before, fingerprint(p))


def test_apply_overrides_failures_leave_old_quantizers():
    p = prepared()
    before = fingerprint(p)
    with pytest.raises(ValueError, match="batches is empty"):
        ov.apply_overrides(p, {"3.out": {"observer": "mse"}}, [], progress=False)
    with pytest.raises(CalibrationError, match=r"batches\[1\] of shape"):
        ov.apply_overrides(p, {"3.out": {"observer": "mse"}}, [X[:4], torch.randn(2, 5, 8, 8)], progress=False)
    assert_same(before, fingerprint(p))
    assert 0 <= ck.evaluate(p, X, Y, progress=False) <= 1  # still validates


def test_fix_activation_scales_is_all_or_nothing():
    p = prepared()
    ov.override_quantizers(p, {"5.out": {"observer": "mse"}})  # a quantizer in the middle has no data
    before = fingerprint(p)
    with pytest.raises(CalibrationError, match="cannot fix the activation scales: 1 quantizer"):
        ck.fix_activation_scales(p)
    assert_same(before, fingerprint(p))


def test_calibrating_fixed_scales_warns():
    p = prepared()
    ck.fix_activation_scales(p)
    scales = {n: fq.scale.clone() for n, fq in named_quantizers(p).items() if fq.is_fixed}
    with pytest.warns(FixedScaleWarning, match="5 quantizer"):
        ck.calibrate(p, [X * 3], progress=False)
    assert all(torch.equal(named_quantizers(p)[n].scale, s) for n, s in scales.items())


def test_evaluate_in_calibration_warns_and_bad_labels_raise():
    p = prepared(calibrated=False)
    ck.calibrate(p, [X], progress=False)
    with pytest.warns(CalibrationStateWarning, match="still in FakeQuantState.CALIBRATION"):
        ck.evaluate(p, X, Y, progress=False)
    ck.set_fake_quantize(p, "validation")
    with pytest.raises(ValueError, match=r"labels hold values in \[7, 7\] but the model has 4 outputs"):
        ck.evaluate(p, X, torch.full((64,), 7), progress=False)
    with pytest.raises(ValueError, match="class indices >= 0"):
        ck.evaluate(p, X, torch.full((64,), -1), progress=False)


def test_cifar_accuracy_refuses_labels_outside_classes():
    from calibkit.cifar.evaluate import accuracy
    images = torch.randint(0, 255, (8, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(ValueError, match="the model has 4 outputs"):
        accuracy(small(), images, torch.full((8,), 7))


def test_train_qat_bad_labels_named_before_training_and_model_restored():
    p = prepared()
    before = fingerprint(p)
    with pytest.raises(ValueError, match=r"train_labels hold values up to 9 but the model has 4 outputs"):
        qat.train_qat(p, X, torch.full((64,), 9), batch_size=32, progress=False)
    with pytest.raises(TypeError, match="integer tensor"):
        qat.train_qat(p, X, Y.float(), batch_size=32, progress=False)
    assert_same(before, fingerprint(p))
    assert not p.training and not any(fq.is_fixed for fq in named_quantizers(p).values())


def test_train_qat_failing_mid_run_restores_weights_scales_and_mode():
    p = prepared()
    before = fingerprint(p)
    calls = []

    def loss_fn(model, x, y):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    with pytest.raises(RuntimeError, match="injected"):
        qat.train_qat(p, X, Y, batch_size=16, lr=0.5, loss_fn=loss_fn, progress=False)
    assert len(calls) == 3  # two optimizer steps ran before the failure
    assert_same(before, fingerprint(p))


def test_convert_per_channel_activations_named():
    q = ck.QConfig(ck.QuantSpec("min_max", 8, 1), ck.QuantSpec("min_max", 8, 0))
    p = ck.prepare(small(), q, (X[:2],))
    ck.calibrate(p, [X], progress=False)
    ck.set_fake_quantize(p, "validation")
    with pytest.raises(PrepareError, match="'input' is per-channel"):
        ck.convert(p)


@pytest.mark.parametrize("observer", ["min_max", "moving_average_min_max", "percentile", "mse", "kl", "mix"])
def test_failed_calibration_leaves_no_trace_in_later_scales(observer):
    """Statistics that live outside state_dict (histograms, search caches) are restored too: after a failed call,
    calibrating on goes exactly as if the failed call had never happened."""
    a, b = (ck.prepare(small(), ck.get_default_qconfig(observer, "min_max"), (X[:1],)) for _ in range(2))
    for p in (a, b):
        ck.calibrate(p, [X[:32]], progress=False)

    def failing():
        yield X[32:48]
        raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        ck.calibrate(a, failing(), progress=False)
    for p in (a, b):
        ck.calibrate(p, [X[32:]], progress=False)
        ck.set_fake_quantize(p, "validation")
    assert all(torch.equal(named_quantizers(a)[n].scale, fq.scale) for n, fq in named_quantizers(b).items())


# -- configurations travel with the scales ------------------------------------------------------------------
def test_prepared_file_refuses_other_configuration(tmp_path):
    f = ck.save_prepared(tmp_path / "mm.pt", prepared("min_max", 8), {"run": 1})
    target = prepared("percentile", 4, calibrated=False)
    before = fingerprint(target)
    with pytest.raises(CheckpointError, match=r"quantizer 'input' was saved with another configuration \(bits: saved 8, this model 4\)"):
        ck.load_prepared(f, target)
    with pytest.raises(CheckpointError, match=r"observer: saved 'min_max', this model 'percentile'"):
        ck.load_prepared(f, prepared("percentile", 8, calibrated=False))
    assert_same(before, fingerprint(target))
    same = prepared("min_max", 8, calibrated=False)
    assert ck.load_prepared(f, same) == {"run": 1}
    assert all(fq.fake_quantizing and not fq.observing for fq in named_quantizers(same).values())  # saved flags


def test_load_state_dict_refuses_other_method():
    sd = prepared("mse").state_dict()
    with pytest.raises(CheckpointError, match=r"observer: saved 'mse', this model 'percentile'"):
        prepared("percentile", calibrated=False).load_state_dict(sd)
    with pytest.raises(CheckpointError, match=r"params.percentile: saved 99.0, this model 99.9"):
        a = ck.prepare(small(), ck.get_default_qconfig("percentile", activation_kwargs={"percentile": 99.0}), (X[:2],))
        b = ck.prepare(small(), ck.get_default_qconfig("percentile", activation_kwargs={"percentile": 99.9}), (X[:2],))
        b.load_state_dict(a.state_dict())
    legacy = {k: v for k, v in prepared("mse").state_dict().items() if not k.endswith(".config")}
    prepared("mse", calibrated=False).load_state_dict(legacy)  # states saved before configurations still load


def test_load_prepared_failing_part_way_restores(tmp_path):
    src = prepared()
    ck.fix_activation_scales(src)
    path = ck.save_prepared(tmp_path / "p.pt", src)
    payload = torch.load(path, weights_only=True)
    key = [k for k in payload["state_dict"] if k.endswith("7.out.scale")][0]
    payload["state_dict"][key] = torch.tensor(float("nan"))  # a fixed scale that is no scale: found late in loading
    torch.save(payload, path)
    target = prepared("min_max", calibrated=False)
    before = fingerprint(target)
    with pytest.raises(CheckpointError, match="'7.out': the state_dict marks its scale fixed"):
        ck.load_prepared(path, target)
    assert_same(before, fingerprint(target))


# -- a module called twice -------------------------------------------------------------------------------------
class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.c(F.relu(self.c(x)) * 50)


def test_shared_module_call_sites_get_own_quantizers_and_validation_matches_convert():
    torch.manual_seed(0)
    m = Shared().eval()
    x = torch.randn(32, 4, 8, 8)
    p = ck.prepare(m, ck.get_default_qconfig("min_max"), (x[:1],))
    assert list(named_quantizers(p)) == ["input", "c.weight", "c.out", "mul.out", "c.weight_1", "c.out_1"]
    assert p.get_submodule("c").weight is p.get_submodule("c_call1").weight  # one weight, two call sites
    ck.calibrate(p, [x], progress=False)
    ck.set_fake_quantize(p, ck.FakeQuantState.VALIDATION)
    with torch.no_grad():
        ref, val, conv = m(x), p(x), ck.convert(p)(x)
    # before: VALIDATION 11.6 dB from float (the second call used the first call's input scale), convert 34.8 dB
    assert ck.sqnr_db(ref, val) > 30 and ck.sqnr_db(ref, conv) > 30
    assert torch.equal(val, conv)  # tolerance: bit-identical (8-bit, accumulators far below 2**24)
    p.train()
    ck.set_fake_quantize(p, ck.FakeQuantState.QAT)
    p(x).square().mean().backward()
    assert p.get_submodule("c").weight.grad is not None


# -- image folders ---------------------------------------------------------------------------------------------
def _folder(root):
    from PIL import Image
    for split in ("train", "test"):
        for c in ("a", "b"):
            os.makedirs(root / split / c, exist_ok=True)
            Image.fromarray(np.full((4, 4, 3), 100, np.uint8)).save(root / split / c / "0.png")
    return root


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image
    root = _folder(tmp_path / "imgs")
    Image.fromarray(np.array([[0, 257, 40000, 65535]] * 4, np.uint16)).save(root / "train" / "a" / "1.png")
    t = ck.load_image_folder(root, cache_dir=tmp_path / "cache", progress=False)
    assert t.train_images[1, 0, 0].tolist() == [0, 1, 156, 255]  # round(v * 255 / 65535); before: [0, 255, 255, 255]
    assert torch.equal(t.train_images[1, 0], t.train_images[1, 2])


def test_self_referencing_symlink_named(tmp_path):
    root = _folder(tmp_path / "imgs")
    loop = root / "train" / "a" / "loop.png"
    os.symlink(loop, loop)
    with pytest.raises(DataNotFoundError, match="loop.png cannot be read .*symlink loop"):
        ck.load_image_folder(root, cache_dir=tmp_path / "cache", progress=False)


# -- property: random call sequences with injected failures ------------------------------------------------------
def _raising_batches(k):
    def gen():
        for i in range(3):
            if i == k:
                raise RuntimeError("injected batch failure")
            yield X[16 * i:16 * i + 16]
    return gen()


def _op(p, kind: str, k: int, tmp):
    """One call on ``p``; ``k`` selects where a failure is injected (k >= 3: no failure)."""
    if kind == "calibrate":
        return ck.calibrate(p, _raising_batches(k), reset=bool(k % 2), progress=False)
    if kind == "calibrate_bad":
        return ck.calibrate(p, [X[:8]] * min(k, 2) + [np.zeros((2, 3, 8, 8))], reset=True, progress=False)
    if kind == "validate":
        return ck.set_fake_quantize(p, "validation")
    if kind == "fix":
        return ck.fix_activation_scales(p)
    if kind == "unfix":
        return [fq.unfix_scale() for fq in named_quantizers(p).values() if fq.kind != "weight"]
    if kind == "override":
        bad = [X[:8]] * min(k, 2) + ([torch.randn(2, 5, 8, 8)] if k < 3 else [])
        return ov.apply_overrides(p, {"3.out": {"observer": "mse"}}, bad or [X[:8]], progress=False)
    if kind == "qat":
        def loss_fn(model, x, y):
            if k < 3 and torch.rand(()) < 0.7:
                raise RuntimeError("injected loss failure")
            logits = model(x)
            return F.cross_entropy(logits, y), logits
        return qat.train_qat(p, X, Y, batch_size=32, loss_fn=loss_fn, progress=False)
    if kind == "load":
        other = prepared("percentile", 8, calibrated=False) if k < 3 else None
        path = ck.save_prepared(tmp / "p.pt", other if other is not None else p)
        return ck.load_prepared(path, p)
    raise AssertionError(kind)


OPS = ["calibrate", "calibrate_bad", "validate", "fix", "unfix", "override", "qat", "load"]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 4)), min_size=1, max_size=5), st.booleans())
def test_every_failed_call_leaves_the_model_as_it_was(tmp_path, steps, calibrated):
    torch.manual_seed(0)
    p = prepared(calibrated=calibrated)
    failures = 0
    for kind, k in steps:
        before = fingerprint(p)
        try:
            _op(p, kind, k, tmp_path)
        except (RuntimeError, ValueError, TypeError, CheckpointError):
            failures += 1
            assert_same(before, fingerprint(p))
        if p.training:  # only a successful QAT leaves train mode behind? never: it ends in eval
            raise AssertionError(f"{kind} left the model in train mode")
    assert failures <= len(steps)


def test_a_cache_decoded_the_old_way_is_not_reused(tmp_path, monkeypatch):
    """A folder cached by the clipping decoder (cache format 1) is decoded again, not read back clipped."""
    from PIL import Image
    from calibkit.cifar import folders
    root = _folder(tmp_path / "imgs")
    Image.fromarray(np.array([[0, 257, 40000, 65535]] * 4, np.uint16)).save(root / "train" / "a" / "1.png")
    monkeypatch.setattr(folders, "CACHE_FORMAT", 1)
    ck.load_image_folder(root, cache_dir=tmp_path / "cache", progress=False)
    old = {p.name for p in (tmp_path / "cache").iterdir()}
    monkeypatch.undo()
    assert folders.CACHE_FORMAT >= 2
    t = ck.load_image_folder(root, cache_dir=tmp_path / "cache", progress=False)
    assert {p.name for p in (tmp_path / "cache").iterdir()} - old, "a new cache file under a new key"
    assert t.train_images[1, 0, 0].tolist() == [0, 1, 156, 255]
