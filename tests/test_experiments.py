"""Tests of the tutorial experiments (workflow, comparison, tuning), their table writer and the notebook parameter
defaults: ranks, Spearman, the tuning search, the sweeps and the method table."""

import json
import math
import random

import pytest
import torch

from calibkit.tutorial.comparison import (EASE_GRIDS, SPEC_RANKS, agreement, compare_methods, describe_disagreement,
                                         disagreements, ease_of_use, ease_ranges, method_summary, rank, rank_comparison,
                                         spearman)
from calibkit.tutorial.profiles import resolve_parameters
from calibkit.tutorial.settings import METHODS, SETTINGS, QuantSetting, calibration_sets
from calibkit.tutorial.table import Table, save_json, save_rows
from calibkit.tutorial.tuning import exclude_subset, percentile_evaluator, tune_percentile
from calibkit.tutorial.workflow import (MinMaxTrace, calibrate_and_evaluate, choose_min_max, quantizer_table,
                                        steps_curve, sweep_min_max)
from calibkit.quant.fake_quantize import FakeQuantState, named_quantizers, set_fake_quantize
from calibkit.quant.calibrate import calibrate
from calibkit.quant.prepare import prepare

scipy_stats = pytest.importorskip("scipy.stats")


# -- tiny model and data --------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny model gains nothing from intra-op threads


@pytest.fixture(scope="module")
def tiny(tiny_classifier):
    return tiny_classifier(48)


def batches_fn(num_batches, batch_size, seed):
    g = torch.Generator().manual_seed(100 + seed)
    return [torch.randn(batch_size, 3, 16, 16, generator=g) * 1.5 for _ in range(num_batches)]


# -- ranks and Spearman ---------------------------------------------------------------------------------
def test_rank_ties_and_directions():
    acc = [0.9, 0.5, 0.7, 0.7, 0.6]
    assert rank(acc) == [1.0, 5.0, 2.5, 2.5, 4.0]
    assert rank(acc, method="min") == [1.0, 5.0, 2.0, 2.0, 4.0]
    assert rank(acc, method="dense") == [1.0, 4.0, 2.0, 2.0, 3.0]
    times = [3.0, 1.0, 2.0]
    assert rank(times, lower_is_better=True) == [3.0, 1.0, 2.0]
    assert rank(times, lower_is_better=False) == [1.0, 3.0, 2.0]
    assert rank([1.0, 1.0, 1.0]) == [2.0, 2.0, 2.0]
    # the spec's columns are reproduced from values with the matching tie rule
    spec_acc = SPEC_RANKS["accuracy"]
    fake_acc = {"mse": 0.9, "kl": 0.8, "mix": 0.8, "percentile": 0.7, "min_max": 0.6}
    assert dict(zip(fake_acc, rank(list(fake_acc.values()), method="min"))) == spec_acc
    fake_ease = {"min_max": 0.0, "mix": 0.0, "mse": 0.01, "kl": 0.02, "percentile": 0.05}
    assert dict(zip(fake_ease, rank(list(fake_ease.values()), True, "dense"))) == SPEC_RANKS["ease"]
    with pytest.raises(ValueError, match="method="):
        rank([1, 2], method="max")
    with pytest.raises(ValueError, match="NaN"):
        rank([1.0, math.nan])


def test_spearman_matches_scipy():
    rng = random.Random(0)
    for trial in range(40):
        n = rng.randint(3, 9)
        a = [rng.choice([0.1, 0.2, 0.3, 0.4, 0.5]) for _ in range(n)]  # plenty of ties
        b = [rng.random() if trial % 2 else rng.randint(1, 4) for _ in range(n)]
        if len(set(a)) == 1 or len(set(b)) == 1:
            continue
        ref = scipy_stats.spearmanr(a, b)[0]
        assert spearman(a, b) == pytest.approx(ref, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="same length"):
        spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least 2"):
        spearman([1], [1])


# -- tuning search --------------------------------------------------------------------------------------
def nines(p):
    return -math.log10(1 - p / 100)


def unimodal(p, bins, peak=99.9883, best_bins=8192):
    return 0.6 - 2e4 * (p - peak) ** 2 - 0.01 * (math.log2(bins) - math.log2(best_bins)) ** 2


