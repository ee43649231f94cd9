"""Notebook 06's guide checks (calibkit.tutorial.qat_rules): the fixed / free QAT grid, the uncalibrated start, and
the records their verdicts come from."""

import math

import pytest
import torch
from torch import nn

from calibkit.quant import qat
from calibkit.quant.fake_quantize import named_quantizers
from calibkit.quant.numerics import scale_from_amax
from calibkit.tutorial import guide_checks
from calibkit.tutorial.qat_rules import (SIZES, QatBench, calibration_helps_record, calibration_helps_summary,
                                         fixed_free_record, fixed_free_rows, fixed_free_summary, uncalibrated_rows)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    """4 classes told apart by per-channel mean offsets of 3 x 8 x 8 noise, a small conv net trained on nothing
    (QAT only has to run), 2 QAT steps of 32 per run."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 3, 1, 1, generator=g)
    y = torch.randint(0, 4, (256,), generator=g)
    x = torch.randn(256, 3, 8, 8, generator=g) + mu[y]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    return QatBench(model, x, y, x[:128], y[:128], (x[:2],), steps=2, batch_size=32, lr=0.05, averaging_constant=0.5)


def _sets(bench):
    x = bench.train_images
    return {0: [x[:64], x[64:128]], 1: [x[128:192], x[192:]]}


def test_grid_rows_cover_every_run_and_repeat_exactly(bench):
    rows = fixed_free_rows(bench, {"well": "mse", "poor": "min_max"}, _sets(bench), bits=(8, 4), progress=False)
    assert len(rows) == 2 * 2 * 2 * 2
    assert {(r["bits"], r["seed"], r["start"], r["mode"]) for r in rows} == {
        (b, s, st, m) for b in (8, 4) for s in (0, 1) for st in ("well", "poor") for m in ("fixed", "free")}
    for r in rows:
        assert 0 <= r["ptq"] <= 1 and 0 <= r["qat"] <= 1 and r["steps"] == 2 and r["seconds"] > 0
        assert r["averaging_constant"] == 0.5
    # fixed and free start from the same calibrated model (one calibration per start, seed and width) ...
    by = {(r["bits"], r["seed"], r["start"], r["mode"]): r for r in rows}
    assert all(by[k[:3] + ("fixed",)]["ptq"] == by[k[:3] + ("free",)]["ptq"] for k in by)
    # ... and the same seeds give the same numbers
    again = fixed_free_rows(bench, {"poor": "min_max"}, {1: _sets(bench)[1]}, bits=(4,), progress=False)
    assert [(r["ptq"], r["qat"]) for r in again] == [(by[(4, 1, "poor", m)]["ptq"], by[(4, 1, "poor", m)]["qat"])
                                                    for m in ("fixed", "free")]


def test_train_leaves_the_calibrated_start_alone_and_fixed_keeps_its_scales(bench):
    m, _ = bench.calibrated("min_max", 4, _sets(bench)[0])
    before = {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    bench.train(m, True, 0)
    bench.train(m, False, 0)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_uncalibrated_start_takes_its_scales_from_the_first_training_batch(bench):
    first = bench.first_batch(3, 32)
    idx = torch.randperm(256, generator=torch.Generator().manual_seed(3))[:32]
    assert torch.equal(first, bench.train_images[idx])      # train_qat's first draw with seed 3 (no preprocess here)
    m, _ = bench.calibrated("min_max", 8, [first])
    scale = named_quantizers(m)["input"].scale
    assert torch.equal(scale, scale_from_amax(first.abs().max(), 8))     # min_max of that one batch
    rows = uncalibrated_rows(bench, "min_max", seeds=(0, 1), bits=(4,), images=32, progress=False)
    assert [(r["start"], r["mode"], r["bits"], r["seed"]) for r in rows] == [("uncalibrated", "free", 4, 0),
                                                                            ("uncalibrated", "free", 4, 1)]
    with pytest.raises(ValueError, match="images"):
        uncalibrated_rows(bench, "min_max", seeds=(0,), images=0, progress=False)


def test_bad_inputs_name_the_parameter(bench):
    x, y = bench.train_images, bench.train_labels
    with pytest.raises(ValueError, match="steps"):
        QatBench(bench.model, x, y, x, y, (x[:2],), steps=0)
    with pytest.raises(ValueError, match="batch_size"):
        QatBench(bench.model, x, y, x, y, (x[:2],), steps=1, batch_size=1000)
    with pytest.raises(ValueError, match="averaging_constant"):
        QatBench(bench.model, x, y, x, y, (x[:2],), steps=1, averaging_constant=2.0)
    with pytest.raises(ValueError, match="train_images"):
        QatBench(bench.model, x, y[:10], x, y, (x[:2],), steps=1)
    with pytest.raises(ValueError, match="bits"):
        fixed_free_rows(bench, {"well": "mse"}, _sets(bench), bits=(1,), progress=False)
    with pytest.raises(ValueError, match="starts"):
        fixed_free_rows(bench, {}, _sets(bench), progress=False)


def _rows(well_fixed, well_free, poor_fixed, poor_free, well_ptq=0.89, poor_ptq=0.60, bits=8):
    """Hand-made grid rows: two seeds, QAT accuracies given per seed."""
    rows = []
    for start, ptq, fixed, free in (("well", well_ptq, well_fixed, well_free), ("poor", poor_ptq, poor_fixed, poor_free)):
        for seed in (0, 1):
            for mode, acc in (("fixed", fixed[seed]), ("free", free[seed])):
                rows.append(dict(start=start, observer="mse" if start == "well" else "min_max", bits=bits, seed=seed,
                                 mode=mode, ptq=ptq, qat=acc, steps=24, averaging_constant=0.01, seconds=1.0))
    return rows


def test_fixed_free_verdicts_follow_the_kits_classes():
    # float 90 %, chance 10 %: well PTQ 89 % loses 1.25 % of the above-chance accuracy (good, <= 5 %), poor 37.5 %
    rows = _rows((0.895, 0.893), (0.880, 0.878), (0.70, 0.71), (0.73, 0.74))
    summary = fixed_free_summary(rows, 0.9, 0.1, 10000)
    well, poor = summary
    assert (well["rule"], poor["rule"]) == ("good", "poor")
    assert well["gap"] == pytest.approx(0.0125) and poor["gap"] == pytest.approx(0.375)
    assert well["diff"] == pytest.approx(0.015) and poor["diff"] == pytest.approx(-0.03)
    # noise: the spread of the per-seed difference (0 here), at least the binomial standard error of either mean
    assert well["noise"] == pytest.approx(math.sqrt(0.879 * 0.121 / 10000))
    assert (well["verdict"], poor["verdict"]) == ("agrees", "agrees")
    rec = fixed_free_record(rows, 0.9, 0.1, 10000)
    assert guide_checks.check_records([rec, {**rec, "id": "calibration_helps_qat"}], "06") == []
    assert rec["verdict"] == "agrees" and "+1.50 pts" in rec["measured"] and "-3.00 pts" in rec["measured"]
    assert "meant to be" not in rec["note"]
    # fixing helps from the poor start too: the guide is contradicted
    assert fixed_free_record(_rows((0.895, 0.893), (0.880, 0.878), (0.75, 0.76), (0.73, 0.74)),
                             0.9, 0.1, 10000)["verdict"] == "disagrees"
    # a difference inside the seed spread is inconclusive
    noisy = _rows((0.90, 0.87), (0.88, 0.88), (0.70, 0.71), (0.73, 0.74))
    assert fixed_free_summary(noisy, 0.9, 0.1, 10000)[0]["verdict"] == "inconclusive"
    assert fixed_free_record(noisy, 0.9, 0.1, 10000)["verdict"] == "inconclusive"


def test_a_good_start_the_rule_calls_poor_is_expected_to_prefer_free_and_said_so():
    rows = _rows((0.80, 0.80), (0.83, 0.83), (0.70, 0.71), (0.73, 0.74), well_ptq=0.75)   # gap 0.1875: poor
    s = fixed_free_summary(rows, 0.9, 0.1, 10000)[0]
    assert s["rule"] == "poor" and s["expect"] == "negative" and s["verdict"] == "agrees"
    assert "the well start at 8 bits is poor by the rule (meant to be good)" in fixed_free_record(rows, 0.9, 0.1,
                                                                                                  10000)["note"]


def test_calibration_helps_verdict_per_bit_width():
    rows = _rows((0.895, 0.893), (0.880, 0.878), (0.70, 0.71), (0.73, 0.74), bits=4)
    rows += [dict(start="uncalibrated", observer="mse", bits=4, seed=s, mode="free", ptq=0.5, qat=acc, steps=24,
                  averaging_constant=0.01, seconds=1.0) for s, acc in ((0, 0.85), (1, 0.86))]
    (s,) = calibration_helps_summary(rows, 10000)
    assert s["diff"] == pytest.approx(0.879 - 0.855) and s["verdict"] == "agrees"
    assert s["ptq_calibrated"] == pytest.approx(0.89) and s["ptq_uncalibrated"] == pytest.approx(0.5)
    rec = calibration_helps_record(rows, 10000, calibration_images=4096)
    assert rec["id"] == "calibration_helps_qat" and rec["verdict"] == "agrees" and "4 bits agrees" in rec["note"]
    assert "calibration sets of 4096 images" in rec["note"] and "averaging constant 0.01" in rec["note"]
    worse = [{**r, "qat": 0.95} if r["start"] == "uncalibrated" else r for r in rows]
    assert calibration_helps_record(worse, 10000)["verdict"] == "disagrees"
    with pytest.raises(ValueError, match="uncalibrated"):
        calibration_helps_summary(rows[:8], 10000)


def test_sizes_and_figure(bench):
    from calibkit.tutorial.qat_figures import plot_qat_grid

    assert set(SIZES) == {"full", "smoke"} and all(len(s["seeds"]) >= 2 for s in SIZES.values())
    assert all(tuple(s["bits"]) == (8, 4) for s in SIZES.values())
    rows = _rows((0.895, 0.893), (0.880, 0.878), (0.70, 0.71), (0.73, 0.74)) + \
        _rows((0.895, 0.893), (0.880, 0.878), (0.70, 0.71), (0.73, 0.74), bits=4)
    fig = plot_qat_grid(rows, 0.9)
    assert len(fig.axes) == 2 and len(fig.axes[0].patches) == 4
    assert qat.DEFAULT_GAP_THRESHOLD == 0.05
