"""The training time budget: speed classes, the epochs choice, the plan notebook 01 trains with."""

import pytest
import torch

from calibkit.cifar.budget import (PARALLEL_EFFICIENCY, TrainingSpeed, budget_config, choose_epochs, estimate_seconds,
                                   measure_speed, plan_training, time_class)
from calibkit.cifar.train import PROFILES, profile_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _speed(step, evaluation, amp=False, threads=2):
    """A measured speed as plan_training would get it (seconds per 1024-image step / 1000-image evaluation)."""
    one = PARALLEL_EFFICIENCY * threads
    return TrainingSpeed(step, evaluation, step * one, evaluation * one, 1024, 1000, amp, threads, "cpu")


def test_time_class_rounds_up_to_the_quarter_octave_grid():
    assert time_class(2.0) == 2.0 and time_class(1.0) == 1.0
    assert time_class(2.01) == pytest.approx(2 ** 1.25)
    assert time_class(0.3) == pytest.approx(2 ** (-1.5))  # 0.3536 is the next grid point up from 0.3
    for t in (0.011, 0.7, 3.3, 47.0):
        c = time_class(t)
        assert t <= c < t * 2 ** 0.25 + 1e-12
        assert time_class(c) == pytest.approx(c)  # grid points are fixed points
    with pytest.raises(ValueError, match="seconds=0"):
        time_class(0)


def test_choose_epochs_takes_the_most_that_fit_and_never_under_a_quarter():
    per_epoch = 100.0
    assert choose_epochs(22, 2200, lambda e: e * per_epoch) == (22, True)
    assert choose_epochs(22, 2199, lambda e: e * per_epoch) == (21, True)
    assert choose_epochs(22, 950, lambda e: e * per_epoch) == (9, True)
    assert choose_epochs(22, 100, lambda e: e * per_epoch) == (6, False)  # ceil(22 / 4), over budget
    assert choose_epochs(2, 1, lambda e: e * per_epoch) == (1, False)
    with pytest.raises(ValueError, match="budget_seconds"):
        choose_epochs(22, -1, lambda e: e)


def test_estimate_counts_steps_and_the_evaluations_train_runs():
    # 22 epochs, eval every 3: after epochs 3, 6, ..., 21 and after 22 = 8 evaluations of 10 batches
    train_s, eval_s = estimate_seconds(22, 48, 2.0, 3, 10, 0.5)
    assert train_s == 22 * 48 * 2.0 and eval_s == 8 * 10 * 0.5
    assert estimate_seconds(9, 48, 2.0, 3, 10, 0.5)[1] == 3 * 10 * 0.5  # 3, 6, 9 (the last is one of them)
    assert estimate_seconds(5, 48, 2.0, 0, 10, 0.5)[1] == 10 * 0.5      # eval_every=0: after the last only


def test_budget_config_scales_only_the_warmup():
    assert budget_config("full", 22) == profile_config("full")
    cfg = budget_config("full", 9)
    assert cfg["epochs"] == 9 and cfg["warmup_epochs"] == round(5.0 * 9 / 22, 2) == 2.05
    assert {k: v for k, v in cfg.items() if k not in ("epochs", "warmup_epochs")} == \
        {k: v for k, v in profile_config("full").items() if k not in ("epochs", "warmup_epochs")}
    assert budget_config("smoke", 2) == profile_config("smoke")
    with pytest.raises(ValueError, match="profile='tiny'"):
        budget_config("tiny", 2)


