"""The guide-check records (calibkit.tutorial.guide_checks) and notebook 02's calibration choice (settings)."""

import json
import math

import pytest
from hypothesis import given, strategies as st

from calibkit.tutorial import guide_checks as gc
from calibkit.tutorial.runner import write_guide_table
from calibkit.tutorial.settings import CHOICE_FILE, CalibrationChoice, find_calibration_choice


def test_twenty_rules_in_the_notebooks_that_measure_them():
    assert len(gc.RULES) == 20
    by_notebook = {}
    for id, (nb, rule) in gc.RULES.items():
        by_notebook.setdefault(nb, []).append(id)
        assert rule.endswith(".") and len(rule) > 30
    assert {nb: len(ids) for nb, ids in by_notebook.items()} == {"02": 7, "03": 3, "04": 6, "05": 2, "06": 2}


def test_guide_check_fills_the_rule_and_rejects_bad_input():
    r = gc.guide_check("flip_ok", "with flips 57.1 %, without 57.0 %", "agrees", "difference 0.1 inside noise 1.6")
    assert list(r) == list(gc.KEYS) and r["rule"] == gc.RULES["flip_ok"][1]
    with pytest.raises(ValueError, match="id='flips'"):
        gc.guide_check("flips", "x", "agrees", "y")
    with pytest.raises(ValueError, match="verdict='agree'"):
        gc.guide_check("flip_ok", "x", "agree", "y")
    with pytest.raises(ValueError, match="measured=''"):
        gc.guide_check("flip_ok", "", "agrees", "y")


@pytest.mark.parametrize("difference, noise, expect, verdict", [
    (0.02, 0.01, "positive", "agrees"), (-0.02, 0.01, "positive", "disagrees"), (0.005, 0.01, "positive", "inconclusive"),
    (0.01, 0.01, "positive", "inconclusive"),  # on the edge: inside
    (-0.02, 0.01, "negative", "agrees"), (0.02, 0.01, "negative", "disagrees"),
    (0.005, 0.01, "none", "agrees"), (0.02, 0.01, "none", "disagrees"), (0.0, 0.0, "none", "agrees"),
])
def test_judge(difference, noise, expect, verdict):
    assert gc.judge(difference, noise, expect) == verdict


def test_judge_rejects_bad_input():
    with pytest.raises(ValueError, match="expect='up'"):
        gc.judge(1.0, 0.1, "up")
    with pytest.raises(ValueError, match="noise=-0.1"):
        gc.judge(1.0, -0.1)
    with pytest.raises(ValueError, match="difference=nan"):
        gc.judge(math.nan, 0.1)


@given(st.floats(-1, 1), st.floats(0, 1))
def test_judge_is_antisymmetric(difference, noise):
    flip = {"agrees": "disagrees", "disagrees": "agrees", "inconclusive": "inconclusive"}
    assert gc.judge(-difference, noise, "negative") == gc.judge(difference, noise, "positive")
    assert gc.judge(-difference, noise, "positive") == flip[gc.judge(difference, noise, "positive")]


def test_accuracy_noise_is_seed_spread_or_one_binomial_error():
    assert gc.accuracy_noise([0.9], 10_000) == pytest.approx(0.003)           # sqrt(.9 * .1 / 1e4)
    assert gc.accuracy_noise([0.90, 0.92], 10_000) == pytest.approx(0.02)      # the spread is larger
    assert gc.accuracy_noise([0.5, 0.5], 100) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="num_images=0"):
        gc.accuracy_noise([0.5], 0)
    with pytest.raises(ValueError, match="empty"):
        gc.accuracy_noise([], 10)


