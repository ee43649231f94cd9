"""All-or-nothing model changes: take a snapshot, restore it if the change fails part way.

Every public call that changes a prepared model (calibrate, overrides, fixing scales, QAT, loading) checks its
inputs first; what can still fail in the middle (a batch iterator that raises, a model that rejects a batch, a
state that does not fit) runs inside :func:`all_or_nothing`, so that after any exception the model is as it was.

A :class:`Snapshot` holds, for every module of the model: its train/eval flag, its child modules (so a swapped
quantizer is put back), clones of its parameters and buffers; for every ``FakeQuantize`` also its Python-side
flags (observe / fake-quant / fixed / scale ready / stale, state) and a deep copy of its observer (statistics
that live outside ``state_dict``, such as histograms); and the input-quantizer link of every weighted op.
Parameters are restored in place (an optimizer holding them keeps working); an optimizer's own state is not
part of the model and is not restored. A call that cannot change parameter values (calibration and state changes
run in eval mode without gradients) passes ``parameters=False``: the parameter objects are still put back, their
values are not copied, which on a large model is most of the snapshot's cost.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from calibkit.quant.fake_quantize import FakeQuantize

__all__ = ["Snapshot", "snapshot", "all_or_nothing"]

_FQ_ATTRS = ("_observe", "_fake_quant", "_fixed", "_scale_ready", "_scale_stale", "state")


def _clone(t):
    return None if t is None else t.detach().clone()


class Snapshot:
    """The restorable state of ``model`` at construction time; :meth:`restore` puts it back (any number of times)."""

    def __init__(self, model: nn.Module, parameters: bool = True):
        self.model = model
        self.modules = []
        for m in model.modules():
            entry = {"module": m, "training": m.training, "children": dict(m._modules),
                     "params": {k: (p, _clone(p) if parameters else None) for k, p in m._parameters.items()},
                     "buffers": {k: _clone(b) for k, b in m._buffers.items()},
                     "input_quantizer": m.__dict__.get("_input_quantizer", False)}
            if isinstance(m, FakeQuantize):
                entry["fq"] = {a: getattr(m, a) for a in _FQ_ATTRS}
                entry["observer"] = copy.deepcopy(m.observer)
            self.modules.append(entry)

    def restore(self) -> None:
        for e in self.modules:
            m = e["module"]
            m._modules.clear()
            m._modules.update(e["children"])
            for k, (p, saved) in e["params"].items():
                if p is not None and saved is not None:
                    with torch.no_grad():
                        if p.shape != saved.shape:
                            p.data = saved.clone()
                        else:
                            p.copy_(saved)
                    p.grad = None
                m._parameters[k] = p
            m._buffers.clear()
            m._buffers.update({k: _clone(b) for k, b in e["buffers"].items()})
            if e["input_quantizer"] is not False:
                m.__dict__["_input_quantizer"] = e["input_quantizer"]
            m.training = e["training"]
            if "fq" in e:
                for a, v in e["fq"].items():
                    setattr(m, a, v)
                m._modules["observer"] = copy.deepcopy(e["observer"])


def snapshot(model: nn.Module, parameters: bool = True) -> Snapshot:
    """A :class:`Snapshot` of ``model`` (``parameters=False``: without copies of the parameter values)."""
    return Snapshot(model, parameters)


@contextlib.contextmanager
def all_or_nothing(model: nn.Module, parameters: bool = True):
    """Run the block; if it raises (anything, including ``KeyboardInterrupt``), restore ``model`` to its state at
    entry and re-raise. Yields the :class:`Snapshot`. ``parameters=False`` for blocks that cannot change parameter
    values (see the module docstring)."""
    snap = Snapshot(model, parameters)
    try:
        yield snap
    except BaseException:
        snap.restore()
        raise
