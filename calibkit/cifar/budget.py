"""A time budget for float training: measure this machine's speed, estimate the training time, choose the epochs.

The full profile's 22 epochs take about 40 minutes on 2 CPU cores with fast bfloat16 (AVX-512 BF16 or AMX) but
well over an hour where training runs in float32 (2 cores with AVX2 only: each step takes about twice as long).
:func:`plan_training` therefore decides the number of epochs *before* training, by this rule:

1. **Measure** (:func:`measure_speed`): a few SGD steps of the profile's model in its precision on random data,
   and a few evaluation passes, on one thread, counting that thread's CPU time (so other busy processes hardly
   change it); the first call of each, which sets up the kernels, is not counted, the fastest other is kept.
   ``t`` threads are assumed ``PARALLEL_EFFICIENCY * t`` times as fast. The caller's random state and thread
   count are restored, so a seeded run trains the same weights for the same epochs.
2. **Round into a class** (:func:`time_class`): each time is rounded *up* to the grid ``2 ** (k / 4)`` seconds
   (integer ``k``; neighbouring grid points are 19 % apart). Machines of one class get the same estimate and
   the same choice; only a machine whose time lies within noise of a grid point can land on either side.
3. **Estimate** the training time for ``E`` epochs, ``E * (num_train // batch_size) * step`` (what ``train``
   reports as ``train_seconds``), and apart from it the test evaluations during training,
   ``n_evals(E) * ceil(num_test / eval_batch) * eval`` (``n_evals``: every ``eval_every`` epochs and after the last).
4. **Choose** (:func:`choose_epochs`): the profile's epochs if their training time fits ``time_budget_minutes``;
   otherwise the most epochs that fit, but at least a quarter of the profile's (rounded up) -- if even those do
   not fit, they are trained anyway and the plan says that the budget will be exceeded. With fewer epochs the
   learning-rate warm-up shrinks in proportion (``warmup_epochs * E / profile epochs``); everything else stays
   the profile's.

An explicit ``epochs`` or ``time_budget_minutes=None`` turns the choice off (the estimate is still printed), and a
checkpoint an earlier budgeted run trained with the same settings is reused without measuring again.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from calibkit.checks import check_int, check_number
from calibkit.cifar.checkpoint import reusable_checkpoint
from calibkit.cifar.evaluate import bf16_supported
from calibkit.cifar.models import Stage, cifar_resnet
from calibkit.cifar.train import PROFILES, profile_config, profile_settings

__all__ = ["TrainingSpeed", "TrainingPlan", "measure_speed", "time_class", "budget_config", "choose_epochs",
           "estimate_seconds", "plan_training", "previous_train_config"]

CLASSES_PER_DOUBLING = 4
#: assumed speed-up of t threads over one: PARALLEL_EFFICIENCY * t (an assumption, see measure_speed)
PARALLEL_EFFICIENCY = 0.85


@dataclass(frozen=True)
class TrainingSpeed:
    """Seconds of one training step (``batch_size`` images: forward, backward, update) and of one evaluation pass
    (``eval_batch_size`` images, float32, no gradients) on ``threads`` threads, as :func:`measure_speed` estimates
    them; ``single_thread_*``: the CPU time one thread took (scaled to those batch sizes), which other processes on
    the machine hardly change."""

    step_seconds: float
    eval_seconds: float
    single_thread_step_seconds: float
    single_thread_eval_seconds: float
    batch_size: int
    eval_batch_size: int
    amp: bool
    threads: int
    device: str


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _fastest(fn, repeats: int, dev: torch.device) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn`` after one uncounted warm-up call: on a CPU the CPU
    time of the calling thread (the time spent waiting for the core while other processes ran is not counted),
    on an accelerator the wall-clock time."""
    times = []
    for _ in range(repeats + 1):
        _sync(dev)
        t, c = time.perf_counter(), time.thread_time()
        fn()
        _sync(dev)
        times.append(time.thread_time() - c if dev.type == "cpu" else time.perf_counter() - t)
    return min(times[1:])


