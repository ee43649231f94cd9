"""prepare (tracing, BN folding, quantizer placement and names), qconfig overrides, state_dict,
calibrate and evaluate."""

import io

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from calibkit.quant.calibrate import CalibrationStateWarning, calibrate, evaluate
from calibkit.errors import CalibrationError, PrepareError, StateError
from calibkit.quant.fake_quantize import FakeQuantState, named_quantizers, set_fake_quantize
from calibkit.quant.observers import get_observer_class, observer_names
from calibkit.quant.prepare import prepare
from calibkit.quant.qmodules import QConv2d, QLinear
from calibkit.quant.qconfig import QConfig, QuantSpec, get_default_qconfig

QC = get_default_qconfig("min_max")


class Block(nn.Module):
    """CIFAR-style basic block: conv-bn-relu, conv-bn, shortcut, residual add, relu."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


def small_resnet(seed=0):
    """Random weights with non-trivial BN statistics (so folding is really tested)."""
    torch.manual_seed(seed)
    m = SmallResNet()
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.3, 0.3)
    return m.eval()


def batches(n=3, seed=1, size=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, size, size, generator=g) for _ in range(n)]


EXPECTED_NAMES = [
    "input", "stem.0.weight", "stem.0.out",
    "layer1.conv1.weight", "layer1.conv1.out", "layer1.conv2.weight", "layer1.conv2.out", "layer1.add.out",
    "layer2.conv1.weight", "layer2.conv1.out", "layer2.conv2.weight", "layer2.conv2.out",
    "layer2.shortcut.0.weight", "layer2.shortcut.0.out", "layer2.add.out",
    "pool.out", "fc.weight", "fc.out",
]


def test_placement_and_names_on_small_resnet():
    p = prepare(small_resnet(), QC, torch.randn(1, 3, 16, 16))
    qs = named_quantizers(p)
    assert list(qs) == EXPECTED_NAMES
    assert [k for k, fq in qs.items() if fq.kind == "weight"] == [k for k in EXPECTED_NAMES if k.endswith(".weight")]
    assert all(fq.quantizer_name == k for k, fq in qs.items())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in p.modules())  # all folded
    assert isinstance(p.get_submodule("layer1.conv1"), QConv2d) and isinstance(p.get_submodule("fc"), QLinear)
    # state_dict keys are readable too
    keys = p.state_dict().keys()
    assert "fake_quant.layer1.add.out.scale" in keys and "layer1.conv1.weight_fake_quant.scale" in keys
    assert not p.training


def test_prepare_copies_and_bn_folding_matches_float():
    model = small_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = prepare(model, QC, torch.randn(1, 3, 16, 16))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input model untouched
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        ref, out = model(x), p(x)  # CALIBRATION: float compute with folded BN
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    with pytest.raises(PrepareError, match="already contains FakeQuantize"):
        prepare(p, QC, torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("ctor", [torchvision.models.resnet18, torchvision.models.mobilenet_v2])
def test_torchvision_models(ctor):
    torch.manual_seed(0)
    model = ctor().eval()
    p = prepare(model, QC, torch.randn(1, 3, 64, 64))
    qs = named_quantizers(p)
    weighted = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [k for k, fq in qs.items() if fq.kind == "weight"] == [f"{n}.weight" for n in weighted]
    if ctor is torchvision.models.resnet18:
        n_add = sum(isinstance(m, torchvision.models.resnet.BasicBlock) for m in model.modules())
        pools = ["avgpool.out"]  # max-pool shares its input's quantizer
    else:
        n_add = sum(getattr(m, "use_res_connect", False) for m in model.modules())
        pools = ["adaptive_avg_pool2d.out"]  # F.adaptive_avg_pool2d in the top-level forward
    acts = [k for k, fq in qs.items() if fq.kind == "activation"]
    assert len(acts) == 1 + len(weighted) + n_add + len(pools)
    assert sum(k.endswith("add.out") for k in acts) == n_add and all(k in acts for k in pools)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, out = model(x), p(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    calibrate(p, [torch.randn(2, 3, 64, 64)], progress=False)
    set_fake_quantize(p, FakeQuantState.VALIDATION)
    with torch.no_grad():
        assert torch.isfinite(p(x)).all()


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x)).mean((2, 3))


def test_untraceable_model_says_what_to_do():
    with pytest.raises(PrepareError, match=r"(?s)inside module 'gate' \(Gate\).*traceable.*leaf_modules=\[Gate\]"):
        prepare(Untraceable(), QC, torch.randn(1, 3, 8, 8))
    for leaf in ([Gate], ["gate"]):
        p = prepare(Untraceable(), QC, torch.randn(1, 3, 8, 8), leaf_modules=leaf)
        assert list(named_quantizers(p)) == ["input", "conv.weight", "conv.out", "gate.out", "mean.out"]
    with pytest.raises(PrepareError, match="running the traced Untraceable on example_inputs failed"):
        prepare(Untraceable(), QC, torch.randn(1, 5, 8, 8), leaf_modules=[Gate])  # 5 channels for a 3-channel conv
    with pytest.raises(ValueError, match="'gat' is not a module.*'gate'"):
        prepare(Untraceable(), QC, torch.randn(1, 3, 8, 8), leaf_modules=["gat"])


# -- qconfig and overrides ---------------------------------------------------------------------------
def spec(bits, ch_axis=None):
    return QuantSpec("min_max", bits=bits, ch_axis=ch_axis)


def test_default_qconfig_and_spec_validation():
    qc = get_default_qconfig("min_max", "min_max", activation_kwargs={"averaging_constant": 0.1}, weight_bits=6)
    assert qc.activation.ch_axis is None and qc.weight.ch_axis == 0 and qc.weight.bits == 6
    assert qc.activation.kwargs == {"averaging_constant": 0.1}
    assert get_default_qconfig("min_max", weight_kwargs={"ch_axis": None}).weight.ch_axis is None
    with pytest.raises(ValueError, match="averaging_constant=2"):
        QuantSpec("min_max", kwargs={"averaging_constant": 2})
    with pytest.raises(ValueError, match="bits=1"):
        QuantSpec("min_max", bits=1)
    with pytest.raises(ValueError, match="observer='nope' is unknown"):
        get_default_qconfig("nope")


@pytest.mark.skipif("mse" not in observer_names(), reason="the mse observer is not registered yet")
def test_default_qconfig_is_mse_activations_min_max_per_channel_weights():
    qc = get_default_qconfig()
    assert qc.activation.observer is get_observer_class("mse") and qc.activation.ch_axis is None
    assert qc.weight.observer is get_observer_class("min_max") and qc.weight.ch_axis == 0


def test_override_priority_all_four_levels():
    overrides = {
        nn.Conv2d: QConfig(activation=spec(6), weight=spec(7, 0)),  # module type
        "layer2": QConfig(activation=spec(5)),  # module name (weights inherit from the type level)
        "layer2.conv1.out": spec(4),  # quantizer name
        Block: QConfig(activation=spec(3)),  # a type enclosing the ops (innermost match wins)
    }
    p = prepare(small_resnet(), QC, torch.randn(1, 3, 16, 16), overrides=overrides)
    bits = {k: fq.bits for k, fq in named_quantizers(p).items()}
    assert bits["layer2.conv1.out"] == 4  # quantizer name > module name
    assert bits["layer2.conv2.out"] == 5 and bits["layer2.add.out"] == 5  # module name > module type
    assert bits["layer2.conv2.weight"] == 7  # activation-only module override: weights fall through to type
    assert bits["layer1.conv1.out"] == 6  # Conv2d (innermost) beats the enclosing Block
    assert bits["layer1.add.out"] == 3  # the add lies inside a Block
    assert bits["stem.0.out"] == 6 and bits["stem.0.weight"] == 7
    assert bits["input"] == 8 and bits["pool.out"] == 8 and bits["fc.out"] == 8 and bits["fc.weight"] == 8  # global
    assert named_quantizers(p)["fc.weight"].ch_axis == 0 and named_quantizers(p)["stem.0.weight"].ch_axis == 0


def test_unknown_override_keys_are_errors():
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"'layer2.conv1.outt' matches no quantizer.*'layer2.conv1.out'"):
        prepare(small_resnet(), QC, x, overrides={"layer2.conv1.outt": spec(4)})
    with pytest.raises(ValueError, match=r"'layer2.bn1'.*no quantizer of its own.*folded"):
        prepare(small_resnet(), QC, x, overrides={"layer2.bn1": QConfig(activation=spec(4))})
    with pytest.raises(ValueError, match="no quantized op is .* of that type"):
        prepare(small_resnet(), QC, x, overrides={nn.LSTM: QConfig(activation=spec(4))})
    with pytest.raises(TypeError, match="must be a QConfig"):
        prepare(small_resnet(), QC, x, overrides={"layer2": spec(4)})


# -- state_dict ---------------------------------------------------------------------------------------
def test_state_dict_round_trip_for_validation_and_qat():
    model = small_resnet()
    p1 = prepare(model, QC, torch.randn(1, 3, 16, 16))
    calibrate(p1, batches(), progress=False)
    sd = p1.state_dict()  # saved in CALIBRATION state
    set_fake_quantize(p1, FakeQuantState.VALIDATION)
    p2 = prepare(model, QC, torch.randn(1, 3, 16, 16))
    p2.load_state_dict(sd)
    set_fake_quantize(p2, FakeQuantState.VALIDATION)
    q1, q2 = named_quantizers(p1), named_quantizers(p2)
    assert q2["layer2.conv1.weight"].scale.shape == (16,)
    assert all(torch.equal(q1[k].scale, q2[k].scale) for k in q1)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(p1(x), p2(x))
    buf = io.BytesIO()  # the whole prepared model pickles too
    torch.save(p1, buf)
    buf.seek(0)
    p4 = torch.load(buf, weights_only=False)
    assert list(named_quantizers(p4)) == list(q1)
    with torch.no_grad():
        assert torch.equal(p1(x), p4(x))
    p3 = prepare(model, QC, torch.randn(1, 3, 16, 16))  # saved in VALIDATION state, loaded for QAT
    p3.load_state_dict(p1.state_dict())
    p3.train()
    set_fake_quantize(p3, FakeQuantState.QAT)
    p3(x).logsumexp(1).mean().backward()
    assert p3.get_submodule("fc").weight.grad is not None


# -- calibrate / evaluate -----------------------------------------------------------------------------
def test_calibrate_contract():
    p = prepare(small_resnet(), QC, torch.randn(1, 3, 16, 16))
    labelled = [(b, torch.zeros(8, dtype=torch.long)) for b in batches(2)]
    seconds = calibrate(p, labelled, progress=False)
    assert isinstance(seconds, float) and seconds > 0
    assert all(int(fq.observer.steps) == 2 for fq in named_quantizers(p).values())
    calibrate(p, batches(1), progress=False, reset=True)
    assert all(int(fq.observer.steps) == 1 for fq in named_quantizers(p).values())
    with pytest.raises(CalibrationError, match="batches is empty"):
        calibrate(p, [], progress=False)
    p.train()
    with pytest.raises(StateError, match="needs the model in eval mode"):
        calibrate(p, batches(1), progress=False)


def test_evaluate_float_and_prepared_without_touching_observers():
    model = small_resnet()
    x = torch.randn(40, 3, 16, 16)
    with torch.no_grad():
        pred = model(x).argmax(1)
    labels = pred.clone()
    labels[:10] = (labels[:10] + 1) % 10  # exactly 30 of 40 right
    assert evaluate(model, x, labels, batch_size=16, progress=False) == 0.75
    p = prepare(model, QC, x[:1])
    calibrate(p, batches(1), progress=False)
    qs = named_quantizers(p)
    amax = {k: fq.observer.amax.clone() for k, fq in qs.items()}
    with pytest.warns(CalibrationStateWarning, match="still in FakeQuantState.CALIBRATION"):
        assert evaluate(p, x, labels, batch_size=16, progress=False) == 0.75  # CALIBRATION = float compute
    assert all(torch.equal(fq.observer.amax, amax[k]) and int(fq.observer.steps) == 1 for k, fq in qs.items())
    assert all(fq.observing for fq in qs.values())  # restored
    with pytest.raises(TypeError, match="normalize"):
        evaluate(model, (x * 50).to(torch.uint8), labels, progress=False)
    with pytest.raises(ValueError, match="batch_size=0"):
        evaluate(model, x, labels, batch_size=0, progress=False)
    model.train()
    with pytest.raises(StateError, match="model.eval"):
        evaluate(model, x, labels, progress=False)
