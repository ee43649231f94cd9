"""ONNX QDQ export (calibkit.quant.onnx_export) and its check in ONNX Runtime (calibkit.analysis.deployment).

The parity test runs the smoke-profile CIFAR model (trained here as notebook 01 trains it) on the whole CIFAR-10
test split; the unit tests use a small randomly initialized CIFAR ResNet.
"""

import math

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

import calibkit as ck  # noqa: E402
from calibkit.analysis import deployment  # noqa: E402
from calibkit.cifar.models import cifar_resnet  # noqa: E402
from calibkit.errors import CalibrationError, PrepareError, StateError  # noqa: E402
from calibkit.quant.onnx_export import export_onnx  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def _calibrated(model, x, activation_bits=8, validation=True):
    q = ck.prepare(model, ck.get_default_qconfig("min_max", activation_bits=activation_bits), (x[:2],))
    ck.calibrate(q, [x], progress=False)
    if validation:
        ck.set_fake_quantize(q, ck.FakeQuantState.VALIDATION)
    return q


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = _randomize_bn(cifar_resnet(width=(8, 16, 16)))
    x = torch.randn(64, 3, 32, 32)
    return model, x


def _initializers(path):
    m = onnx.load(str(path))
    return m, {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def test_qdq_layout_scalar_scales_int8_weights_int32_bias(small, tmp_path):
    model, x = small
    q = _calibrated(model, x)
    path = export_onnx(q, x[:2], tmp_path / "m.onnx", opset=13)
    m, inits = _initializers(path)
    assert m.opset_import[0].version == 13
    nodes = m.graph.node
    producers = {o: n for n in nodes for o in n.output}
    convs = [n for n in nodes if n.op_type in ("Conv", "Gemm")]
    assert len(convs) == 8  # 7 convs + the linear head
    for n in convs:
        x_dq, w_dq, b_dq = (producers[i] for i in n.input)
        assert x_dq.op_type == w_dq.op_type == b_dq.op_type == "DequantizeLinear"
        assert producers[x_dq.input[0]].op_type == "QuantizeLinear"
        assert inits[w_dq.input[0]].dtype == np.int8 and inits[b_dq.input[0]].dtype == np.int32
        out_ch = inits[w_dq.input[0]].shape[0]
        assert inits[w_dq.input[1]].shape == (out_ch,)  # per output channel
        assert np.all(inits[w_dq.input[2]] == 0)
    for n in nodes:
        if n.op_type == "QuantizeLinear":  # activations: scalar scale, int8 zero point 0
            assert inits[n.input[1]].shape == () and inits[n.input[2]].shape == ()
            assert inits[n.input[2]].dtype == np.int8 and inits[n.input[2]] == 0
    # the exported scales are calibkit's
    scales = {float(inits[n.input[1]]) for n in nodes if n.op_type == "QuantizeLinear"}
    for name, fq in ck.named_quantizers(q).items():
        if fq.kind == "activation":
            assert float(fq.scale) in scales, name


def test_integer_kernels_and_outputs_small_model(small, tmp_path):
    model, x = small
    q = _calibrated(model, x)
    path = export_onnx(q, x[:2], tmp_path / "m.onnx")
    k = deployment.kernel_counts(path, threads=1)
    assert k["integer"] == {"NhwcMaxPool": 3, "QGemm": 1, "QLinearAdd": 3, "QLinearConv": 7}, k["all"]
    assert k["float_compute_total"] == 0, k["float_compute"]
    p = deployment.parity(q, path, x, torch.zeros(len(x), dtype=torch.long))
    assert p["top1_agreement"] == 1.0
    assert p["max_logit_difference_steps"] <= 1.0 + 1e-4  # at most one output step (near-ties of requantization)


def test_narrow_activations_stay_on_their_grid(small, tmp_path):
    model, x = small
    q = _calibrated(model, x, activation_bits=4)
    path = export_onnx(q, x[:2], tmp_path / "m4.onnx")
    p = deployment.parity(q, path, x, torch.zeros(len(x), dtype=torch.long))
    assert p["max_logit_difference_steps"] <= 1.0 + 1e-4
    codes = deployment.run_onnx(path, x) / p["output_scale"]
    assert float(codes.min()) >= -8 - 1e-3 and float(codes.max()) <= 7 + 1e-3  # 4-bit output grid


def test_export_leaves_the_model_untouched(small, tmp_path):
    model, x = small
    q = _calibrated(model, x)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    out = q(x)
    export_onnx(q, x[:2], tmp_path / "m.onnx")
    after = q.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(q(x), out) and not q.training
    assert ck.get_fake_quantize_state(q) is ck.FakeQuantState.VALIDATION


def test_errors_name_the_problem(small, tmp_path):
    model, x = small
    with pytest.raises(CalibrationError, match="no valid scale"):
        export_onnx(ck.prepare(model, ck.get_default_qconfig(), (x[:2],)), x[:2], tmp_path / "a.onnx")
    with pytest.raises(StateError, match="VALIDATION"):
        export_onnx(_calibrated(model, x, validation=False), x[:2], tmp_path / "b.onnx")
    q = _calibrated(model, x)
    q.train()
    ck.set_fake_quantize(q, ck.FakeQuantState.QAT)
    with pytest.raises(StateError, match="train mode"):
        export_onnx(q, x[:2], tmp_path / "c.onnx")
    with pytest.raises(ValueError, match=r"bits=16.*\[2, 8\]"):
        export_onnx(_calibrated(model, x, activation_bits=16), x[:2], tmp_path / "d.onnx")
    with pytest.raises(ValueError, match=r"opset=12 is out of range"):
        export_onnx(_calibrated(model, x), x[:2], tmp_path / "e.onnx", opset=12)
    with pytest.raises(PrepareError):
        export_onnx(model, x[:2], tmp_path / "f.onnx")
    assert not list(tmp_path.iterdir()), "a refused export writes no file"


@pytest.fixture(scope="module")
def smoke_model(cifar):
    from calibkit.cifar.train import train_profile

    model, _ = train_profile(cifar, "smoke", seed=0, progress=False)
    return model.eval()


def test_parity_on_the_smoke_model(smoke_model, cifar, tmp_path):
    """ONNX Runtime vs calibkit's VALIDATION model on the 10 000 CIFAR-10 test images (issue: >= 99.5 % top-1
    agreement, accuracy within 0.1 point, largest logit difference reported in output steps)."""
    calib = ck.calibration_batches(cifar, num_batches=4, batch_size=64, seed=0)
    q = ck.prepare(smoke_model, ck.get_default_qconfig(), (calib[0][:2],))
    ck.calibrate(q, calib, progress=False)
    ck.set_fake_quantize(q, ck.FakeQuantState.VALIDATION)
    path = export_onnx(q, calib[0][:2], tmp_path / "smoke.onnx")
    p = deployment.parity(q, path, ck.normalize(cifar.test_images), cifar.test_labels)
    print(f"parity on {p['images']} test images: {p}")
    assert p["images"] == 10000
    assert p["top1_agreement"] >= 0.995
    assert abs(p["accuracy_difference"]) <= 0.001
    assert math.isfinite(p["max_logit_difference_steps"]) and p["max_logit_difference_steps"] <= 2.0
    assert deployment.kernel_counts(path)["integer"]["QLinearConv"] == 7


def test_deployment_rows_and_figure():
    from calibkit.tutorial.deploy import result_rows
    from calibkit.tutorial.deploy_figures import plot_deployment

    f = {"accuracy_pytorch": 0.9, "accuracy_onnx": 0.9, "top1_agreement": 1.0, "ms_pytorch": 100.0, "ms_onnx": 50.0,
         "file_kib": 400.0}
    q = {"int8": {"accuracy_calibkit": 0.89, "accuracy_onnx": 0.88, "top1_agreement": 0.99, "ms_fake_quant": 200.0,
                  "ms_onnx": 25.0, "file_kib": 100.0}}
    rows = result_rows(f, q, batch=256)
    assert [(r["model"], r["runtime"]) for r in rows] == [("float", "PyTorch"), ("float", "ORT float32"),
                                                         ("int8", "fake-quant (PyTorch)"), ("int8", "ORT int8")]
    assert rows[3]["accuracy %"] == pytest.approx(88.0) and rows[3]["agreement %"] == pytest.approx(99.0)
    assert rows[3]["images/s"] == pytest.approx(256 / 0.025)
    fig = plot_deployment(rows, 256)
    assert len(fig.axes) == 3 and fig.axes[1].get_yscale() == "log"
