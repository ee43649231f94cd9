import pytest
import torch
import torch.fx
from torch import nn

from calibkit.cifar.models import build_model, cifar_resnet, fusion_groups, whiten_stem_



pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize_bn(model, seed=0):
    """Give every BN non-trivial affine parameters and running statistics, as after training."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) * 1.5 + 0.25
            m.bias.data = torch.randn(n, generator=g) * 0.3
            m.running_mean = torch.randn(n, generator=g) * 0.5
            m.running_var = torch.rand(n, generator=g) * 2 + 0.1
    return model


@pytest.mark.parametrize("width", [(64, 128, 128), (16, 32, 32)])
def test_output_shape(width):
    torch.manual_seed(0)
    model = cifar_resnet(width).eval()
    out = model(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, 10)
    assert torch.isfinite(out).all()


def test_num_classes_and_blocks():
    model = cifar_resnet((8, 8, 16), num_classes=7, blocks=(0, 2, 1)).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert len(model.stage1.residual) == 0 and len(model.stage2.residual) == 2
    assert model.config == {"width": [8, 8, 16], "num_classes": 7, "stem_width": 24, "blocks": [0, 2, 1]}


@pytest.mark.parametrize("kwargs, word", [({"width": (16, 32)}, "width"), ({"width": (16, 0, 32)}, "width"),
                                          ({"num_classes": 1}, "num_classes"), ({"blocks": (1, -1, 1)}, "blocks"),
                                          ({"stem_width": 0}, "stem_width")])
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        cifar_resnet(**kwargs)


def test_param_count_matches_layout():
    w, s, c = (64, 128, 128), 24, 10
    conv = lambda cin, cout, k: cin * cout * k * k + 2 * cout  # conv (no bias) + BN affine
    expected = conv(3, s, 2) + conv(s, w[0], 3) + conv(w[0], w[1], 3) + conv(w[1], w[2], 3)
    expected += sum(conv(x, x, 3) for x in w) + w[2] * c + c
    model = cifar_resnet(w, c)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert 0.4e6 < expected < 0.7e6


def test_build_model_roundtrip_and_unknown_arch():
    model = cifar_resnet((8, 16, 16))
    again = build_model(model.arch_name, **model.config)
    assert again.config == model.config
    with pytest.raises(ValueError, match="arch"):
        build_model("resnet9000")


def test_fx_trace_matches_eager():
    torch.manual_seed(0)
    model = _randomize_bn(cifar_resnet((16, 32, 32))).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    ops = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert ops <= {__import__("operator").add}, f"unexpected functional ops {ops}"


@pytest.mark.parametrize("method", ["fuse_modules", "fx_fuse"])
def test_conv_bn_folding_preserves_output(method):
    torch.manual_seed(0)
    model = _randomize_bn(cifar_resnet((16, 32, 32))).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        if method == "fuse_modules":
            fused = torch.ao.quantization.fuse_modules(model, fusion_groups(model), inplace=False)
        else:
            from torch.fx.experimental.optimization import fuse
            fused = fuse(model)
        out = fused(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules()), "a BatchNorm was not folded"
    rel = (out - ref).norm() / ref.norm()
    assert rel < 1e-5, f"relative error {rel:.2e} after conv-BN folding"


def test_fusion_groups_cover_every_bn():
    model = cifar_resnet((16, 32, 32), blocks=(1, 2, 1))
    groups = fusion_groups(model)
    modules = dict(model.named_modules())
    bns = {n for n, m in modules.items() if isinstance(m, nn.BatchNorm2d)}
    assert {g[1] for g in groups} == bns
    for g in groups:
        assert isinstance(modules[g[0]], nn.Conv2d) and isinstance(modules[g[1]], nn.BatchNorm2d)
        assert len(g) == 2 or isinstance(modules[g[2]], nn.ReLU)


def test_whiten_stem_decorrelates_patches():
    g = torch.Generator().manual_seed(0)
    # correlated "images": smooth random fields with channel mixing
    base = torch.randn(64, 3, 16, 16, generator=g)
    imgs = torch.nn.functional.interpolate(base, size=32, mode="bilinear", align_corners=False)
    imgs = torch.einsum("ij,njhw->nihw", torch.tensor([[1.0, 0.5, 0.2], [0.3, 1.0, 0.4], [0.1, 0.6, 1.0]]), imgs)
    conv = nn.Conv2d(3, 26, 2, bias=False)
    extra = conv.weight[24:].clone()
    whiten_stem_(conv, imgs, eps=1e-6)
    with torch.no_grad():
        y = conv(imgs)[:, 0:24:2].permute(1, 0, 2, 3).reshape(12, -1)
    y = y - y.mean(1, keepdim=True)
    cov = y @ y.T / y.shape[1]
    torch.testing.assert_close(cov, torch.eye(12), atol=2e-3, rtol=0)
    torch.testing.assert_close(conv.weight[1:24:2], -conv.weight[0:24:2])
    assert torch.equal(conv.weight[24:], extra), "channels beyond 24 must keep their weights"
    with pytest.raises(ValueError, match="images"):
        whiten_stem_(conv, torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_op_summary_counts_the_traced_ops():
    from calibkit.cifar.models import op_summary

    kinds = op_summary(cifar_resnet((8, 8, 8), blocks=(1, 2, 0)))
    # stem + 3 stage convs + 3 residual convs; BN after each conv; one add per residual block
    assert kinds["Conv2d"] == 7 and kinds["BatchNorm2d"] == 7 and kinds["add"] == 3
    assert kinds["Linear"] == 1 and kinds["MaxPool2d"] == 3 and kinds["AdaptiveMaxPool2d"] == 1


def test_pool_first_is_a_training_mode_order_with_the_same_eval_function():
    torch.manual_seed(0)
    model = _randomize_bn(cifar_resnet((16, 32, 32)))  # BN weights > 0
    x = torch.randn(6, 3, 32, 32)
    seen = []
    model.stage2.conv.bn.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    with torch.no_grad():
        model.eval()
        ref = model(x)
        for s in (model.stage1, model.stage2, model.stage3):
            s.pool_first = True
        out = model(x)                 # eval mode: conv -> BN -> ReLU -> pool whatever pool_first says
        model.train()
        model(x)                       # training mode: the BN sees the pooled map
        model.stage2.pool_first = False
        model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert seen == [(15, 15), (15, 15), (7, 7), (15, 15)]
    # with a positive BN scale, pooling first gives the same function (max-pool commutes with increasing maps)
    stage = model.stage2.eval()
    h = torch.randn(4, 16, 15, 15)
    c = stage.conv
    torch.testing.assert_close(c.relu(c.bn(stage.pool(c.conv(h)))), stage.pool(c(h)), rtol=0, atol=0)
    # tracing (prepare, fusion) sees the eval-mode order
    traced = torch.fx.symbolic_trace(model.eval())
    order = [n.target for n in traced.graph.nodes if n.op == "call_module" and n.target.startswith("stage1.")]
    assert order[:4] == ["stage1.conv.conv", "stage1.conv.bn", "stage1.conv.relu", "stage1.pool"]