def check_path(rows, calls):
    assert len(rows) == calls  # every evaluated point is in the table
    assert len({(round(r["percentile"], 12), r["bins"]) for r in rows}) == len(rows)  # evaluated once each
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    acc = [r["accuracy"] for r in rows if r["accepted"]]
    assert rows[0]["accepted"] and acc
    assert all(b > a for a, b in zip(acc, acc[1:]))  # accepted path strictly increasing
    best = -math.inf
    for r in rows:  # best_accuracy is the running maximum of the accepted points
        if r["accepted"]:
            best = r["accuracy"]
        assert r["best_accuracy"] == best
        assert 0 < r["percentile"] <= 100 and 2048 <= r["bins"] <= 16384


@pytest.mark.parametrize("kind", ["unimodal", "noisy", "plateau", "bins_only"])
def test_tuning_path_monotone(kind):
    rng = random.Random(3)
    calls = []

    def fn(p, bins):
        calls.append((p, bins))
        if kind == "unimodal":
            return unimodal(p, bins)
        if kind == "noisy":
            return unimodal(p, bins) + rng.gauss(0, 0.02)
        if kind == "plateau":
            return 0.5
        return 0.5 + 0.01 * math.log2(bins)

    rows = tune_percentile(fn, max_evals=25)
    check_path(rows, len(calls))
    assert len(rows) <= 25
    if kind == "plateau":  # nothing improves: start point only accepted; stops after `patience` idle rounds
        assert [r["accepted"] for r in rows] == [True] + [False] * (len(rows) - 1)
        # round 1: p+, p-, bins x2; round 2: p+, p- with the halved step ((p, 4096) was already evaluated)
        assert len(rows) == 1 + 3 + 2
    if kind == "bins_only":
        assert max(r["bins"] for r in rows if r["accepted"]) == 16384


def test_tuning_follows_spec_steps_and_finds_peak():
    rows = tune_percentile(unimodal, start_percentile=99.99, start_bins=2048, max_evals=60)
    # first moves follow the spec's path shape: 99.99 -> 99.995 / 99.985, then bins x2
    assert [round(r["percentile"], 6) for r in rows[:3]] == [99.99, 99.995, 99.985]
    assert rows[3]["bins"] == 4096 or rows[3]["percentile"] != 99.99
    best = max((r for r in rows if r["accepted"]), key=lambda r: r["accuracy"])
    assert best["percentile"] == pytest.approx(99.9883, abs=8e-4)
    assert best["bins"] == 8192
    assert best["accuracy"] > rows[0]["accuracy"]
    # nines space reaches the same neighbourhood
    rows_n = tune_percentile(unimodal, step_space="nines", max_evals=60)
    best_n = max((r for r in rows_n if r["accepted"]), key=lambda r: r["accuracy"])
    assert abs(nines(best_n["percentile"]) - nines(99.9883)) < 0.1


def test_tuning_bad_arguments():
    with pytest.raises(ValueError, match="percentile=100.5"):
        tune_percentile(unimodal, start_percentile=100.5)
    with pytest.raises(ValueError, match="step_space"):
        tune_percentile(unimodal, step_space="log")
    with pytest.raises(ValueError, match="max_bins"):
        tune_percentile(unimodal, start_bins=4096, max_bins=2048)
    with pytest.raises(ValueError, match="finite"):
        tune_percentile(lambda p, b: math.nan)
    with pytest.raises(ValueError, match="percentile_step=inf"):
        tune_percentile(unimodal, percentile_step=math.inf)
    with pytest.raises(ValueError, match="min_gain=-0.1"):
        tune_percentile(unimodal, min_gain=-0.1)
    with pytest.raises(ValueError, match="max_evals=0"):
        tune_percentile(unimodal, max_evals=0)


# -- min_max sweep --------------------------------------------------------------------------------------
def test_minmax_trace_replays_fresh_calibration(tiny):
    model, images, labels = tiny
    batches = batches_fn(5, 8, 0)
    trace = MinMaxTrace.record(model, batches, activation_bits=8)
    assert trace.num_batches == 5 and trace.batch_size == 8 and trace.seconds(2) <= trace.seconds(5)
    for c, steps, bits in [(0.01, 5, 8), (0.5, 2, 6), (1.0, 3, 4), (0.0, 4, 8)]:
        fresh = prepare(model, QuantSetting("x", bits).qconfig("min_max", averaging_constant=c), (batches[0][:2],))
        calibrate(fresh, batches[:steps], progress=False)
        set_fake_quantize(fresh, FakeQuantState.VALIDATION)
        replay = trace.apply(c, steps, bits)
        want = {n: q.scale for n, q in named_quantizers(fresh).items()}
        got = {n: q.scale for n, q in named_quantizers(replay).items()}
        assert want.keys() == got.keys()
        for n in want:
            assert torch.equal(want[n], got[n]), (c, steps, n)
        with torch.no_grad():
            assert torch.equal(fresh(images), replay(images))
    with pytest.raises(ValueError, match="steps=6"):
        trace.amax(0.1, 6)


