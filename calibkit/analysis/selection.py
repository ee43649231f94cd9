"""Which quantizers of a calibrated model fake-quantize, chosen by name, and what every analysis tool checks first.

The debugging tools compare a model against itself with some quantizers on and the rest passing float values
through: :func:`quantizers_enabled_only` (only the named ones on) and :func:`quantizers_disabled` (all but the
named ones on). Both freeze the scales (observers off) and restore every quantizer's flags on exit. The checks
shared by the analysis tools live here too: names that exist (:func:`check_quantizer_names`, with close matches
for typos), eval mode, calibrated scales and input batches. See ``docs/methods.md#per-op-error``.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Iterable, Mapping

import torch
from torch import nn

from calibkit.errors import StateError
from calibkit.quant.batches import batch_input
from calibkit.quant.fake_quantize import FakeQuantize, require_quantizers, named_quantizers, ready_scales

__all__ = ["quantizers_enabled_only", "quantizers_disabled", "check_quantizer_names"]


def check_quantizer_names(model: nn.Module, names: Iterable[str], param: str = "names") -> list[str]:
    """Validate quantizer names of ``model``; unknown ones raise ``ValueError`` with close matches."""
    qs = require_quantizers(model)
    if isinstance(names, str):
        names = [names]
    names = list(names)
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"{param} must hold quantizer names (str), got {n!r}")
        if n not in qs:
            close = difflib.get_close_matches(n, list(qs), n=5, cutoff=0.5)
            hint = f"; close matches: {close}" if close else f"; valid names: {list(qs)[:8]}..."
            raise ValueError(f"{param}: {n!r} is not a quantizer of this model{hint}")
    return names


def require_eval(model: nn.Module, what: str) -> None:
    """``StateError`` unless ``model`` is in eval mode (``what``: the caller, for the message)."""
    if model.training:
        raise StateError(f"{what} needs the model in eval mode: call model.eval() first")


def require_scales(qs: Mapping[str, FakeQuantize]) -> None:
    """Compute every scale of ``qs``; ``CalibrationError`` listing the quantizers that saw no data."""
    ready_scales(qs, "the debug tools need a calibrated model")


def input_batches(batches) -> list[torch.Tensor]:
    """``batches`` (a tensor, or any iterable or ``DataLoader`` of tensors or ``(inputs, labels)`` pairs) as a list
    of inputs (these tools pass over a few batches several times); ``TypeError`` names a batch that is neither."""
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    out = [batch_input(b, i) for i, b in enumerate(batches)]
    if not out:
        raise ValueError("batches is empty: give at least one batch of inputs")
    return out


@contextlib.contextmanager
def saved_flags(model: nn.Module):
    """Context yielding ``named_quantizers(model)``; every quantizer's observe / fake-quant flags are restored on
    exit."""
    qs = named_quantizers(model)
    saved = {n: (fq.observing, fq.fake_quantizing) for n, fq in qs.items()}
    try:
        yield qs
    finally:
        for n, fq in qs.items():
            fq.enable_observer(saved[n][0])
            fq.enable_fake_quant(saved[n][1])


@contextlib.contextmanager
def _fake_quantize_selected(model: nn.Module, names: Iterable[str], what: str, selected: bool):
    """Observers off, scales frozen; a quantizer fake-quantizes iff its membership in ``names`` equals
    ``selected``. Flags are restored on exit."""
    names = set(check_quantizer_names(model, names))
    require_eval(model, what)
    with saved_flags(model) as qs:
        require_scales(qs)
        for n, fq in qs.items():
            fq.enable_observer(False)
            fq.enable_fake_quant((n in names) == selected)
        yield model


@contextlib.contextmanager
def quantizers_enabled_only(model: nn.Module, names: Iterable[str]):
    """Context: only the quantizers ``names`` fake-quantize (with their frozen scales); every other
    tensor stays float. Observers are off. All flags are restored on exit. The model must be in eval
    mode and calibrated."""
    with _fake_quantize_selected(model, names, "quantizers_enabled_only", selected=True) as m:
        yield m


@contextlib.contextmanager
def quantizers_disabled(model: nn.Module, names: Iterable[str]):
    """Context: every quantizer fake-quantizes (VALIDATION arithmetic) except ``names``, which pass
    their tensor through in float. Observers are off; flags are restored on exit."""
    with _fake_quantize_selected(model, names, "quantizers_disabled", selected=False) as m:
        yield m
