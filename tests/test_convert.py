"""convert: integer reference model equivalent to the VALIDATION-state fake-quant model."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from calibkit.quant.calibrate import calibrate
from calibkit.quant.convert import (Dequantize, IntConv, IntLinear, Quantize, convert, fixed_point_multiplier, named_int_ops,
                              requantize_fixed_point)
from calibkit.errors import CalibrationError
from calibkit.quant.fake_quantize import FakeQuantState, named_quantizers, set_fake_quantize
from calibkit.quant.prepare import prepare
from calibkit.quant.qconfig import get_default_qconfig
from calibkit.quant.numerics import qrange


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """CIFAR-style: conv-bn-relu stem, max-pool, two residual blocks, avg-pool, linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.layer1, self.layer2 = Block(8, 8, 1), Block(8, 16, 2)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


class Zoo(nn.Module):
    """Ops beyond the ResNet: ReLU6 fusion, cat, mul, a module called twice, sigmoid / hardswish / sub
    (float fallback), standalone ReLU, functional avg-pool, mean, linear + BatchNorm1d folding."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU6())
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(12, 8, 3, padding=1, groups=4)
        self.act = nn.Hardswish()
        self.fc1, self.bn = nn.Linear(8, 12), nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        y = torch.relu(self.c(y)) * torch.sigmoid(self.b(x)).mean(1, keepdim=True)
        y = F.avg_pool2d(self.act(torch.relu(y - 0.1)), 2)
        return self.fc2(F.relu(self.bn(self.fc1(y.mean((2, 3))))))


def randomize_bn(m):
    for bn in m.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.3, 0.3)
    return m.eval()


def calibrated(model, shape, qconfig=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = prepare(model, qconfig or get_default_qconfig("min_max"), torch.randn(1, *shape[1:], generator=g))
    calibrate(p, [torch.randn(*shape, generator=g) for _ in range(3)], progress=False)
    return set_fake_quantize(p, FakeQuantState.VALIDATION)


def assert_equivalent(p, c, x):
    """Every quantized tensor of the integer model within one step of the fake-quant model, and the logits
    within one step of the output quantizer. Returns the worst difference in steps."""
    qs, ops = named_quantizers(p), named_int_ops(c)
    acts = [k for k, fq in qs.items() if fq.kind == "activation"]
    assert list(ops) == acts  # one integer op per activation quantizer, same order
    fake, codes = {}, {}
    hooks = [qs[k].register_forward_hook(lambda m, i, o, k=k: fake.__setitem__(k, o)) for k in acts]
    hooks += [ops[k].register_forward_hook(lambda m, i, o, k=k: codes.__setitem__(k, o)) for k in acts]
    with torch.no_grad():
        ref, out = p(x), c(x)
    for h in hooks:
        h.remove()
    worst = 0.0
    for k in acts:
        q, s = codes[k], qs[k].scale
        qmin, qmax = qrange(qs[k].bits)
        assert q.dtype == torch.float64 and torch.equal(q, q.round()) and q.min() >= qmin and q.max() <= qmax
        steps = float(((q.float() * s - fake[k]).abs() / s).max())
        assert steps <= 1 + 1e-4, f"{k}: {steps} steps"
        worst = max(worst, steps)
    out_scale = qs[acts[-1]].scale
    assert out.dtype == torch.float32 and float((out - ref).abs().max()) <= float(out_scale) * (1 + 1e-4)
    return worst


def test_convert_small_resnet_matches_validation():
    torch.manual_seed(0)
    p = calibrated(randomize_bn(SmallResNet()), (8, 3, 16, 16))
    c = convert(p)
    # 8-bit accumulators fit float32 exactly, so the integer model reproduces VALIDATION bit for bit
    assert assert_equivalent(p, c, torch.randn(16, 3, 16, 16)) == 0.0
    ops = named_int_ops(c)
    conv = ops["layer2.conv1.out"]
    assert isinstance(conv, IntConv) and isinstance(ops["fc.out"], IntLinear) and isinstance(ops["input"], Quantize)
    assert conv.weight.dtype == torch.int8 and conv.bias.dtype == torch.int32 and conv.weight_scale.shape == (16,)
    qs = named_quantizers(p)
    m = qs["layer1.add.out"].scale.double() * qs["layer2.conv1.weight"].scale.double() / qs["layer2.conv1.out"].scale.double()
    assert torch.allclose(conv.multiplier, m, rtol=1e-12)  # M = s_in * s_w / s_out per channel
    assert conv.act == "relu" and conv.lo == 0  # fused ReLU
    assert any(isinstance(mod, Dequantize) for mod in c.modules())


def test_convert_zoo_ops_and_bits():
    torch.manual_seed(0)
    qc = get_default_qconfig("min_max", activation_bits=6, weight_bits=6)
    p = calibrated(randomize_bn(Zoo()), (8, 3, 8, 8), qconfig=qc)
    names = list(named_quantizers(p))
    for k in ("cat.out", "mul.out", "b.out_1", "sigmoid.out", "sub.out", "relu.out", "act.out", "avg_pool2d.out",
              "mean.out", "mean_1.out"):
        assert k in names
    assert "bn" not in "".join(names)  # BatchNorm1d folded into fc1
    c = convert(p)
    assert_equivalent(p, c, torch.randn(16, 3, 8, 8))
    assert named_int_ops(c)["a.0.out"].hi == 31  # 6 bits: calibrated ReLU6 range never exceeds qmax
    named_quantizers(p)["a.0.out"].load_scale(0.5)  # a coarse scale makes the ReLU6 cap bind: round(6 / 0.5)
    c = convert(p)
    assert (named_int_ops(c)["a.0.out"].lo, named_int_ops(c)["a.0.out"].hi) == (0, 12)
    assert_equivalent(p, c, 4 * torch.randn(16, 3, 8, 8))


def test_convert_mobilenet_v2():
    torch.manual_seed(0)
    p = calibrated(randomize_bn(torchvision.models.mobilenet_v2()), (2, 3, 64, 64))
    assert_equivalent(p, convert(p), torch.randn(2, 3, 64, 64))


def test_convert_kit_cifar_resnet():
    models = pytest.importorskip("calibkit.cifar.models")
    torch.manual_seed(0)
    p = calibrated(randomize_bn(models.cifar_resnet(width=(16, 32, 32))), (8, 3, 32, 32))
    assert_equivalent(p, convert(p), torch.randn(8, 3, 32, 32))


def test_fixed_point_requantization():
    m = torch.tensor([1e-4, 0.00123, 0.37, 0.5, 0.999999, 3.7], dtype=torch.float64)
    m0, shift = fixed_point_multiplier(m)
    assert bool(((m0 >= 2**30) & (m0 < 2**31)).all())
    assert torch.allclose(m0.double() * 2.0 ** (-shift.double()), m, rtol=2.0**-30, atol=0)
    acc = torch.arange(-5000, 5000, 7, dtype=torch.int64)
    for i in range(len(m)):
        got = requantize_fixed_point(acc, m0[i], shift[i])
        exact = acc.double() * m[i]
        assert (got.double() - exact).abs().max() <= 0.5 + 1e-6  # round(acc * M) up to ties
    with pytest.raises(ValueError, match="out of range"):
        fixed_point_multiplier(torch.tensor([2.0**40]))
    torch.manual_seed(0)
    p = calibrated(randomize_bn(SmallResNet()), (8, 3, 16, 16))
    c = convert(p, fixed_point=True)
    assert all(op.fixed_point for op in named_int_ops(c).values() if isinstance(op, (IntConv, IntLinear)))
    assert_equivalent(p, c, torch.randn(16, 3, 16, 16))


def test_convert_needs_calibration_and_a_prepared_model():
    p = prepare(SmallResNet().eval(), get_default_qconfig("min_max"), torch.randn(1, 3, 16, 16))
    with pytest.raises(CalibrationError, match="quantizer 'input'"):
        convert(p)
    with pytest.raises(TypeError, match="calibkit.quant.prepare"):
        convert(SmallResNet())


def test_convert_uses_fixed_and_loaded_scales():
    torch.manual_seed(0)
    p = calibrated(randomize_bn(SmallResNet()), (8, 3, 16, 16))
    named_quantizers(p)["input"].load_scale(0.05)
    set_fake_quantize(p, FakeQuantState.VALIDATION)
    c = convert(p)
    assert float(named_int_ops(c)["input"].out_scale) == pytest.approx(0.05)
    assert assert_equivalent(p, c, torch.randn(8, 3, 16, 16)) == 0.0