def test_sweep_and_steps_curve_shapes(tiny):
    model, images, labels = tiny
    rows = sweep_min_max(model, batches_fn, images, labels, batch_sizes=(4, 8), averaging_constants=(0.01, 0.5),
                         steps=(2, 6), activation_bits=(8, 4))
    assert len(rows) == 2 * 2 * 2 * 2
    keys = {"activation_bits", "batch_size", "averaging_constant", "steps", "images", "accuracy", "seconds"}
    for r in rows:
        assert set(r) == keys and 0 <= r["accuracy"] <= 1 and r["seconds"] > 0
        assert r["images"] == r["batch_size"] * r["steps"]
    assert {(r["batch_size"], r["averaging_constant"], r["steps"], r["activation_bits"]) for r in rows} == {
        (b, c, s, k) for b in (4, 8) for c in (0.01, 0.5) for s in (2, 6) for k in (8, 4)}
    choice = choose_min_max(rows, activation_bits=8)
    best = max(r["accuracy"] for r in rows if r["steps"] == 6 and r["activation_bits"] == 8)
    assert choice["steps"] == 6 and choice["accuracy"] == best
    with pytest.raises(ValueError, match="steps=3"):
        choose_min_max(rows, steps=3)
    curve = steps_curve(model, batches_fn, images, labels, batch_size=4, steps=(1, 2, 4), seeds=(0, 1))
    assert [(r["seed"], r["steps"]) for r in curve] == [(0, 1), (0, 2), (0, 4), (1, 1), (1, 2), (1, 4)]
    assert all(0 <= r["accuracy"] <= 1 for r in curve)
    with pytest.raises(ValueError, match="batch_sizes"):
        sweep_min_max(model, batches_fn, images, labels, batch_sizes=(0,))
    with pytest.raises(TypeError, match="data must be"):
        sweep_min_max(model, "data", images, labels)


def test_choose_min_max_ties_and_averaging():
    rows = [{"activation_bits": b, "batch_size": bs, "averaging_constant": c, "steps": 2, "accuracy": acc}
            for b, bs, c, acc in [(8, 32, 0.5, 0.8), (8, 128, 0.5, 0.8), (8, 128, 0.01, 0.7),
                                  (6, 32, 0.5, 0.6), (6, 128, 0.5, 0.6), (6, 128, 0.01, 0.65)]]
    assert choose_min_max(rows) == {"batch_size": 128, "averaging_constant": 0.5, "steps": 2, "accuracy": 0.7}
    assert choose_min_max(rows, activation_bits=6)["averaging_constant"] == 0.01


def test_calibrate_and_evaluate_and_table(tiny):
    model, images, labels = tiny
    res = calibrate_and_evaluate(model, SETTINGS[0].qconfig("min_max"), batches_fn(2, 8, 0), images, labels)
    assert 0.5 < res["accuracy"] <= 1 and res["calib_seconds"] > 0
    table = quantizer_table(res["prepared"])
    assert len(table) == len(named_quantizers(res["prepared"]))
    assert {r["kind"] for r in table} == {"activation", "weight"}
    for r in table:
        assert r["state"] == "VALIDATION" and r["fake_quant"] and not r["observing"] and r["scale"] > 0
        assert r["amax"] == pytest.approx(r["scale"] * 127.5)
        assert r["granularity"] == ("per-channel(axis 0)" if r["kind"] == "weight" else "per-tensor")
    fresh = quantizer_table(prepare(model, SETTINGS[1].qconfig("mse"), (images[:2],)))
    assert all(r["scale"] is None and r["steps"] == 0 and r["granularity"] == "per-tensor" for r in fresh)


