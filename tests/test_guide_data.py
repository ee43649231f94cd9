"""Notebook 02's guide experiments: the calibration sets (calibkit.tutorial.data_sets), the experiments and their
verdicts (calibkit.tutorial.data_rules), on synthetic rows with known answers and a tiny model on synthetic images."""

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from calibkit.cifar.data import ImageTensors, normalize
from calibkit.cifar.models import cifar_resnet
from calibkit.quant.fake_quantize import named_quantizers
from calibkit.tutorial import data_rules as R, data_sets as D
from calibkit.tutorial.guide_checks import check_records
from calibkit.tutorial.workflow import MinMaxTrace, steps_curve

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (256, 3, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (256,), generator=g)
    return ImageTensors(x, y, x[:64].clone(), y[:64].clone(), [str(i) for i in range(10)])


@pytest.fixture(scope="module")
def tiny(data):
    torch.manual_seed(0)
    model = cifar_resnet(width=(8, 8, 8), stem_width=8).eval()
    images = normalize(data.test_images)
    with torch.no_grad():
        labels = model(images).argmax(1)  # 100 % "accurate" in float
    return model, images, labels


# -- calibration sets -----------------------------------------------------------------------------------------
def test_to_uint8_undoes_normalize(data):
    assert torch.equal(D.to_uint8(normalize(data.train_images)), data.train_images)


def test_mosaic_tiles_four_half_size_images():
    four = torch.stack([torch.full((3, 8, 8), v, dtype=torch.uint8) for v in (10, 20, 30, 40)])
    m = D.mosaic(four)
    assert m.shape == (1, 3, 8, 8) and m.dtype == torch.uint8
    assert m[0, :, :4, :4].unique().tolist() == [10] and m[0, :, :4, 4:].unique().tolist() == [20]
    assert m[0, :, 4:, :4].unique().tolist() == [30] and m[0, :, 4:, 4:].unique().tolist() == [40]
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (8, 3, 16, 16), generator=g, dtype=torch.uint8)
    m = D.mosaic(imgs)
    assert torch.equal(m[1, :, 8:, 8:], TF.resize(imgs[7:8], [8, 8], antialias=True)[0])
    with pytest.raises(ValueError, match="multiple of 4"):
        D.mosaic(imgs[:6])


def test_standard_augmented_and_mosaic_batches(data):
    flips, plain = D.standard_batches(data)(2, 8, 3), D.standard_batches(data, flip=False)(2, 8, 3)
    for f, p in zip(flips, plain):  # the same images, some mirrored
        same = [torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(f, p)]
        assert all(same)
    shifted = D.augmented_batches(data, translate=0)(2, 8, 3)  # no shift: images or their mirror images
    assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for s, p in zip(shifted, plain) for a, b in zip(s, p))
    aug = D.augmented_batches(data, translate=2)
    assert all(torch.equal(a, b) for a, b in zip(aug(2, 8, 3), aug(2, 8, 3)))  # seeded
    mos = D.mosaic_batches(data)(2, 8, 3)
    assert [tuple(b.shape) for b in mos] == [(8, 3, 16, 16)] * 2
    with pytest.raises(ValueError, match="translate"):
        D.augmented_batches(data, translate=-1)


def test_corrupt_is_seeded_and_does_what_it_says(data):
    x = data.train_images[:200]
    assert torch.equal(D.corrupt(x, torch.Generator().manual_seed(0), 0.0, 0.5, 0.0), x)
    assert torch.equal(D.corrupt(x, torch.Generator().manual_seed(0), 1.0, 0.0, 0.0), x)  # zero-std noise
    out = D.corrupt(x, torch.Generator().manual_seed(0), 0.0, 0.0, 1.0)
    assert set(out.unique().tolist()) == {0, 255}
    a = D.corrupt(x, torch.Generator().manual_seed(5), 0.3, 0.2, 0.1)
    assert torch.equal(a, D.corrupt(x, torch.Generator().manual_seed(5), 0.3, 0.2, 0.1))
    changed = (a != x).flatten(1).any(1).float().mean().item()
    assert 0.25 < changed < 0.55  # 30 % noisy + 10 % outliers of 200 images
    for kw, name in ((dict(noise_fraction=1.5), "noise_fraction"), (dict(noise_std=-1.0), "noise_std"),
                     (dict(noise_fraction=0.5, outlier_fraction=0.6), "outlier_fraction")):
        with pytest.raises(ValueError, match=name):
            D.noisy_batches(data, **kw)
    noisy = D.noisy_batches(data, 0.5, 0.2, 0.0)
    assert all(torch.equal(p, q) for p, q in zip(noisy(2, 8, 1), noisy(2, 8, 1)))