def test_difference_noise_seed_spread_or_binomial():
    # one seed each: the larger binomial error, sqrt(.25 / 100) at 0.5
    assert gc.difference_noise([0.6], [0.5], 100) == pytest.approx(0.05)
    # two seeds: the spread of the paired difference (0.2) beats the binomial part
    assert gc.difference_noise([0.6, 0.7], [0.7, 0.6], 10 ** 6) == pytest.approx(0.2)
    # unpaired (different lengths): the larger spread of either
    assert gc.difference_noise([0.6, 0.64], [0.5], 10 ** 6) == pytest.approx(0.04)
    # b measured on 400 images: its binomial error is half of a's on 100
    assert gc.difference_noise([0.5], [0.5], 100, 400) == pytest.approx(0.05)
    assert gc.difference_noise([0.5], [0.5], 400, 100) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="empty"):
        gc.difference_noise([], [0.5], 100)


def test_combine_verdicts_and_describe():
    assert gc.combine_verdicts(["agrees", "agrees"]) == "agrees"
    assert gc.combine_verdicts(["agrees", "inconclusive"]) == "inconclusive"
    assert gc.combine_verdicts(["inconclusive", "disagrees", "agrees"]) == "disagrees"
    with pytest.raises(ValueError, match="verdicts="):
        gc.combine_verdicts(["agree"])
    text = gc.describe(gc.guide_check("no_mosaic", "plain 61 %, mosaic 43 %", "agrees", "18 points, noise 2"))
    assert "no_mosaic" in text and "AGREES" in text and "plain 61 %" in text and "noise 2" in text


def _records(nb):
    return [gc.guide_check(i, "1 vs 2", "inconclusive", "noise") for i, (n, _) in gc.RULES.items() if n == nb]


def test_check_records_finds_missing_extra_and_malformed():
    good = _records("06")
    assert gc.check_records(good, "06") == []
    assert "ids" in gc.check_records(good[:1], "06")[0]
    bad = [dict(good[0], verdict="maybe"), {k: v for k, v in good[1].items() if k != "note"}]
    problems = " ".join(gc.check_records(bad, "06"))
    assert "maybe" in problems and "keys" in problems


def test_collect_and_runner_table(tmp_path):
    for nb, stem in (("02", "02_calibration_workflow"), ("06", "06_qat_fixed_scales")):
        (tmp_path / stem).mkdir()
        (tmp_path / stem / "metrics.json").write_text(json.dumps({"guide_checks": _records(nb)}))
    (tmp_path / "03_calibration_methods").mkdir()
    (tmp_path / "03_calibration_methods" / "metrics.json").write_text("{not json")   # unreadable: skipped
    rows = write_guide_table(tmp_path)
    assert [r["id"] for r in rows] == list(gc.RULES)
    assert gc.verdict_table(rows) == {"agrees": 0, "disagrees": 0, "inconclusive": 9, "not run": 11}
    assert (tmp_path / "guide_checks.csv").read_text().count("\n") == 21


def test_calibration_choice_round_trip_and_lookup(tmp_path):
    nb02, nb03 = tmp_path / "02_calibration_workflow", tmp_path / "03_calibration_methods"
    assert find_calibration_choice(nb03) is None                   # 02 has not run: the caller says so
    nb02.mkdir()
    CalibrationChoice(64, 0.5, 16, 0.61).save(nb02 / CHOICE_FILE)
    choice = find_calibration_choice(nb03)
    assert (choice.batch_size, choice.averaging_constant, choice.steps, choice.accuracy) == (64, 0.5, 16, 0.61)
    assert choice.source.endswith(CHOICE_FILE)
    with pytest.raises(FileNotFoundError, match="calibration_choice="):
        find_calibration_choice(nb03, tmp_path / "missing.json")
    (nb02 / CHOICE_FILE).write_text('{"batch_size": 64}')
    with pytest.raises(ValueError, match="re-run notebook 02"):
        find_calibration_choice(nb03)
    with pytest.raises(ValueError, match="averaging_constant=1.5"):
        CalibrationChoice(64, 1.5, 16, 0.61)
    with pytest.raises(ValueError, match="batch_size=0"):
        CalibrationChoice(0, 0.5, 16, 0.61)