# -- method table ---------------------------------------------------------------------------------------
def test_compare_methods_every_method_and_setting(tiny):
    model, images, labels = tiny
    sets = calibration_sets(batches_fn, seeds=(0, 1), num_batches=2, batch_size=4)
    rows = compare_methods(model, sets, images, labels, timing_repeats=2, method_params={"kl": {"bins": 256}})
    assert len(rows) == len(METHODS) * len(SETTINGS) * 2
    assert {(r["method"], r["setting"], r["seed"]) for r in rows} == {
        (m, s.name, seed) for m in METHODS for s in SETTINGS for seed in (0, 1)}
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and math.isfinite(r["calib_seconds"]) and r["calib_seconds"] > 0
        assert len(r["calib_seconds_all"]) == 2
    kl = [r for r in rows if r["method"] == "kl"]
    assert all(r["calib_seconds"] == pytest.approx(sum(r["calib_seconds_all"]) / 2) for r in kl)  # median of 2
    ease = ease_of_use(model, sets[0], images, labels, grids={m: EASE_GRIDS[m][::2][:2] for m in METHODS})
    assert len(ease) == 2 * len(METHODS)
    summary = method_summary(rows, ease)
    assert list(summary) == list(METHODS)
    for m, s in summary.items():
        for k in ("speed_seconds", "accuracy", "ease_range", "speed_noise", "accuracy_noise", "ease_noise"):
            assert math.isfinite(s[k]) and s[k] >= 0
        assert {s["rank_speed"], s["rank_accuracy"], s["rank_ease"]} <= {1.0, 2.0, 3.0, 4.0, 5.0}
        assert s["runs"] == len(SETTINGS) * 2
    side = rank_comparison(summary)
    assert [r["method"] for r in side] == list(METHODS) and side[0]["speed (spec)"] == 1
    assert set(agreement(summary)) == {"speed", "accuracy", "ease"}


def test_ease_grid_rejects_impossible_update_interval(tiny):
    model, images, labels = tiny
    with pytest.raises(ValueError, match="update_interval=4"):
        ease_of_use(model, batches_fn(2, 4, 0), images, labels, grids={"kl": [{"bins": 2048, "update_interval": 4}]})


def hand_rows():
    """A hand-made compare table: 2 methods x 2 settings x 2 seeds."""
    acc = {("a", "s1", 0): 0.80, ("a", "s1", 1): 0.78, ("a", "s2", 0): 0.60, ("a", "s2", 1): 0.64,
           ("b", "s1", 0): 0.79, ("b", "s1", 1): 0.80, ("b", "s2", 0): 0.50, ("b", "s2", 1): 0.50}
    sec = {"a": [1.0, 1.2], "b": [3.0, 3.1]}
    return [{"method": m, "setting": s, "seed": seed, "accuracy": v, "calib_seconds": sec[m][seed],
             "calib_seconds_all": [sec[m][seed]]} for (m, s, seed), v in acc.items()]


def test_ease_summary_and_noise_on_hand_made_table():
    ease_rows = [{"method": "a", "accuracy": x} for x in (0.70, 0.72, 0.65)] + \
                [{"method": "b", "accuracy": x} for x in (0.50, 0.60, 0.58, 0.59)]
    assert ease_ranges(ease_rows) == pytest.approx({"a": 0.07, "b": 0.10})
    with pytest.raises(ValueError, match="empty"):
        ease_ranges([])
    s = method_summary(hand_rows(), ease_rows, ease_setting="s2")
    assert s["a"]["accuracy"] == pytest.approx((0.80 + 0.78 + 0.60 + 0.64) / 4)
    assert s["b"]["accuracy"] == pytest.approx((0.79 + 0.80 + 0.50 + 0.50) / 4)
    assert s["a"]["accuracy_noise"] == pytest.approx((0.02 + 0.04) / 2)  # mean over settings of seed range
    assert s["b"]["accuracy_noise"] == pytest.approx((0.01 + 0.0) / 2)
    assert s["a"]["speed_seconds"] == pytest.approx(1.1) and s["b"]["speed_seconds"] == pytest.approx(3.05)
    assert s["a"]["speed_noise"] == pytest.approx(0.2) and s["b"]["speed_noise"] == pytest.approx(0.1)
    assert s["a"]["ease_noise"] == pytest.approx(0.04) and s["b"]["ease_noise"] == pytest.approx(0.0)
    assert (s["a"]["rank_speed"], s["a"]["rank_accuracy"], s["a"]["rank_ease"]) == (1, 1, 1)
    assert (s["b"]["rank_speed"], s["b"]["rank_accuracy"], s["b"]["rank_ease"]) == (2, 2, 2)
    spec = {"speed": {"a": 2, "b": 1}, "accuracy": {"a": 2, "b": 1}, "ease": {"a": 1, "b": 2}}
    assert agreement(s, spec) == pytest.approx({"speed": -1.0, "accuracy": -1.0, "ease": 1.0})
    dis = {(d["column"], d["method"]): d for d in disagreements(s, spec)}
    assert set(dis) == {("speed", "a"), ("speed", "b"), ("accuracy", "a"), ("accuracy", "b")}
    # accuracy: |0.705 - 0.6475| = 0.0575 > max noise 0.03 -> resolved; speed: 1.95 > 0.2 -> resolved
    assert dis[("accuracy", "a")]["within_noise_of"] == [] and dis[("speed", "b")]["within_noise_of"] == []
    rows = hand_rows()
    for r in rows:  # make the accuracy gap smaller than the seed-to-seed spread
        if r["method"] == "b":
            r["accuracy"] += 0.05
    close = {(d["column"], d["method"]): d for d in disagreements(method_summary(rows, ease_rows, "s2"), spec)}
    assert close[("accuracy", "b")]["within_noise_of"] == ["a"]
    text = describe_disagreement(close[("accuracy", "b")])
    assert "accuracy: b is #2 here vs #1" in text and "within noise of a" in text
    assert "larger than the noise" in describe_disagreement(dis[("speed", "b")])


