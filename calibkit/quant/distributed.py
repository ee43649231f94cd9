"""Calibration under ``torch.distributed``: every collective calibkit calls (docs/methods.md#many-processes).

When ``torch.distributed`` is available and initialized with a world size above 1 (and syncing is on, the default),
each observer shares the statistic of every batch it sees with the other ranks, so that N ranks calibrating N
shards produce the scales one process produces on all the batches fed in *step order, rank by rank*: step 0 of
rank 0, step 0 of rank 1, ..., step 1 of rank 0, ...

* moving averages (``min_max``' batch min and max, the per-batch clips of ``percentile``, ``mse``, ``mix``): one
  :func:`gather_in_step_order` per batch (a ``[W, ...]`` tensor of the ranks' batch statistics), applied rank by
  rank to the moving average: the same float operations in the same order as one process.
* ``kl``'s accumulating histogram: :func:`gather_in_step_order` of the ranks' (max ``|x|``, element count), from
  which every rank derives the same bin width and length (the range the histogram has after each rank's batch),
  then one gather of the ranks' batch counts at that width; the counts are summed rank by rank with the searches
  due in between. Bin widths are powers of two, so regrowing is exact and so is the result.
* :func:`check_same_steps`: ``calibrate`` asks before every batch whether each rank still has one, so ranks
  with different numbers of batches raise :class:`StepMismatchError` on every rank instead of hanging.

Collectives run on tensors on the observer's device (``gloo`` on CPU, ``nccl`` on CUDA); nothing is moved to the
CPU for them. :func:`set_sync` / :func:`syncing` turn the whole mechanism off (each rank keeps its own scales).

Why gathers rather than an all-reduce (min / max / sum): a moving average, and a ``kl`` search due after a
rank's batch in the middle of a step, depend on each rank's batch in order, which a reduction loses; the gathered
statistics are small (a ``kl`` histogram is at most ``8 * bins`` int64 counts per rank).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from calibkit.errors import CalibrationError

__all__ = ["StepMismatchError", "world_size", "rank", "set_sync", "syncing", "gather_in_step_order",
           "check_same_steps"]

_SYNC = [True]


class StepMismatchError(CalibrationError):
    """The ranks of a distributed calibration did not all feed the same number of batches."""


def set_sync(enabled: bool) -> None:
    """Module-wide switch: ``False`` makes observers ignore ``torch.distributed`` (each rank keeps its own scales)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled={enabled!r} must be True or False")
    _SYNC[0] = enabled


@contextlib.contextmanager
def syncing(enabled: bool | None):
    """Within the block, syncing is ``enabled`` (``None``: unchanged); the previous setting comes back after."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"sync={enabled!r} must be True, False or None (None: calibkit.quant.distributed.set_sync)")
    old = _SYNC[0]
    if enabled is not None:
        _SYNC[0] = enabled
    try:
        yield
    finally:
        _SYNC[0] = old


def world_size() -> int:
    """Number of ranks whose statistics are combined: the process group's size when syncing is on and
    ``torch.distributed`` is initialized, else 1 (one process: no collective is ever called)."""
    if not (_SYNC[0] and dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def rank() -> int:
    """This process's rank when :func:`world_size` > 1, else 0."""
    return dist.get_rank() if world_size() > 1 else 0


def gather_in_step_order(stat: torch.Tensor) -> torch.Tensor:
    """``[W, *stat.shape]``: every rank's ``stat`` (same shape and dtype on every rank), row ``r`` from rank ``r``.
    One ``all_gather`` on ``stat``'s device."""
    stat = stat.contiguous()
    parts = [torch.empty_like(stat) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, stat)
    return torch.stack(parts)


def check_same_steps(has_batch: bool, step: int, device: torch.device) -> None:
    """Before each calibration step (one tiny ``all_reduce`` on ``device``): :class:`StepMismatchError` on every
    rank when some ranks have a batch and others have run out."""
    flags = torch.tensor([int(has_batch), -int(has_batch)], dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    some, all_ = int(flags[0]), -int(flags[1])
    if some != all_:
        raise StepMismatchError(
            f"distributed calibration: rank {dist.get_rank()} {'has' if has_batch else 'has no'} batch {step} while "
            f"{'others have none' if has_batch else 'others have one'}: every rank must feed the same number of "
            f"batches (shard the data evenly, e.g. DistributedSampler(drop_last=True))")
