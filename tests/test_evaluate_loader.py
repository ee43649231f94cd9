"""Standard PyTorch data in: evaluate streams (inputs, labels) batches from any iterable or DataLoader with
running counts (top-1, top-5); calibrate, QAT and the analysis tools take DataLoaders of tensors or pairs."""

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from calibkit.analysis.activation_stats import ActivationStats
from calibkit.analysis.overrides import apply_overrides
from calibkit.analysis.report import debug_report
from calibkit.analysis.sensitivity import sensitivity
from calibkit.quant import qat
from calibkit.quant.batches import batch_input
from calibkit.quant.calibrate import Accuracy, calibrate, evaluate
from calibkit.quant.fake_quantize import FakeQuantState, named_quantizers, set_fake_quantize
from calibkit.quant.prepare import prepare
from calibkit.quant.qconfig import QuantSpec, get_default_qconfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    """8 classes told apart (imperfectly) by per-channel mean offsets of 3 x 8 x 8 noise."""
    g = torch.Generator().manual_seed(0)
    mu = 0.6 * torch.randn(8, 3, 1, 1, generator=g)
    y = torch.randint(0, 8, (200,), generator=g)
    return torch.randn(200, 3, 8, 8, generator=g) + mu[y], y


def _model(classes=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes)).eval()


def _prepared(x):
    p = prepare(_model(), get_default_qconfig("min_max"), (x[:2],))
    calibrate(p, [x[:100], x[100:]], progress=False)
    set_fake_quantize(p, FakeQuantState.VALIDATION)
    return p


def _loader(x, y, batch_size=32, shuffle=False):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(1) if shuffle else None)


def test_evaluate_loader_gives_top1_top5_count_equal_to_the_tensor_form(data):
    x, y = data
    for model in (_model(), _prepared(x)):
        acc = evaluate(model, _loader(x, y, 32), progress=False)
        assert isinstance(acc, Accuracy) and acc.count == 200
        with torch.no_grad():
            logits = model(x)
        top1 = int((logits.argmax(1) == y).sum()) / 200
        top5 = int((logits.topk(5, 1).indices == y[:, None]).any(1).sum()) / 200
        assert (acc.top1, acc.top5) == (top1, top5)
        assert 0 < acc.top1 < acc.top5 < 1  # the toy task is neither trivial nor hopeless
        assert float(acc) == acc.top1 == evaluate(model, x, y, batch_size=64, progress=False)


def test_evaluate_streams_without_keeping_batches(data):
    """Running counts only: when batch k is produced, batch k-2 is gone (the loop holds one batch at a time)."""
    x, y = data
    refs = []

    def batches():
        for k in range(0, 200, 20):
            if len(refs) >= 2:
                gc.collect()
                assert refs[-2]() is None, f"batch {len(refs) - 2} is still alive while batch {len(refs)} is produced"
            xb = x[k:k + 20].clone()
            refs.append(weakref.ref(xb))
            yield xb, y[k:k + 20]

    acc = evaluate(_model(), batches(), progress=False)
    assert acc.count == 200 and len(refs) == 10


def test_evaluate_loader_errors_name_the_batch(data):
    x, y = data
    model = _model()
    with pytest.raises(ValueError, match=r"labels hold values in \[0, 9\] but the model has 8 outputs"):
        evaluate(model, [(x[:4], torch.tensor([0, 1, 2, 9]))], progress=False)
    with pytest.raises(ValueError, match="loader is empty"):
        evaluate(model, [], progress=False)
    with pytest.raises(TypeError, match=r"loader\[0\] is a Tensor.*\(inputs, labels\) pairs"):
        evaluate(model, [x[:4]], progress=False)
    with pytest.raises(ValueError, match=r"loader\[1\] labels must be a 1-d integer tensor"):
        evaluate(model, [(x[:4], y[:4]), (x[:4], y[:4].float())], progress=False)
    with pytest.raises(TypeError, match="no labels"):
        evaluate(model, x, progress=False)
    assert evaluate(_model(3), [(x[:4], torch.tensor([0, 1, 2, 2]))], progress=False).top5 == 1.0  # <= 5 classes


def test_batch_input_is_the_one_rule(data):
    x, y = data
    assert batch_input(x[:2], 0) is not None and batch_input((x[:2], y[:2]), 0).shape == (2, 3, 8, 8)
    with pytest.raises(TypeError, match=r"batches\[3\] is a Tensor of torch.int64"):
        batch_input(y, 3)