def test_percentile_evaluator_equals_fresh_calibration(tiny):
    pytest.importorskip("calibkit.analysis.activation_stats")
    model, images, labels = tiny
    calib = batches_fn(3, 8, 0)
    setting = QuantSetting("a4", 4, 8, True)
    fn = percentile_evaluator(model, calib, images, labels, setting=setting, averaging_constant=0.1)
    for p, bins in [(99.99, 2048), (99.0, 4096), (90.0, 16384)]:
        fresh = calibrate_and_evaluate(model, setting.qconfig("percentile", percentile=p, bins=bins,
                                                              averaging_constant=0.1), calib, images, labels)
        assert fn(p, bins) == fresh["accuracy"]
        assert fn(p, bins, images=images[:10], labels=labels[:10]) == pytest.approx(
            float((fresh["prepared"](images[:10]).argmax(1) == labels[:10]).float().mean()))
    assert fn.calls == 6


def test_save_rows_csv_and_json(tmp_path):
    rows = [{"method": "mse", "accuracy": 0.5, "times": [1.0, 2.0]}, {"method": "kl", "accuracy": math.nan}]
    paths = save_rows(rows, tmp_path / "out", "table")
    data = json.loads(paths["json"].read_text())
    assert data[0]["times"] == [1.0, 2.0] and data[1]["accuracy"] is None
    text = paths["csv"].read_text().splitlines()
    assert text[0] == "method,accuracy,times" and text[1].startswith("mse,0.5,") and text[2] == "kl,,"
    paths = save_rows({"mse": {"accuracy": 0.5}}, tmp_path, "summary")
    assert json.loads(paths["json"].read_text()) == [{"key": "mse", "accuracy": 0.5}]
    # the table writes through the same writer; save_json takes tensors, settings and non-finite floats
    assert Table(rows, columns=["method", "accuracy"]).to_csv(tmp_path / "t.csv").read_text().splitlines() == [
        "method,accuracy", "mse,0.5", "kl,"]
    obj = {"t": torch.tensor([1.5, math.inf]), "s": SETTINGS[0], 3: (math.nan,)}
    assert json.loads(save_json(obj, tmp_path / "m.json").read_text()) == {
        "t": [1.5, None], "s": {"name": "a8/w8-ch", "activation_bits": 8, "weight_bits": 8,
                                "per_channel_weights": True}, "3": [None]}


def test_notebook_parameters_from_the_profile():
    p = resolve_parameters("02", "smoke", sweep_steps=[2, 4], curve_bits=None)
    assert p.sweep_steps == [2, 4] and p.curve_bits == [8, 4] and p.sweep_batch_sizes == [16, 64]
    assert resolve_parameters("04", "full").calib_seeds == [0, 1]
    assert resolve_parameters("04", "smoke", tune_max_evals=5).tune_max_evals == 5
    with pytest.raises(ValueError, match="no parameter"):
        resolve_parameters("04", "smoke", sweep_steps=[2])
    with pytest.raises(ValueError, match="profile="):
        resolve_parameters("02", "medium")


