"""Notebook 04's guide checks (calibkit.tutorial.method_rules): the noise rule, the verdicts from hand-made numbers,
the weight-observer cross against fresh calibrations, and the hooks added to compare_methods / ease_of_use."""

import math

import pytest
import torch

from calibkit.quant.qconfig import get_default_qconfig
from calibkit.tutorial.comparison import SPEC_RANKS, compare_methods, ease_of_use
from calibkit.tutorial.guide_checks import KEYS, describe
from calibkit.tutorial.method_rules import (GUIDE_TUNING_PATH, KeepCalibrated, bins_check, calibrated_accuracies,
                                            ceiling_check,
                                            combination_table, default_check,
                                            mix_check, percentile_points, rank_check, setting_by_name,
                                            tuning_gain_check, tuning_side_by_side, weight_combinations)
from calibkit.tutorial.settings import SETTINGS
from calibkit.tutorial.workflow import calibrate_and_evaluate


pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny model gains nothing from intra-op threads


@pytest.fixture(scope="module")
def tiny(tiny_classifier):
    model, images, labels = tiny_classifier(64)
    calib = {s: [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(10 + s)) * 1.5 for _ in range(2)]
             for s in (0, 1)}
    return model, images, labels, calib


def test_tuning_side_by_side_and_guide_path():
    assert len(GUIDE_TUNING_PATH) == 8 and GUIDE_TUNING_PATH[-1]["accuracy"] - GUIDE_TUNING_PATH[0]["accuracy"] == \
        pytest.approx(9.4)
    path = [{"step": 1, "percentile": 99.99, "bins": 2048, "accuracy": 0.5, "accepted": True, "move": "start"}]
    rows = tuning_side_by_side(path)
    assert len(rows) == 8 and rows[0]["kit accuracy (%)"] == 50.0 and rows[1]["kit percentile"] is None
    assert [r["guide bins"] for r in rows] == [r["bins"] for r in GUIDE_TUNING_PATH]


def _evaluator(table):
    """A stand-in for percentile_evaluator: accuracy from ``table[(percentile, bins)]``."""
    def fn(p, b, images=None, labels=None):
        return table[(p, b)]
    return fn


def test_percentile_checks_from_hand_made_numbers():
    tuned = (99.995, 2048)
    base = {(99.99, 2048): 0.50, tuned: 0.70, (99.995, 1024): 0.40, (99.995, 4096): 0.703, (99.995, 8192): 0.70}
    labels = torch.zeros(10000)
    rows = percentile_points({0: _evaluator(base), 1: _evaluator({k: v + 0.01 for k, v in base.items()})},
                             [(99.99, 2048), tuned, *[(99.995, b) for b in (1024, 2048, 4096, 8192)]], None, labels)
    assert len(rows) == 2 * 5 and rows[0]["images"] == 10000  # the duplicate tuned point is evaluated once
    path = [{"percentile": 99.99, "bins": 2048, "accuracy": 0.5}, {"percentile": 99.995, "bins": 2048, "accuracy": 0.72}]
    gain = tuning_gain_check(path, rows, tuned)
    assert gain["verdict"] == "agrees" and "+20.00 points" in gain["measured"] and tuple(sorted(gain)) == tuple(sorted(KEYS))
    bins = bins_check(rows, 99.995, [1024, 2048, 4096, 8192])
    assert bins["verdict"] == "agrees", bins  # +0.3 points at 4096: inside the noise (one binomial error, ~0.46 points)
    others = [{"seed": s, "method": m, "accuracy": a + 0.01 * s, "images": 10000}
              for m, a in (("mse", 0.70), ("kl", 0.60), ("mix", 0.5)) for s in (0, 1)]
    ceiling = ceiling_check(rows, tuned, others, "a6/w8-ch")
    assert ceiling["verdict"] == "inconclusive" and "best other (mse)" in ceiling["note"]  # a tie vs noise ~0.46
    for r in others[:2]:
        r["accuracy"] -= 0.1
    assert ceiling_check(rows, tuned, others, "a6/w8-ch")["verdict"] == "agrees"
    with pytest.raises(ValueError, match="same"):
        ceiling_check(rows, tuned, [{**others[0], "images": 300}], "a6/w8-ch")
    # more bins gaining 10 points breaks the rule; a lost tuning gain beyond the noise disagrees
    better = percentile_points({0: _evaluator({**base, (99.995, 4096): 0.8})}, [tuned, (99.995, 4096)], None, labels)
    assert bins_check(better, 99.995, [2048, 4096])["verdict"] == "disagrees"
    worse = percentile_points({0: _evaluator({**base, tuned: 0.3})}, [(99.99, 2048), tuned], None, labels)
    assert tuning_gain_check(path, worse, tuned)["verdict"] == "disagrees"
    with pytest.raises(ValueError, match="no accuracy"):
        bins_check(rows, 99.9, [2048, 4096])