def test_plan_float32_class_cuts_the_full_profile_to_fit_and_bf16_class_keeps_it():
    # single-thread CPU times measured on the 2-core test machine: float32 limited to AVX2 about 8.5 s per step of
    # 1024 images, bf16 about 3.8 s; evaluation of 1000 images in float32 about 2.8-3.7 s
    slow = plan_training("full", 50000, 10000, time_budget_minutes=45, speed=_speed(8.5 / 1.7, 2.8 / 1.7))
    assert slow.step_class_seconds == pytest.approx(2 ** 2.5)  # 5.0 s -> class 5.66 s
    assert slow.epochs == 9 and slow.decision == "fewer epochs fit"
    assert slow.estimate_minutes == pytest.approx(9 * 48 * 2 ** 2.5 / 60) and slow.estimate_minutes <= 45
    assert slow.profile_estimate_minutes == pytest.approx(22 * 48 * 2 ** 2.5 / 60)
    assert slow.overrides == {"warmup_epochs": 2.05}
    assert profile_config("full", slow.epochs, **slow.overrides) == slow.config == budget_config("full", 9)
    fast = plan_training("full", 50000, 10000, time_budget_minutes=45, speed=_speed(3.8 / 1.7, 3.7 / 1.7, amp=True))
    assert fast.epochs == 22 and fast.decision == "profile epochs fit" and fast.overrides == {}
    assert fast.config == profile_config("full")
    # the same class gives the same plan: any time in (2 ** 2.25, 2 ** 2.5] s chooses 9 epochs
    for step in (4.8, 5.2, 5.6):
        assert plan_training("full", 50000, 10000, time_budget_minutes=45, speed=_speed(step, 1.6)).epochs == 9
    text = slow.describe()
    assert "9 epochs" in text and "100 min" in text and "budget 45 min" in text


def test_plan_without_choice_and_over_budget():
    sp = _speed(5.0, 1.6)
    given = plan_training("full", 50000, 10000, epochs=3, time_budget_minutes=45, speed=sp)
    assert (given.epochs, given.decision, given.config) == (3, "epochs given", profile_config("full", 3))
    free = plan_training("full", 50000, 10000, time_budget_minutes=None, speed=sp)
    assert (free.epochs, free.decision, free.config) == (22, "no budget", profile_config("full"))
    over = plan_training("full", 50000, 10000, time_budget_minutes=5, speed=sp)
    assert (over.epochs, over.decision) == (6, "over budget") and "WARNING" in over.describe()


def test_plan_reuses_a_budgeted_checkpoint_config_without_measuring():
    plan = plan_training("full", 50000, 10000, time_budget_minutes=45, previous=budget_config("full", 9))
    assert (plan.epochs, plan.decision, plan.speed) == (9, "reused", None)
    assert plan.config == budget_config("full", 9)
    # a config no budgeted run makes (another lr, or fewer than a quarter of the epochs) is measured again
    for other in (profile_config("full", 9, lr=1.0), budget_config("full", 3)):
        plan = plan_training("full", 50000, 10000, time_budget_minutes=45, previous=other, speed=_speed(5.0, 1.6))
        assert plan.decision == "fewer epochs fit" and plan.epochs == 9


def test_plan_checks_its_arguments():
    sp = _speed(1.0, 1.0)
    with pytest.raises(ValueError, match="time_budget_minutes=0"):
        plan_training("full", 50000, 10000, time_budget_minutes=0, speed=sp)
    with pytest.raises(ValueError, match="num_train=100"):
        plan_training("full", 100, 10000, time_budget_minutes=45, speed=sp)
    with pytest.raises(ValueError, match="epochs=0"):
        plan_training("full", 50000, 10000, epochs=0, speed=sp)
    with pytest.raises(ValueError, match="profile='nope'"):
        plan_training("nope", 50000, 10000, speed=sp)


def test_measure_speed_restores_random_state_and_threads():
    before_state, before_threads = torch.get_rng_state(), torch.get_num_threads()
    sp = measure_speed((8, 8, 8), batch_size=32, amp=False, eval_batch_size=64, probe_batch=16)
    assert torch.equal(torch.get_rng_state(), before_state) and torch.get_num_threads() == before_threads
    assert sp.step_seconds > 0 and sp.eval_seconds > 0 and (sp.batch_size, sp.eval_batch_size) == (32, 64)
    # one thread here (fixture): the estimate is the single-thread time, measured on 16 images and scaled to 32 / 64
    assert sp.threads == 1 and sp.step_seconds == sp.single_thread_step_seconds
    with pytest.raises(ValueError, match="probe_batch=0"):
        measure_speed((8, 8, 8), batch_size=32, probe_batch=0)


def test_smoke_profile_keeps_its_epochs_under_the_default_budget():
    plan = plan_training("smoke", 20000, 2000, time_budget_minutes=45,
                         speed=TrainingSpeed(0.05, 0.3, 0.085, 0.5, 128, 1000, True, 2, "cpu"))
    assert (plan.epochs, plan.overrides) == (PROFILES["smoke"]["epochs"], {})