def test_exclude_subset():
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(20, 3, 4, 4, generator=g), torch.arange(20)
    pick = torch.tensor([3, 7, 8, 15])
    rest_x, rest_y = exclude_subset(images, labels, images[pick])
    assert rest_y.tolist() == [i for i in range(20) if i not in pick.tolist()]
    assert torch.equal(rest_x, images[rest_y])
    with pytest.raises(ValueError, match="must match"):
        exclude_subset(images, labels, torch.randn(2, 3, 5, 5))


def test_ease_percentile_from_stats_equals_calibration(tiny):
    pytest.importorskip("calibkit.analysis.activation_stats")
    model, images, labels = tiny
    calib = batches_fn(2, 8, 0)
    grid = {"percentile": [{"percentile": 99.9, "bins": 2048}, {"percentile": 95.0, "bins": 8192}],
            "min_max": [{"averaging_constant": 0.5}]}
    setting = QuantSetting("a4", 4, 8, True)
    fast = ease_of_use(model, calib, images, labels, grids=grid, setting=setting)
    slow = ease_of_use(model, calib, images, labels, grids=grid, setting=setting, percentile_from_stats=False)
    assert [r["accuracy"] for r in fast] == [r["accuracy"] for r in slow]
    assert [r["calib_seconds"] is None for r in fast] == [True, True, False]
    assert fast[0]["params"] == "percentile=99.9, bins=2048" and fast[0]["bins"] == 2048


def test_comparison_plots_render():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from calibkit.tutorial import experiment_figures as P

    sweep = [{"activation_bits": b, "batch_size": bs, "averaging_constant": c, "steps": s, "accuracy": 0.5 + c / 10}
             for b in (8, 4) for bs in (16, 64) for c in (0.01, 0.5) for s in (2, 16)]
    curve = [{"activation_bits": b, "seed": 0, "steps": s, "accuracy": 0.5 + s / 100} for b in (8, 4) for s in (1, 2, 4)]
    summary = method_summary(hand_rows(), {"a": 0.01, "b": 0.02}, ease_setting="s2")
    path = tune_percentile(unimodal, max_evals=8)
    path.append({**path[-1], "step": 9, "percentile": 100.0, "accepted": False})  # the max is drawn too
    figs = [P.plot_minmax_sweep(sweep), P.plot_minmax_sweep(sweep, x="batch_size"), P.plot_steps_curve(curve, 0.6),
            P.plot_accuracy_by_setting(hand_rows()), P.plot_method_summary(summary),
            P.plot_rank_comparison(summary, {"speed": {"a": 1, "b": 2}, "accuracy": {"a": 2, "b": 1},
                                             "ease": {"a": 1, "b": 1}}, {"speed": 1.0}), P.plot_tuning_path(path)]
    assert [len(f.axes) for f in figs] == [4, 4, 1, 1, 3, 3, 3]
    for f in figs:
        plt.close(f)
    with pytest.raises(ValueError, match="x="):
        P.plot_minmax_sweep(sweep, x="steps")


def test_qat_curves_render_every_run():
    import matplotlib
    matplotlib.use("Agg")
    from calibkit.tutorial.qat_figures import plot_qat_curves

    hist = {"batch_size": 32, "train_images": 320, "eval_step": [0, 5, 10], "val_accuracy": [0.5, 0.6, 0.7],
            "train_loss": [2.0 - 0.1 * i for i in range(10)], "epoch": [(i + 1) / 10 for i in range(10)],
            "act_scale_change": [0.0, 0.01, 0.02]}
    runs = {f"{s}_{m}": hist for s in ("well", "poor") for m in ("fixed", "free")}
    fig = plot_qat_curves(runs, float_accuracy=0.8)
    acc_ax, loss_ax, scale_ax = fig.axes
    assert len(acc_ax.lines) == 5 and len(loss_ax.lines) == 4 and len(scale_ax.lines) == 4  # + the float line
    assert list(acc_ax.lines[0].get_xdata()) == [0.0, 0.5, 1.0] and list(acc_ax.lines[0].get_ydata()) == [50, 60, 70]
    assert len(loss_ax.lines[0].get_xdata()) == 10  # fewer than 25 steps: no smoothing window beyond 1