def test_calibrate_takes_a_dataloader_of_pairs(data):
    x, y = data
    p1 = prepare(_model(), get_default_qconfig("mse"), (x[:2],))
    p2 = prepare(_model(), get_default_qconfig("mse"), (x[:2],))
    calibrate(p1, [x[:50], x[50:100], x[100:150], x[150:]], progress=False)
    calibrate(p2, _loader(x, y, 50), progress=False)
    for (n, a), b in zip(named_quantizers(p1).items(), named_quantizers(p2).values()):
        assert torch.equal(a.validation_scale(), b.validation_scale()), n


def test_analysis_tools_take_dataloaders(data):
    x, y = data
    p = _prepared(x)
    loader = _loader(x, y, 100)
    rep_l, rep_t = debug_report(p, loader, progress=False), debug_report(p, [x[:100], x[100:]], progress=False)
    assert rep_l.worst(3) == rep_t.worst(3) and rep_l.images == 200
    st_l = ActivationStats.collect(p, loader, progress=False)
    st_t = ActivationStats.collect(p, [x[:100], x[100:]], progress=False)
    name = st_t.names[0]
    assert torch.equal(st_l.fine_counts(name), st_t.fine_counts(name))
    names = list(named_quantizers(p))[:3]
    s_l = sensitivity(p, names, _loader(x, y, 64), progress=False)
    s_t = sensitivity(p, names, x, y, batch_size=64, progress=False)
    assert s_l.rows == s_t.rows and s_l.float_accuracy == s_t.float_accuracy
    with pytest.raises(TypeError, match="one-shot iterator"):
        sensitivity(p, names, iter(_loader(x, y, 64)), progress=False)
    act = [n for n, q in named_quantizers(p).items() if q.kind == "activation"][1]
    assert apply_overrides(p, {act: QuantSpec("percentile", kwargs={"percentile": 99.0})}, loader, progress=False) == [act]
    assert torch.isfinite(named_quantizers(p)[act].validation_scale()).all()


def test_train_qat_takes_dataloaders(data):
    x, y = data
    p = _prepared(x)
    w0 = p.get_submodule("0").weight.detach().clone()
    hist = qat.train_qat(p, _loader(x, y, 50, shuffle=True), val_images=_loader(x, y, 100), epochs=1.5, lr=0.01,
                         evals=2, progress=False)
    assert hist["steps"] == 6 and hist["epoch"][-1] == pytest.approx(1.5) and hist["batch_size"] == 50
    assert len(hist["val_accuracy"]) == 3 and all(0 <= a <= 1 for a in hist["val_accuracy"])
    assert hist["val_accuracy"][-1] == evaluate(p, x, y, progress=False)
    assert not torch.equal(p.get_submodule("0").weight, w0)
    with pytest.raises(ValueError, match="batch_size=32 is set but train_images is a loader"):
        qat.train_qat(p, _loader(x, y), batch_size=32, progress=False)
    with pytest.raises(TypeError, match="one-shot iterator"):
        qat.train_qat(p, iter(_loader(x, y)), progress=False)
    w1 = p.get_submodule("0").weight.detach().clone()
    bad = _loader(x, torch.where(y == 0, 8, y), 50)
    with pytest.raises(ValueError, match="8 outputs"):
        qat.train_qat(p, bad, epochs=1, progress=False)
    assert torch.equal(p.get_submodule("0").weight, w1)  # all or nothing


class _Fixed(nn.Module):
    """Returns the logits it was given, ignoring its input: ties decide the prediction."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x):
        return self.logits[: x.shape[0]]


def test_top1_takes_the_first_of_tied_logits_like_argmax():
    """Quantized logits tie often; top-1 must be argmax's choice (the first maximum), in both forms."""
    logits = torch.zeros(6, 7)
    logits[:, 2] = logits[:, 5] = 1.0  # classes 2 and 5 tie for first place
    logits[:, 0] = -1.0  # class 0 last: never in the top 5 of 7
    labels = torch.tensor([2, 2, 2, 5, 5, 0])
    model = _Fixed(logits).eval()
    x = torch.zeros(6, 1)
    assert evaluate(model, x, labels, progress=False) == pytest.approx(3 / 6)
    acc = evaluate(model, [(x, labels)], progress=False)
    assert (acc.top1, acc.top5, acc.count) == (pytest.approx(3 / 6), pytest.approx(5 / 6), 6)
