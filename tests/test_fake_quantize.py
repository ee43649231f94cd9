"""FakeQuantize module and the CALIBRATION / QAT / VALIDATION state table."""

import pytest
import torch
from torch import nn

from calibkit.errors import CalibrationError, PrepareError, StateError
from calibkit.quant.fake_quantize import (FakeQuantize, FakeQuantState, fix_activation_scales, get_fake_quantize_state,
                                    named_quantizers, set_fake_quantize)
from calibkit.quant.observers import MinMaxObserver
from calibkit.quant.prepare import prepare
from calibkit.quant.qconfig import get_default_qconfig
from calibkit.quant.numerics import quantize_dequantize, scale_from_amax


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).eval()


@pytest.fixture
def prepared():
    return prepare(tiny_model(), get_default_qconfig("min_max"), torch.randn(1, 3, 8, 8))


def steps(fq):
    return int(fq.observer.steps)


# -- state table ----------------------------------------------------------------------------------
@pytest.mark.parametrize("state,train,observes,fakes", [
    (FakeQuantState.CALIBRATION, False, True, False),
    (FakeQuantState.QAT, True, True, True),
    (FakeQuantState.VALIDATION, False, False, True),
])
def test_state_table_flags_and_behaviour(prepared, state, train, observes, fakes):
    x = torch.randn(4, 3, 8, 8)
    prepared.eval()
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        float_out = prepared(x)  # also gives every observer data
    prepared.train(train)
    set_fake_quantize(prepared, state)
    qs = named_quantizers(prepared)
    assert get_fake_quantize_state(prepared) is state
    for fq in qs.values():  # weights follow the same table as activations
        assert fq.observing is observes and fq.fake_quantizing is fakes
        assert int(fq.observer_enabled) == observes and int(fq.fake_quant_enabled) == fakes
    before = {k: steps(fq) for k, fq in qs.items()}
    seen = {}
    qs["input"].register_forward_hook(lambda m, i, o: seen.setdefault("input", o))
    with torch.no_grad():
        out = prepared(x)
    assert all(steps(fq) == before[k] + int(observes) for k, fq in qs.items())
    if fakes:
        assert not torch.equal(out, float_out)
        assert torch.equal(seen["input"], quantize_dequantize(x, qs["input"].scale))  # the input is on the grid
    else:
        assert torch.equal(out, float_out)  # CALIBRATION computes in float, weights included


def test_wrong_mode_is_an_error_not_a_switch(prepared):
    prepared.eval()
    with pytest.raises(StateError, match=r"FakeQuantState.QAT needs the model in train mode.*call model.train\(\)"):
        set_fake_quantize(prepared, FakeQuantState.QAT)
    assert not prepared.training and get_fake_quantize_state(prepared) is FakeQuantState.CALIBRATION
    prepared.train()
    for state in (FakeQuantState.CALIBRATION, FakeQuantState.VALIDATION):
        with pytest.raises(StateError, match=rf"FakeQuantState.{state.name} needs the model in eval mode.*model.eval\(\)"):
            set_fake_quantize(prepared, state)
    assert prepared.training


def test_state_by_name_and_bad_state(prepared):
    set_fake_quantize(prepared, "calibration")
    with pytest.raises(ValueError, match="state='warmup' is unknown"):
        set_fake_quantize(prepared, "warmup")
    with pytest.raises(PrepareError, match="call calibkit.quant.prepare"):
        set_fake_quantize(tiny_model(), FakeQuantState.CALIBRATION)


def test_validation_without_data_names_the_quantizers(prepared):
    with pytest.raises(CalibrationError, match=r"(?s)cannot enter FakeQuantState.VALIDATION.*\binput\b.*0\.out"):
        set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    assert get_fake_quantize_state(prepared) is FakeQuantState.CALIBRATION  # unchanged


def test_validation_scale_is_the_observers_and_frozen(prepared):
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        prepared(x)
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    qs = named_quantizers(prepared)
    for fq in qs.values():
        assert torch.equal(fq.scale, scale_from_amax(fq.observer.get_amax(), fq.bits))
    w = qs["0.weight"]
    assert w.scale.shape == (4,)  # per output channel
    frozen = {k: fq.scale.clone() for k, fq in qs.items()}
    with torch.no_grad():
        prepared(10 * x)
    assert all(torch.equal(fq.scale, frozen[k]) for k, fq in qs.items())


