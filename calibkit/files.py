"""Writing files so that a reader never sees half of one.

:func:`atomic_torch_save` is the one place calibkit writes a ``torch.save`` file: the CIFAR checkpoints
(:mod:`calibkit.cifar.checkpoint`) and the prepared-model files (:mod:`calibkit.quant.io`) both go through it.
It sits below the four floors so that both can use it without importing each other.
"""

from __future__ import annotations

import os
import pathlib
import uuid

import torch

__all__ = ["atomic_torch_save"]


def atomic_torch_save(payload, path) -> pathlib.Path:
    """``torch.save(payload)`` to ``path`` atomically: a temporary file in the same folder, fsync, then
    ``os.replace``; a crash leaves either the old file or the new one, never a truncated file. Parent folders
    are created. Returns the path written."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{uuid.uuid4().hex[:12]}{path.suffix or '.pt'}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
