"""What a batch is, for every tool that takes batches: a float input tensor, or an ``(inputs, labels, ...)``
pair/tuple as a ``torch.utils.data.DataLoader`` yields it. Labels are ignored where only inputs are needed.
"""

from __future__ import annotations

import torch

__all__ = ["batch_input", "batch_pair", "require_reiterable"]


def _kind(x) -> str:
    return f"{type(x).__name__}" + (f" of {x.dtype}" if isinstance(x, torch.Tensor) else "")


def batch_input(batch, i: int, name: str = "batches") -> torch.Tensor:
    """The input tensor of batch ``i`` (a float tensor or an ``(inputs, labels)`` pair), else ``TypeError``
    naming ``name[i]`` and what it is."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor) or not batch.is_floating_point():
        raise TypeError(f"{name}[{i}] is a {_kind(batch)}: expected normalized float tensors or (inputs, labels) "
                        "pairs (convert numpy arrays with torch.from_numpy, pass dicts' input tensor)")
    return batch


def batch_pair(batch, i: int, name: str = "loader") -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` of batch ``i`` (a tuple/list whose first two items are a float tensor and integer
    class indices of the same length), else ``TypeError``/``ValueError`` naming ``name[i]``."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(f"{name}[{i}] is a {_kind(batch)}: evaluation needs (inputs, labels) pairs, "
                        "as a DataLoader over a labelled dataset yields them")
    x, y = batch_input(batch, i, name), batch[1]
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dim() != 1 \
            or y.shape[0] != x.shape[0]:
        raise ValueError(f"{name}[{i}] labels must be a 1-d integer tensor with one class index per input "
                         f"({x.shape[0]}), got {_kind(y)}"
                         + (f" of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else ""))
    return x, y


def require_reiterable(data, name: str) -> None:
    """``TypeError`` if ``data`` is a one-shot iterator (a generator, ``iter(loader)``): tools that pass over the
    data several times need a list, a tensor pair or a ``DataLoader``, which start again at every pass."""
    if not isinstance(data, torch.Tensor) and iter(data) is data:
        raise TypeError(f"{name} is a one-shot iterator ({type(data).__name__}) but is read several times: "
                        "pass a list or a DataLoader instead")