# -- noise and verdicts on synthetic rows ------------------------------------------------------------------------
def _constant_rows(few_gap, many_gap):
    rows = []
    for seed in (0, 1):
        for st, gap in ((2, few_gap), (16, 0.0), (128, many_gap)):
            for c in (0.01, 0.1, 0.5):
                acc = 0.8 + (gap if c == 0.5 else 0.0) + 0.001 * seed
                rows.append({"seed": seed, "steps": st, "averaging_constant": c, "activation_bits": 6, "accuracy": acc})
    return rows


def test_averaging_constant_record_verdicts():
    rec = R.averaging_constant_record(_constant_rows(0.05, -0.05), 10000)
    assert rec["verdict"] == "agrees" and "2 steps: best c 0.5" in rec["measured"] and "128 steps: best c 0.01" in rec["measured"]
    assert R.averaging_constant_record(_constant_rows(-0.05, -0.05), 10000)["verdict"] == "disagrees"
    assert R.averaging_constant_record(_constant_rows(0.05, 0.0), 10000)["verdict"] == "inconclusive"
    with pytest.raises(ValueError, match="large=0.3"):
        R.averaging_constant_record(_constant_rows(0.05, 0.0), 10000, large=0.3)


def _curve(accs):
    return [{"activation_bits": 8, "seed": 0, "steps": s, "accuracy": a} for s, a in accs.items()]


def test_data_amount_record_finds_where_the_gain_stops():
    steps = [1, 2, 4, 8, 16, 32, 64, 128]
    rising = dict(zip(steps, [0.5, 0.6, 0.7, 0.75, 0.8, 0.8, 0.801, 0.8]))
    rec = R.data_amount_record(_curve(rising), 10000)
    assert rec["verdict"] == "agrees" and "the gain stops at 16 steps" in rec["measured"]
    early = dict(zip(steps, [0.5, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]))
    rec = R.data_amount_record(_curve(early), 10000)
    assert rec["verdict"] == "disagrees" and "stops at 2 steps" in rec["measured"]
    assert R.data_amount_record(_curve({s: 0.8 for s in steps}), 10000)["verdict"] == "inconclusive"


def _set_rows(accs, batch_sizes=(64,)):
    return [{"set": s, "batch_size": bs, "seed": seed, "steps": 8, "images": 8 * bs, "activation_bits": 6,
             "accuracy": a[i] + 0.001 * seed, "log2_amax": 1.0 + (s != "flips")}
            for s, a in accs.items() for i, bs in enumerate(batch_sizes) for seed in (0, 1)]


def test_set_rules_and_batch_size_records():
    recs = R.set_rules_records(_set_rows({"flips": [0.8], "no flips": [0.8], "mosaic": [0.7],
                                          "training augmentation": [0.9]}), 10000)
    assert [r["verdict"] for r in recs] == ["agrees", "agrees", "disagrees"]
    assert "x2.000" in recs[1]["measured"]
    assert check_records(recs + [R.data_amount_record(_curve({1: 0.5, 2: 0.5}), 100),
                                 R.averaging_constant_record(_constant_rows(0, 0), 100),
                                 R.batch_size_record(_set_rows({"clean": [0.7, 0.8], "noisy": [0.6, 0.5]}, (16, 64)), 10000),
                                 R.fake_quant_record([{"name": "a", "kind": "activation", "scale": 1.0,
                                                       "rel_left_on": 0.0, "rel_applied": 0.0}])], "02") == []
    rec = R.batch_size_record(_set_rows({"clean": [0.7, 0.8], "noisy": [0.6, 0.5]}, (16, 64)), 10000)
    assert rec["verdict"] == "agrees" and "small - large +10.00 pts" in rec["measured"]
    rec = R.batch_size_record(_set_rows({"clean": [0.7, 0.8], "noisy": [0.5, 0.6]}, (16, 64)), 10000)
    assert rec["verdict"] == "disagrees"


