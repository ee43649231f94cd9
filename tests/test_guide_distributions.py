"""Notebook 05's hard-distribution checks (calibkit.tutorial.hard_distributions): the LayerNorm model and its
quantizer, the spread measure, both experiments on a tiny model, and the verdicts from synthetic rows."""

import pytest
import torch
from torch import nn

from calibkit.cifar.images import ImageTensors
from calibkit.quant.prepare import prepare
from calibkit.quant.qconfig import get_default_qconfig
from calibkit.tutorial import hard_distributions as hard
from calibkit.tutorial.guide_checks import check_records


def _batches(n=2, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 32, 32, generator=g) for _ in range(n)]


def test_channel_layernorm_normalizes_each_pixel_over_its_channels():
    torch.manual_seed(0)
    norm, x = hard.ChannelLayerNorm(6), torch.randn(2, 6, 4, 5) * 3 + 1
    y = norm(x)
    want = (x - x.mean(1, keepdim=True)) / (x.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    assert torch.allclose(y, want, atol=1e-5)


def test_prepare_quantizes_the_layernorm_output_and_the_name_is_found():
    torch.manual_seed(0)
    model = hard.LayerNormResNet((4, 8, 8)).eval()
    prepared = prepare(model, get_default_qconfig(), (_batches()[0][:2],))
    assert hard.layernorm_quantizer(prepared, model) == "norm.ln.out"
    plain = prepare(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), get_default_qconfig(), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(ValueError, match="0 nn.LayerNorm"):
        hard.layernorm_quantizer(plain, nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_activation_spreads_is_max_abs_over_std_of_the_float_tensor():
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(4))
    model = nn.Sequential(lin).eval()
    x = [torch.tensor([[1.0, -2.0, 3.0, 0.0]]), torch.tensor([[0.5, 0.5, -8.0, 1.0]])]
    prepared = prepare(model, get_default_qconfig(), (x[0],))
    seconds, spreads = hard.activation_spreads(prepared, x)
    values = torch.cat(x).double().flatten()
    assert "input" not in spreads and seconds >= 0
    assert spreads["0.out"]["amax"] == pytest.approx(8.0)
    assert spreads["0.out"]["std"] == pytest.approx(float(values.std(unbiased=False)), rel=1e-9)
    assert spreads["0.out"]["spread"] == pytest.approx(8.0 / float(values.std(unbiased=False)), rel=1e-9)


def test_layernorm_rows_on_a_tiny_model():
    torch.manual_seed(0)
    model = hard.LayerNormResNet((4, 8, 8)).eval()
    calib = {0: _batches(1, 4, seed=0), 1: _batches(1, 4, seed=1)}
    images, labels = _batches(1, 8, seed=2)[0], torch.arange(8) % 10
    rows = hard.layernorm_rows(model, calib, images, labels, [99.99, 99.98], [99.99, 99.0, 90.0], bits=4)
    assert [r["path"] for r in rows if r["seed"] == 0] == ["small"] * 2 + ["large"] * 3 + ["alternative"] * 2
    assert [r["bits"] for r in rows if r["path"] == "alternative"] == [4, 8, 4, 8]
    large = [r["clip"] for r in rows if r["path"] == "large" and r["seed"] == 0]
    assert large == sorted(large, reverse=True) and large[-1] < large[0]   # a lower percentile clips lower
    assert all(r["clip"] <= r["max_abs"] * (1 + 1e-6) and 0 <= r["accuracy"] <= 1 for r in rows)
    assert all(r["sqnr_db"] > 0 for r in rows)
    record = hard.layernorm_record(rows, len(labels))
    wd = hard.weight_decay_record(_wd_rows((0.2, 0.1, 0.0), (9.0, 8.0, 7.0)), 16)
    assert check_records([record, wd], "05") == []
    assert "4-bit LayerNorm output" in record["measured"] and "2 calibration seed(s)" in record["note"]


def _ln_rows(small, large, seeds=(0, 1)):
    rows = []
    for s in seeds:
        for path, accs, ps in (("small", small, [99.99, 99.98, 99.97]), ("large", large, [99.99, 99.9, 99.0])):
            rows += [{"seed": s, "path": path, "setting": f"percentile {p:g}", "percentile": p, "bits": 4,
                      "clip": 5.0 - i, "sqnr_db": 20.0, "accuracy": a, "max_abs": 6.0}
                     for i, (p, a) in enumerate(zip(ps, accs))]
    return rows


@pytest.mark.parametrize("small, large, verdict", [
    ([0.60, 0.60, 0.60], [0.60, 0.50, 0.30], "agrees"),          # small steps nothing, larger steps a lot
    ([0.60, 0.40, 0.60], [0.60, 0.50, 0.30], "disagrees"),       # small steps already change it
    ([0.60, 0.60, 0.60], [0.60, 0.60, 0.601], "inconclusive"),   # nothing changes anything
])
def test_layernorm_record_verdicts(small, large, verdict):
    record = hard.layernorm_record(_ln_rows(small, large), 10000)   # binomial noise ~0.5 points
    assert record["verdict"] == verdict
    assert "percentile 99.9: clip 4" in record["measured"]
    assert "vs noise 0.5" in record["note"] or "vs noise 0.49" in record["note"]


def _wd_rows(drops, spreads, seeds=(0,), jitter=0.0):
    return [{"weight_decay": wd, "train_seed": s, "train_seconds": 1.0, "float_accuracy": 0.6,
             "spread_median": sp, "spread_max": 2 * sp, "amax_max": 10.0, "low_bits": 4, "accuracy_8": 0.6,
             "accuracy_low": 0.6 - d - jitter * s, "drop_8": 0.0, "drop_low": d + jitter * s}
            for wd, d, sp in zip((0.0, 1e-3, 1e-2), drops, spreads) for s in seeds]


@pytest.mark.parametrize("drops, spreads, verdict", [
    ((0.20, 0.15, 0.10), (12.0, 10.0, 8.0), "agrees"),           # narrower range, smaller drop
    ((0.20, 0.15, 0.10), (8.0, 10.0, 12.0), "inconclusive"),     # smaller drop but the range widened
    ((0.10, 0.15, 0.20), (12.0, 10.0, 8.0), "disagrees"),        # larger drop
    ((0.20, 0.20, 0.195), (12.0, 10.0, 8.0), "inconclusive"),    # inside the binomial noise (1.5 points)
])
def test_weight_decay_record_verdicts(drops, spreads, verdict):
    record = hard.weight_decay_record(_wd_rows(drops, spreads), 1000)
    assert record["verdict"] == verdict and record["id"] == "wide_range_weight_decay"
    assert f"4-bit {100 * drops[0]:+.2f} points" in record["measured"]


def test_weight_decay_noise_is_the_spread_over_training_seeds():
    rows = _wd_rows((0.20, 0.15, 0.10), (12.0, 10.0, 8.0), seeds=(0, 1), jitter=0.15)   # drops differ by 15 points
    record = hard.weight_decay_record(rows, 1000)
    assert record["verdict"] == "inconclusive" and "noise 15.00" in record["note"]


def test_train_small_model_trains_the_layernorm_model_with_the_one_loop():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(300) % 10
    data = ImageTensors(images, labels, images[:100], labels[:100], [str(i) for i in range(10)])
    model, seconds = hard.train_small_model(data, None, 0, 256, 1, layer_norm=True, amp=False)
    assert isinstance(model, hard.LayerNormResNet) and not model.training and seconds > 0
    assert not torch.equal(model.norm.ln.bias, torch.zeros_like(model.norm.ln.bias))   # it was trained
    with pytest.raises(ValueError, match="train_images"):
        hard.train_small_model(data, 0.0, 0, 64, 1)
