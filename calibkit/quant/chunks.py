"""Cache-sized chunks and reusable scratch buffers, shared by every pass over calibration data.

A large tensor is processed in column chunks of :func:`chunk_elems` elements: on a CPU a chunk and its work
buffers stay in L2 cache, which is several times faster than one pass of full-size temporaries; on an
accelerator a chunk holds any realistic activation (a single pass). Work buffers are kept per thread
(:func:`workspace`), so a batch does not allocate (and page-fault) fresh ones.
"""

from __future__ import annotations

import math
import threading

import torch

#: Elements per chunk on CPU (512 KiB of float32: the chunk and its work buffers stay in L2 cache).
CPU_CHUNK = 1 << 17
#: Elements per chunk on accelerators (a single pass for any realistic activation).
DEVICE_CHUNK = 1 << 26

_scratch = threading.local()


def chunk_elems(device: torch.device) -> int:
    """Number of elements processed per chunk on ``device``."""
    return CPU_CHUNK if torch.device(device).type == "cpu" else DEVICE_CHUNK


def workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable scratch tensor (per thread, name, dtype and device; contents undefined).

    Reusing chunk buffers across calls avoids fresh allocations (and page faults) on every batch.
    """
    cache = _scratch.__dict__.setdefault("buffers", {})
    key = (name, dtype, torch.device(device))
    n = math.prod(shape)
    buf = cache.get(key)
    if buf is None or buf.numel() < n:
        buf = cache[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def filled(shape: tuple[int, int], value: float, device: torch.device) -> torch.Tensor:
    """A float32 tensor of ``shape`` filled with ``value`` (per thread and device; kept between calls and
    refilled only when the value changes or a larger one is needed). Read-only for the caller."""
    cache = _scratch.__dict__.setdefault("filled", {})
    n, dev = math.prod(shape), torch.device(device)
    held = cache.get(dev)
    if held is None or held[0] != value or held[1].numel() < n:
        held = cache[dev] = (value, torch.full((n,), value, dtype=torch.float32, device=dev))
    return held[1][:n].view(shape)


def column_chunks(x2d: torch.Tensor, merge_tail: bool = False, fan_out: int = 1):
    """Yield column slices of ``x2d`` ``[C, N]`` holding about ``chunk_elems / fan_out`` elements each
    (``fan_out``: how many work values the caller makes per element, e.g. one per candidate scale).

    ``merge_tail``: a last slice shorter than half a chunk is merged into the one before it (fewer
    small ops for tensors just above a chunk), so a slice holds fewer than ``1.5 * chunk_elems`` elements."""
    cols = max(1, chunk_elems(x2d.device) // (x2d.shape[0] * max(1, int(fan_out))))
    n = x2d.shape[1]
    stops = list(range(cols, n, cols)) + [n]
    if merge_tail and len(stops) > 1 and n - stops[-2] < cols // 2:
        del stops[-2]
    start = 0
    for stop in stops:
        yield x2d[:, start:stop]
        start = stop