def _probe_model(width, dev, pool_first: bool):
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(0)
        model = cifar_resnet(list(width)).to(dev).to(memory_format=torch.channels_last)
    for m in model.modules():
        if isinstance(m, Stage):
            m.pool_first = pool_first
    return model


def measure_speed(width, batch_size: int, amp: bool | None = None, device=None, steps: int = 3,
                  eval_batch_size: int = 1000, pool_first: bool = True, probe_batch: int = 256) -> TrainingSpeed:
    """Estimate the seconds of a training step and of an evaluation pass of ``cifar_resnet(width)`` as ``train``
    runs them (channels-last, bf16 autocast if ``amp``, None = where fast; Nesterov SGD; stages that pool first).

    Rule: on random data of ``min(batch, probe_batch)`` images, the fastest of ``steps`` timed calls after one
    warm-up (:func:`_fastest`), scaled in proportion to ``batch_size`` / ``eval_batch_size`` images. On a CPU the
    calls run on one thread (the caller's thread count is restored) and ``t`` threads are assumed
    ``PARALLEL_EFFICIENCY * t`` times as fast as one. The caller's random state is restored."""
    check_int("batch_size", batch_size, 1)
    check_int("steps", steps, 1)
    check_int("eval_batch_size", eval_batch_size, 1)
    check_int("probe_batch", probe_batch, 1)
    dev = torch.device(device or "cpu")
    amp = bf16_supported(dev) if amp is None else bool(amp)
    nb, ne = min(batch_size, probe_batch), min(eval_batch_size, probe_batch)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(max(nb, ne), 3, 32, 32, generator=gen).to(dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (nb,), generator=gen).to(dev)
    model = _probe_model(width, dev, pool_first)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.85, nesterov=True)

    def train_step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x[:nb])
        loss = F.cross_entropy(logits.float(), y, label_smoothing=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def eval_pass():
        model(x[:ne])

    threads = torch.get_num_threads()
    torch.set_num_threads(1 if dev.type == "cpu" else threads)
    try:
        model.train()
        step_1 = _fastest(train_step, steps, dev) * batch_size / nb
        model.eval()
        eval_1 = _fastest(eval_pass, steps, dev) * eval_batch_size / ne
    finally:
        torch.set_num_threads(threads)
    speed_up = PARALLEL_EFFICIENCY * threads if dev.type == "cpu" and threads > 1 else 1.0
    return TrainingSpeed(step_1 / speed_up, eval_1 / speed_up, step_1, eval_1, batch_size, eval_batch_size, amp,
                         threads, str(dev))


def time_class(seconds: float) -> float:
    """``seconds`` rounded up to the grid ``2 ** (k / 4)`` (integer ``k``): the speed class decisions use."""
    check_number("seconds", seconds, 0, low_open=True)
    k = math.ceil(CLASSES_PER_DOUBLING * math.log2(seconds) - 1e-9)
    return 2.0 ** (k / CLASSES_PER_DOUBLING)


def _num_evals(epochs: int, eval_every: int) -> int:
    """Test evaluations ``train`` runs: after every ``eval_every``-th epoch and after the last."""
    return 1 if not eval_every else epochs // eval_every + (epochs % eval_every != 0)


def estimate_seconds(epochs: int, steps_per_epoch: int, step_seconds: float, eval_every: int, eval_batches: int,
                     eval_seconds: float) -> tuple[float, float]:
    """``(training, evaluation)`` seconds: ``epochs * steps_per_epoch * step_seconds`` and ``n_evals * eval_batches
    * eval_seconds`` (see the module rule)."""
    return epochs * steps_per_epoch * step_seconds, _num_evals(epochs, eval_every) * eval_batches * eval_seconds


def choose_epochs(profile_epochs: int, budget_seconds: float, estimate) -> tuple[int, bool]:
    """``(epochs, fits)``: ``profile_epochs`` if ``estimate(profile_epochs) <= budget_seconds``, else the largest
    ``E`` in ``[ceil(profile_epochs / 4), profile_epochs)`` that fits, else ``ceil(profile_epochs / 4)`` with
    ``fits=False``. ``estimate(E)`` returns seconds and must grow with ``E``."""
    check_int("profile_epochs", profile_epochs, 1)
    check_number("budget_seconds", budget_seconds, 0, low_open=True)
    lowest = math.ceil(profile_epochs / 4)
    for e in range(profile_epochs, lowest - 1, -1):
        if estimate(e) <= budget_seconds:
            return e, True
    return lowest, False


def budget_config(profile: str, epochs: int) -> dict:
    """The settings of ``profile`` trained for ``epochs`` under a time budget (``profile_config`` of the profile
    when ``epochs`` is the profile's; else the warm-up scaled by ``epochs / profile epochs``)."""
    full = profile_settings(profile)
    check_int("epochs", epochs, 1)
    if epochs == full["epochs"]:
        return profile_config(profile)
    return profile_config(profile, epochs, warmup_epochs=round(full["warmup_epochs"] * epochs / full["epochs"], 2))


def previous_train_config(checkpoint_path, **want) -> dict | None:
    """The ``train_config`` of the checkpoint at ``checkpoint_path`` if it exists and its meta matches ``want``
    (e.g. ``profile``, ``seed``, ``data_source``; see ``reusable_checkpoint``), else None."""
    meta, _ = reusable_checkpoint(checkpoint_path, **want)
    return None if meta is None else meta.get("train_config")


@dataclass(frozen=True)
class TrainingPlan:
    """What :func:`plan_training` decided: train ``config`` (``epochs`` of ``profile``) for the reason ``decision``
    ("profile epochs fit", "fewer epochs fit", "over budget", "epochs given", "no budget" or "reused"), with the
    measured ``speed``, its classes and the estimates in minutes (None where nothing was measured): training of
    the chosen and of the profile's epochs, and the test evaluations during training of the chosen epochs."""

    profile: str
    epochs: int
    config: dict
    decision: str
    time_budget_minutes: float | None
    estimate_minutes: float | None
    profile_estimate_minutes: float | None
    eval_estimate_minutes: float | None
    step_class_seconds: float | None
    eval_class_seconds: float | None
    speed: TrainingSpeed | None
    cpu_capability: str

    @property
    def overrides(self) -> dict:
        """The ``train_profile`` keywords besides ``epochs`` that differ from the profile (the scaled warm-up)."""
        base = profile_config(self.profile)
        return {k: v for k, v in self.config.items() if k != "epochs" and base.get(k) != v}

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """A few lines for the notebook: the measured speed, the estimates, the decision."""
        p = PROFILES[self.profile]
        if self.speed is None:
            return (f"{self.epochs} epochs: the existing checkpoint was trained with settings this budget can choose "
                    f"({self.decision}; retrain=True measures again)")
        s = self.speed
        lines = [f"measured on {s.device} ({'bf16 autocast' if s.amp else 'float32'}, CPU {self.cpu_capability}): "
                 f"{s.step_seconds:.2f} s per training step of {s.batch_size} images on {s.threads} threads "
                 f"(class {self.step_class_seconds:.2f} s), {s.eval_seconds:.2f} s per evaluation of "
                 f"{s.eval_batch_size} images (class {self.eval_class_seconds:.2f} s)",
                 f"estimate for the profile's {p['epochs']} epochs: {_duration(self.profile_estimate_minutes)} "
                 "(with the cores free of other work)"]
        budget = "no time budget" if self.time_budget_minutes is None else f"budget {self.time_budget_minutes:g} min"
        warm = f", warm-up {self.config['warmup_epochs']:g} epochs" if "warmup_epochs" in self.overrides else ""
        lines.append(f"{budget} -> {self.epochs} epochs{warm} ({self.decision}): estimate "
                     f"{_duration(self.estimate_minutes)} of training, + {_duration(self.eval_estimate_minutes)} of "
                     "test evaluation")
        if self.decision == "over budget":
            lines.append(f"WARNING: even {self.epochs} epochs (a quarter of the profile's) take longer than the budget "
                         "on this machine; they are trained anyway")
        return "\n".join(lines)


def _duration(minutes: float) -> str:
    return f"{minutes:.0f} min" if minutes >= 1 else f"{60 * minutes:.0f} s"


def _reused_epochs(profile: str, previous: dict | None) -> int | None:
    """The epochs of ``previous`` (a checkpoint's train_config) if a budgeted run of ``profile`` could choose it."""
    e = (previous or {}).get("epochs")
    ok = isinstance(e, int) and math.ceil(PROFILES[profile]["epochs"] / 4) <= e <= PROFILES[profile]["epochs"]
    return e if ok and previous == budget_config(profile, e) else None


def plan_training(profile: str, num_train: int, num_test: int, epochs: int | None = None,
                  time_budget_minutes: float | None = None, previous: dict | None = None, device=None,
                  speed: TrainingSpeed | None = None) -> TrainingPlan:
    """Decide how many epochs ``profile`` trains on ``num_train`` / ``num_test`` images (see the module rule).

    ``epochs``: train exactly these (no choice). ``time_budget_minutes`` (> 0, or None for no budget): the time
    the training steps may take (``train_seconds``; the test evaluations during training are estimated apart).
    ``previous``: the ``train_config`` of an existing checkpoint with the same profile, seed and data
    (:func:`previous_train_config`); if a budgeted run could have chosen it, it is kept without measuring.
    ``speed``: a measurement to use instead of measuring (tests).
    """
    cfg = profile_settings(profile)
    check_int("num_train", num_train, cfg["batch_size"], why=" (at least one batch)")
    check_int("num_test", num_test, 1)
    if epochs is not None:
        check_int("epochs", epochs, 1)
    if time_budget_minutes is not None:
        check_number("time_budget_minutes", time_budget_minutes, 0, low_open=True, why=" (or None)")
    cap = torch.backends.cpu.get_cpu_capability()
    reused = _reused_epochs(profile, previous) if epochs is None and time_budget_minutes is not None else None
    if reused is not None:
        return TrainingPlan(profile, reused, budget_config(profile, reused), "reused", time_budget_minutes,
                            None, None, None, None, None, None, cap)
    speed = speed or measure_speed(cfg["width"], cfg["batch_size"], device=device)
    step_c, eval_c = time_class(speed.step_seconds), time_class(speed.eval_seconds)
    spe, eval_batches = num_train // cfg["batch_size"], math.ceil(num_test / speed.eval_batch_size)

    def estimate(e):
        return estimate_seconds(e, spe, step_c, cfg["eval_every"], eval_batches, eval_c)[0]

    if epochs is not None or time_budget_minutes is None:
        chosen, config = epochs or cfg["epochs"], profile_config(profile, epochs)
        decision = "epochs given" if epochs is not None else "no budget"
    else:
        chosen, fits = choose_epochs(cfg["epochs"], 60 * time_budget_minutes, estimate)
        config = budget_config(profile, chosen)
        decision = ("over budget" if not fits else "profile epochs fit" if chosen == cfg["epochs"]
                    else "fewer epochs fit")
    train_s, eval_s = estimate_seconds(chosen, spe, step_c, cfg["eval_every"], eval_batches, eval_c)
    return TrainingPlan(profile, chosen, config, decision, time_budget_minutes, train_s / 60,
                        estimate(cfg["epochs"]) / 60, eval_s / 60, step_c, eval_c, speed, cap)
