"""QAT from calibration (calibkit.quant.qat): fixed / free feature-map scales, loss, checkpoints, recommendation."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from calibkit.cifar.train import augment
from calibkit.loop import lr_multiplier
from calibkit.quant import io, qat
from calibkit.quant.calibrate import calibrate, evaluate
from calibkit.quant.convert import convert
from calibkit.errors import CalibrationError, CheckpointError
from calibkit.quant.fake_quantize import FakeQuantState, get_fake_quantize_state, named_quantizers, set_fake_quantize
from calibkit.quant.prepare import prepare
from calibkit.quant.qconfig import get_default_qconfig


@pytest.fixture(scope="module")
def toy_data():
    """4 classes told apart by per-channel mean offsets of 3 x 8 x 8 noise (learnable by conv + avg-pool)."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 3, 1, 1, generator=g)
    y = torch.randint(0, 4, (256,), generator=g)
    x = torch.randn(256, 3, 8, 8, generator=g) + mu[y]
    return x, y


def _toy_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def _calibrated(x, bits=4):
    p = prepare(_toy_model(), get_default_qconfig("min_max", activation_bits=bits), (x[:2],))
    calibrate(p, [x[:128], x[128:]], progress=False)
    set_fake_quantize(p, FakeQuantState.VALIDATION)
    return p


KW = dict(batch_size=64, progress=False)


def test_fixed_scales_stay_bit_identical_while_weights_change(toy_data):
    x, y = toy_data
    p = _calibrated(x)
    a0, w0 = qat.activation_scales(p), qat.weight_scales(p)
    params0 = {n: t.detach().clone() for n, t in p.named_parameters()}
    hist = qat.train_qat(p, x, y, fix_feature_map_scales=True, epochs=1, lr=0.05, **KW)
    a1, w1 = qat.activation_scales(p), qat.weight_scales(p)
    assert a0.keys() == a1.keys() and len(a0) >= 4
    assert all(torch.equal(a0[n], a1[n]) for n in a0)
    assert all(named_quantizers(p)[n].is_fixed for n in a0)
    assert all(not named_quantizers(p)[n].is_fixed for n in w0)
    assert all(not torch.equal(params0[n], t) for n, t in p.named_parameters())
    assert any(not torch.equal(w0[n], w1[n]) for n in w0), "weight scales follow the weights"
    assert hist["steps"] == 4 and hist["fix_feature_map_scales"] is True
    assert p.training is False and get_fake_quantize_state(p) is FakeQuantState.VALIDATION


def test_free_scales_move(toy_data):
    x, y = toy_data
    p = _calibrated(x)
    a0 = qat.activation_scales(p)
    hist = qat.train_qat(p, x, y, x, y, fix_feature_map_scales=False, epochs=1, lr=0.05, evals=2, **KW)
    a1 = qat.activation_scales(p)
    moved = [n for n in a0 if not torch.equal(a0[n], a1[n])]
    assert len(moved) >= len(a0) - 1  # the input's range barely moves with un-augmented data, the rest must
    assert not any(named_quantizers(p)[n].is_fixed for n in a0)
    assert hist["act_scale_change"][0] == 0.0 and hist["act_scale_change"][-1] > 0


def test_qat_reduces_loss_on_toy_task(toy_data):
    x, y = toy_data
    p = _calibrated(x)

    def loss():
        with torch.no_grad():
            return float(F.cross_entropy(p(x), y))

    before = loss()
    hist = qat.train_qat(p, x, y, x, y, fix_feature_map_scales=True, epochs=4, lr=0.1, label_smoothing=0.0,
                         evals=2, **KW)
    after = loss()
    assert after < before - 0.05, (before, after)
    assert sum(hist["train_loss"][-4:]) < sum(hist["train_loss"][:4])
    assert hist["eval_step"] == [0, 8, 16] and len(hist["val_accuracy"]) == 3
    assert hist["val_accuracy"][-1] == evaluate(p, x, y, progress=False)
    # the converted integer model reproduces the fake-quant model after QAT
    int_model = convert(p)
    with torch.no_grad():
        assert torch.allclose(int_model(x), p(x), atol=1e-5)