def test_mix_and_default_and_rank_checks():
    ease = [{"method": m, "accuracy": a} for m, accs in
            {"mix": (0.60, 0.61), "min_max": (0.6, 0.6), "mse": (0.5, 0.7), "percentile": (0.2, 0.6), "kl": (0.4, 0.6)}
            .items() for a in accs]
    runs = [{"method": m, "setting": "a6", "accuracy": 0.6} for m in ("mix", "mse")]
    mix = mix_check(ease, runs, "a6", 10000)
    assert mix["verdict"] == "agrees" and "(mse)" in mix["note"]  # 20 - 1 points >> noise 0.7
    assert mix_check(ease, runs, "a6", 10)["verdict"] == "inconclusive"  # binomial noise on 10 images: 22 points
    rows = [{"setting": "s", "seed": 0, "activation": a, "weights": w, "accuracy": acc}
            for (a, w), acc in {("mse", "min_max"): 0.60, ("min_max", "min_max"): 0.59, ("mse", "mse"): 0.603}.items()]
    assert default_check(rows, 10000)["verdict"] == "agrees"  # +0.3 points < noise ~0.49 (one binomial error)
    rows[2]["accuracy"] = 0.65
    assert default_check(rows, 10000)["verdict"] == "disagrees"
    assert {r["activation"]: r["mse weights (%)"] for r in combination_table(rows) if "mse weights (%)" in r} == \
        {"mse": 65.0}
    same = {m: {f"rank_{c}": SPEC_RANKS[c][m] for c in SPEC_RANKS} for m in SPEC_RANKS["speed"]}
    for m in same:
        same[m].update(speed_seconds=SPEC_RANKS["speed"][m], accuracy=-SPEC_RANKS["accuracy"][m],
                       ease_range=SPEC_RANKS["ease"][m], speed_noise=0.0, accuracy_noise=0.0, ease_noise=0.0)
    assert rank_check(same)["verdict"] == "agrees"
    reverse = {m: {**v, "rank_speed": 6 - v["rank_speed"]} for m, v in same.items()}
    rec = rank_check(reverse)
    assert rec["verdict"] == "disagrees" and "speed -1.00" in rec["measured"] and "speed disagrees" in rec["note"]
    assert "DISAGREES" in describe(rec)


def test_weight_combinations_equal_fresh_calibration(tiny):
    """Loading another weight observer's scales into a calibrated model = calibrating with that observer."""
    model, images, labels, calib = tiny
    settings = [setting_by_name("a8/w4-ch"), SETTINGS[2]]
    methods, observers = ["mse", "min_max"], ["min_max", "mse", "percentile"]
    keep = KeepCalibrated(["a6/w8-ch"])
    runs = compare_methods(model, calib, images, labels, methods=methods, settings=[SETTINGS[2]],
                           method_params={m: {"averaging_constant": 0.5} for m in methods}, on_run=keep)
    assert set(keep.models) == {("a6/w8-ch", s, m) for s in (0, 1) for m in methods}
    assert all(acc == next(r["accuracy"] for r in runs if (r["setting"], r["seed"], r["method"]) == k)
               for k, (_, acc) in keep.models.items())
    again = calibrated_accuracies(keep.models, "a6/w8-ch", ["mse"], images, labels)
    assert [(r["seed"], r["accuracy"]) for r in again] == [
        (r["seed"], r["accuracy"]) for r in runs if r["method"] == "mse"]
    rows = weight_combinations(model, calib, images, labels, settings, methods, observers, 0.5, calibrated=keep.models)
    assert len(rows) == 2 * 2 * 2 * 3
    fresh = weight_combinations(model, calib, images, labels, settings, methods, observers, 0.5)
    assert rows == fresh  # reusing compare_methods' models changes nothing
    for r in rows:
        if r["seed"] == 1:
            continue
        s = setting_by_name(r["setting"])
        qc = get_default_qconfig(r["activation"], r["weights"], {"averaging_constant": 0.5},
                                 activation_bits=s.activation_bits, weight_bits=s.weight_bits)
        assert r["accuracy"] == calibrate_and_evaluate(model, qc, calib[0], images, labels)["accuracy"], r
    assert len({r["accuracy"] for r in rows if r["setting"] == "a8/w4-ch"}) > 1, "4-bit weights must separate"
    with pytest.raises(ValueError, match="per-channel"):
        weight_combinations(model, calib, images, labels, settings, methods, ["min_max", "kl"])
    with pytest.raises(ValueError, match="unknown"):
        setting_by_name("a3/w3")


def test_ease_of_use_averaging_constant(tiny):
    model, images, labels, calib = tiny
    grids = {"mse": [{"stride": 5}], "percentile": [{"percentile": 99.0, "bins": 2048}]}
    def accs(rows):
        return [(r["params"], r["accuracy"]) for r in rows]

    default = ease_of_use(model, calib[0], images, labels, grids=grids)
    assert accs(default) == accs(ease_of_use(model, calib[0], images, labels, grids=grids, averaging_constant=0.01))
    half = ease_of_use(model, calib[0], images, labels, grids=grids, averaging_constant=0.5)
    for r in half:
        params = {k: r[k] for k in grids[r["method"]][0]}
        qc = SETTINGS[2].qconfig(r["method"], averaging_constant=0.5, **params)
        assert r["accuracy"] == calibrate_and_evaluate(model, qc, calib[0], images, labels)["accuracy"]
    with pytest.raises(ValueError, match="averaging_constant"):
        ease_of_use(model, calib[0], images, labels, grids=grids, averaging_constant=2.0)


def test_sizes_reuse_compare_methods_settings():
    """The cross runs only at settings compare_methods calibrates (so nothing is calibrated twice), with weight
    observers that have a per-channel mode, and bins around the guide's 2048."""
    from calibkit.quant.observers import get_observer_class
    from calibkit.tutorial.method_rules import SIZES

    assert set(SIZES) == {"full", "smoke"}
    for size in SIZES.values():
        assert set(size["combination_settings"]) <= {s.name for s in SETTINGS}
        assert size["weight_observers"][0] == "min_max" and "mse" in size["weight_observers"]
        assert all(get_observer_class(w).supports_per_channel for w in size["weight_observers"])
        assert 2048 in size["bins"] and max(size["bins"]) >= 16384 and min(size["bins"]) <= 1024