# -- FakeQuantize module -------------------------------------------------------------------------
def test_forward_is_round_clamp_rescale_and_ste_gradient():
    fq = FakeQuantize("min_max", bits=8).load_scale(0.1).enable_fake_quant()
    x = torch.tensor([-20.0, -12.8, -5.04, 0.05, 0.15, 3.0, 12.7, 12.8, 50.0], requires_grad=True)
    y = fq(x)
    expected = torch.clamp(torch.round(x.detach() / 0.1), -128, 127) * torch.tensor(0.1)
    assert torch.equal(y.detach(), expected)
    y.sum().backward()
    # grid is [-128, 127] * 0.1 = [-12.8, 12.7]: gradient 1 inside, 0 for clipped values
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_per_channel_weight_quantizer():
    w = torch.randn(5, 3, 3, 3)
    fq = FakeQuantize("min_max", ch_axis=0)
    fq(w)
    s = fq.compute_scale()
    assert s.shape == (5,)
    assert torch.allclose(s, w.abs().amax(dim=(1, 2, 3)) / 127.5)
    fq.enable_observer(False).enable_fake_quant()
    assert torch.equal(fq(w), quantize_dequantize(w, s, 8, 0))


def test_fix_scale_keeps_scale_bit_identical():
    torch.manual_seed(0)
    fixed, free = FakeQuantize("min_max", averaging_constant=0.5), FakeQuantize("min_max", averaging_constant=0.5)
    for fq in (fixed, free):
        fq(torch.randn(1000))
    fixed.fix_scale()
    s0 = fixed.scale.clone()
    for fq in (fixed, free):  # QAT-style: observe + fake quant
        fq.enable_observer().enable_fake_quant()
    n0 = steps(fixed)
    for _ in range(3):
        big = 100 * torch.randn(1000)
        fixed(big), free(big)
    assert fixed.is_fixed and int(fixed.fixed) == 1 and not fixed.observing
    assert torch.equal(fixed.scale, s0) and steps(fixed) == n0  # the observer no longer moves the scale
    assert float(free.scale) > 10 * float(s0)  # control: an unfixed quantizer follows the new data
    fixed.unfix_scale()
    assert not fixed.is_fixed


def test_fix_scale_without_data_fails():
    with pytest.raises(CalibrationError, match="has not observed any data"):
        FakeQuantize("min_max").fix_scale()


def test_load_scale_validation_and_use():
    fq = FakeQuantize("min_max", ch_axis=0)
    fq.load_scale(torch.tensor([0.5, 0.25]))
    assert fq.is_fixed and torch.equal(fq.scale, torch.tensor([0.5, 0.25]))
    fq.enable_fake_quant()
    x = torch.tensor([[0.7, -3.0], [0.3, 100.0]])
    assert torch.equal(fq(x), quantize_dequantize(x, torch.tensor([0.5, 0.25]), 8, 0))
    for bad, msg in [(-1.0, "out of range"), (float("nan"), "out of range"), (torch.ones(2, 2), "does not fit")]:
        with pytest.raises(ValueError, match=msg):
            fq.load_scale(bad)
    with pytest.raises(ValueError, match="does not fit"):
        FakeQuantize("min_max").load_scale(torch.ones(3))


def test_observer_instance_and_registry():
    obs = MinMaxObserver(bits=6, ch_axis=0)
    fq = FakeQuantize(obs)
    assert fq.observer is obs and fq.bits == 6 and fq.ch_axis == 0
    with pytest.raises(ValueError, match="takes bits"):
        FakeQuantize(obs, bits=8)
    with pytest.raises(ValueError, match="observer='nope' is unknown"):
        FakeQuantize("nope")


def test_state_dict_loads_per_channel_and_flags():
    a = FakeQuantize("min_max", ch_axis=0)
    a(torch.randn(6, 4))
    a.fix_scale()
    b = FakeQuantize("min_max", ch_axis=0)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.scale, a.scale) and b.is_fixed and not b.observing
    assert torch.equal(b.observer.get_amax(), a.observer.get_amax())


def test_fix_activation_scales_leaves_weights_free(prepared):
    with torch.no_grad():
        prepared(torch.randn(4, 3, 8, 8))
    names = fix_activation_scales(prepared)
    qs = named_quantizers(prepared)
    assert names == [k for k, fq in qs.items() if fq.kind == "activation"] and "input" in names
    prepared.train()
    set_fake_quantize(prepared, FakeQuantState.QAT)
    before = {k: (fq.scale.clone(), steps(fq)) for k, fq in qs.items()}
    out = prepared(torch.randn(4, 3, 8, 8))
    out.square().mean().backward()
    for k, fq in qs.items():
        if fq.kind == "activation":
            assert torch.equal(fq.scale, before[k][0]) and steps(fq) == before[k][1]
        else:
            assert steps(fq) == before[k][1] + 1 and fq.observing
    assert prepared.get_submodule("0").weight.grad.abs().sum() > 0  # STE lets gradients reach the weights