def test_same_seed_same_result_and_schedule(toy_data):
    x, y = toy_data
    runs = []
    for _ in range(2):
        p = _calibrated(x)
        h = qat.train_qat(p, x, y, fix_feature_map_scales=False, epochs=1, lr=0.05, seed=3, batch_size=32,
                          augment=functools.partial(augment, flip=True, translate=1), progress=False)
        runs.append((p, h))
    (p1, h1), (p2, h2) = runs
    assert h1["train_loss"] == h2["train_loss"]
    sd1, sd2 = p1.state_dict(), p2.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    lrs = h1["lr"]
    assert len(lrs) == 8 and max(lrs) == pytest.approx(0.05) and lrs[-1] < 0.01
    assert lr_multiplier(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_multiplier(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_checkpoint_roundtrip_is_atomic_and_exact(toy_data, tmp_path):
    x, y = toy_data
    p = _calibrated(x)
    ck = tmp_path / "qat" / "model.pt"
    qat.train_qat(p, x, y, fix_feature_map_scales=True, epochs=2, lr=0.05, checkpoint_path=ck,
                  checkpoint_meta={"run": "toy"}, **KW)
    assert ck.exists() and not list(ck.parent.glob("*.tmp"))
    fresh = prepare(_toy_model(), get_default_qconfig("min_max", activation_bits=4), (x[:2],))
    meta = io.load_prepared(ck, fresh)
    assert meta["run"] == "toy" and meta["qat_step"] == 8 and len(meta["qat_history"]["train_loss"]) == 8
    set_fake_quantize(fresh, FakeQuantState.VALIDATION)
    with torch.no_grad():
        assert torch.equal(fresh(x), p(x))
    assert all(fq.is_fixed for fq in named_quantizers(fresh).values() if fq.kind == "activation")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        io.load_prepared(tmp_path / "junk.pt", fresh)
    with pytest.raises(CheckpointError, match="does not exist"):
        io.load_prepared(tmp_path / "missing.pt", fresh)
    smaller = prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), get_default_qconfig("min_max"), (x[:2],))
    with pytest.raises(CheckpointError, match="other quantizers"):
        io.load_prepared(ck, smaller)


def test_bad_inputs(toy_data):
    x, y = toy_data
    p = _calibrated(x)
    with pytest.raises(ValueError, match="epochs=0"):
        qat.train_qat(p, x, y, epochs=0, **KW)
    with pytest.raises(ValueError, match="batch_size=1000"):
        qat.train_qat(p, x, y, epochs=1, **{**KW, "batch_size": 1000})
    with pytest.raises(ValueError, match="lr=-1"):
        qat.train_qat(p, x, y, lr=-1, **KW)
    with pytest.raises(ValueError, match="label_smoothing=1"):
        qat.train_qat(p, x, y, label_smoothing=1.0, **KW)
    with pytest.raises(ValueError, match="both val_images and val_labels"):
        qat.train_qat(p, x, y, x, None, **KW)
    with pytest.raises(ValueError, match="non-empty and of equal length"):
        qat.train_qat(p, x, y[:10], **KW)
    uncalibrated = prepare(_toy_model(), get_default_qconfig("min_max"), (x[:2],))
    with pytest.raises(CalibrationError):
        qat.train_qat(uncalibrated, x, y, **KW)


def test_recommendation_rule_and_edge_cases():
    choice, reason = qat.recommend_fixed_scales(0.92, 0.93, chance_accuracy=0.1)
    assert choice == "fixed" and "fix" in reason
    choice, reason = qat.recommend_fixed_scales(0.60, 0.93, chance_accuracy=0.1)
    assert choice == "free" and "keep updating" in reason
    # exactly at the threshold: fixed; just above: free
    assert qat.recommend_fixed_scales(0.90, 1.0, threshold=0.1).choice == "fixed"
    assert qat.recommend_fixed_scales(0.8999, 1.0, threshold=0.1).choice == "free"
    # calibration better than float: fixed
    assert qat.recommend_fixed_scales(0.95, 0.93).choice == "fixed"
    assert qat.relative_gap(0.95, 0.93) < 0
    # the gap is measured above chance
    assert qat.relative_gap(0.55, 1.0, chance_accuracy=0.1) == pytest.approx(0.5)
    assert qat.recommend_fixed_scales(0.505, 0.53, chance_accuracy=0.1).choice == "free"
    assert qat.recommend_fixed_scales(0.505, 0.53, chance_accuracy=0.0).choice == "fixed"
    with pytest.raises(ValueError, match="not above chance"):
        qat.recommend_fixed_scales(0.1, 0.1, chance_accuracy=0.1)
    with pytest.raises(ValueError, match="calibrated_accuracy=92"):
        qat.recommend_fixed_scales(92, 93)
    with pytest.raises(ValueError, match="float_accuracy=nan"):
        qat.recommend_fixed_scales(0.5, math.nan)
    with pytest.raises(ValueError, match="threshold=1"):
        qat.recommend_fixed_scales(0.5, 0.9, threshold=1)
    assert qat.measured_choice(0.90, 0.85) == "fixed"
    assert qat.measured_choice(0.85, 0.90) == "free"
    assert qat.measured_choice(0.900, 0.901) == "tie"
    assert qat.measured_choice(0.900, 0.901, tie=0.0) == "free"