def test_fake_quant_record():
    rows = [{"name": "x", "kind": "activation", "scale": 1.0, "rel_left_on": 0.0, "rel_applied": v} for v in (0.0, 5e-7)]
    assert R.fake_quant_record(rows)["verdict"] == "agrees"
    rows[1]["rel_applied"] = 0.01
    rec = R.fake_quant_record(rows)
    assert rec["verdict"] == "disagrees" and "1 quantizers beyond" in rec["measured"]


# -- the experiments on a tiny model -------------------------------------------------------------------------------
def test_fake_quant_rows_on_a_model(tiny, data):
    model, _, _ = tiny
    batches = D.standard_batches(data)(3, 16, 0)
    rows = R.fake_quant_rows(model, batches, 0.1)
    assert len(rows) == len(named_quantizers(MinMaxTrace.record(model, batches[:1]).prepared))
    assert all(r["rel_left_on"] == 0.0 for r in rows)  # calibrate() turns rounding off itself
    by = {r["name"]: r for r in rows}
    assert by["input"]["rel_applied"] == 0.0  # sees the same float images either way
    assert all(r["rel_applied"] == 0.0 for r in rows if r["kind"] == "weight")
    assert max(r["rel_applied"] for r in rows) > 1e-4  # downstream observers see rounded tensors
    assert R.fake_quant_record(rows)["verdict"] == "disagrees"


def test_calibration_set_rows_and_averaging_constant_rows(tiny, data):
    model, images, labels = tiny
    sets = {"flips": D.standard_batches(data), "again": D.standard_batches(data)}
    rows = R.calibration_set_rows(model, sets, images, labels, [8, 16], 4, 0.1, [0, 1], [8, 4])
    assert len(rows) == 2 * 2 * 2 * 2 and all(0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["log2_amax"]) for r in rows)
    key = lambda r: (r["batch_size"], r["seed"], r["activation_bits"])
    assert sorted((key(r), r["accuracy"]) for r in rows if r["set"] == "flips") == \
        sorted((key(r), r["accuracy"]) for r in rows if r["set"] == "again")  # the same set gives the same rows
    traces = R.record_traces(model, data, 8, 16, [0])
    known = [{"seed": 0, "steps": 2, "averaging_constant": 0.5, "activation_bits": 8, "accuracy": 0.123}]
    crows = R.averaging_constant_rows(traces, images, labels, [0.01, 0.5], [2, 16], [8], known=known)
    assert len(crows) == 4 and [r["accuracy"] for r in crows if r["steps"] == 2 and r["averaging_constant"] == 0.5] == [0.123]
    with pytest.raises(ValueError, match="seeds"):
        R.record_traces(model, data, 8, 4, [-1])


def test_steps_curve_reuses_traces(tiny, data):
    model, images, labels = tiny
    traces = R.record_traces(model, data, 8, 8, [0, 1])
    kw = dict(batch_size=8, averaging_constant=0.1, steps=[1, 4, 8], activation_bits=[8, 4], seeds=[0, 1])
    fresh = steps_curve(model, data, images, labels, **kw)
    reused = steps_curve(model, data, images, labels, traces=traces, **kw)
    assert [r["accuracy"] for r in fresh] == [r["accuracy"] for r in reused]
    with pytest.raises(ValueError, match="batch size 8"):
        steps_curve(model, data, images, labels, traces=traces, **{**kw, "batch_size": 16})
    with pytest.raises(ValueError, match="weight_bits=4"):
        steps_curve(model, data, images, labels, traces=traces, weight_bits=4, **kw)
    with pytest.raises(ValueError, match="no recording for seed 2"):
        steps_curve(model, data, images, labels, traces=traces, **{**kw, "seeds": [2]})
