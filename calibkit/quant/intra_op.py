"""Observer work on one intra-op thread (docs/methods.md#calibration-speed).

An observer runs a handful of short passes over each activation (a min/max scan, a histogram, a few error
sums). Each torch op on a CPU opens a parallel region over ``torch.get_num_threads()`` threads; for work of a
fraction of a millisecond the region's start and join cost about as much as the work, and on a machine whose
cores are shared (DataLoader workers, another job) every region waits for its slowest, descheduled thread:
measured at 2 threads on a busy 2-core machine, ``torch.aminmax`` of 2.4 M values took 4-12 ms against 0.3 ms
on one thread. So observers run their per-batch work with one intra-op thread (the model's own layers keep
every thread). Results do not depend on it: every reduction the observers use is exact (integer counts) or
was already computed with one thread per row.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def single_threaded(x: torch.Tensor | None = None):
    """Run the block with ``torch.set_num_threads(1)`` (restored afterwards), for CPU work on ``x`` (a tensor on
    another device leaves the setting alone). Switching costs about a microsecond."""
    n = torch.get_num_threads()
    if n == 1 or (x is not None and x.device.type != "cpu"):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
