"""The one training loop, shared by float training (:mod:`calibkit.cifar.train`) and QAT (:mod:`calibkit.quant.qat`).

:func:`train_steps` owns what every optimizer step does -- loss, ``zero_grad``, ``backward``, ``step``, the
learning-rate schedule, timing and the progress bar -- and yields a :class:`Step` after each one, so the caller
keeps its own bookkeeping (lookahead, per-epoch evaluation, checkpoints) in the body of a plain ``for`` loop.
Batches come from any iterable of ``(inputs, labels)``; a generator that draws its data order and augmentation
from a seeded ``torch.Generator`` makes the run reproducible.

:func:`lr_multiplier` is the one learning-rate schedule: a linear warm-up, then a linear or cosine decay to 0.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

__all__ = ["Step", "lr_multiplier", "train_steps", "DECAYS"]

DECAYS = ("linear", "cosine")


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, decay: str = "linear") -> float:
    """Learning-rate factor at optimizer step ``step`` (0-based): rises linearly to 1 over ``warmup_steps``
    steps, then falls to 0 at ``total_steps``, linearly (``decay="linear"``) or along a half cosine
    (``"cosine"``)."""
    if decay not in DECAYS:
        raise ValueError(f"decay={decay!r} is unknown: use one of {DECAYS}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@dataclass
class Step:
    """One optimizer step, as :func:`train_steps` yields it.

    ``index``: steps done so far (1-based); ``loss``, ``logits``: detached; ``labels``: the batch's labels;
    ``lr``: the learning rate of the first parameter group used for this step; ``seconds``: wall time of the
    step, drawing the batch included; ``bar``: the progress bar (for a caller's ``set_postfix``)."""

    index: int
    loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    lr: float
    seconds: float
    bar: tqdm


LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def train_steps(model: torch.nn.Module, batches: Iterable, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
                lr_lambda: Callable[[int], float], total: int, desc: str = "train",
                progress: bool = True) -> Iterator[Step]:
    """Train ``model`` on ``batches`` (an iterable of ``(inputs, labels)``), yielding a :class:`Step` after every
    optimizer step.

    ``loss_fn(model, inputs, labels) -> (loss, logits)`` runs the forward pass (autocast, logit scaling and label
    smoothing are the caller's choice); ``lr_lambda(step)`` multiplies each parameter group's initial learning
    rate (``torch.optim.lr_scheduler.LambdaLR``, stepped after every optimizer step); ``total`` sizes the progress
    bar. The loop ends when ``batches`` is exhausted or the caller stops iterating; the bar is closed either way.
    """
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    bar = tqdm(total=total, desc=desc, disable=not progress)
    batches = iter(batches)
    index = 0
    try:
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                return
            inputs, labels = batch
            loss, logits = loss_fn(model, inputs, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            index += 1
            bar.update(1)
            if progress and index % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            yield Step(index, loss.detach(), logits.detach(), labels, lr, time.perf_counter() - t0, bar)
    finally:
        bar.close()
