"""Per-op overrides: give the few quantizers that do the damage their own observer, by name, and calibrate only
those (``docs/methods.md#per-op-error``).

:func:`override_quantizers` swaps the named quantizers for fresh ones built from new specs (the same
``{name: QuantSpec}`` mapping a qconfig's per-op ``overrides`` takes), :func:`recalibrate` runs calibration
batches through the model with only those quantizers observing, and :func:`apply_overrides` does both. Every
other scale stays bit-identical.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from calibkit.analysis.selection import check_quantizer_names, input_batches, require_eval, require_scales
from calibkit.devices import model_device
from calibkit.quant.calibrate import forward_batch
from calibkit.quant.fake_quantize import FakeQuantize, FakeQuantState, named_quantizers, set_fake_quantize
from calibkit.quant.qconfig import QConfig, QuantSpec
from calibkit.quant.snapshot import all_or_nothing

__all__ = ["override_quantizers", "recalibrate", "apply_overrides", "observer_label"]


def observer_label(fq: FakeQuantize) -> str:
    """Short readable description of a quantizer's observer, e.g. ``"mse(bits=4, c=0.01)"``; a kl observer whose
    searches fell back to the max says how often (``fallbacks=2``)."""
    ob = fq.observer
    parts = [f"bits={ob.bits}", f"c={ob.averaging_constant:g}"]
    for k in ("percentile", "bins", "stride", "update_interval"):
        if hasattr(ob, k):
            parts.append(f"{k}={getattr(ob, k):g}")
    if ob.ch_axis is not None:
        parts.append(f"ch_axis={ob.ch_axis}")
    if getattr(ob, "fallbacks", 0):  # kl searches that kept the max (docs/methods.md#kl)
        parts.append(f"fallbacks={ob.fallbacks}")
    return f"{ob.name or type(ob).__name__}({', '.join(parts)})"


def _spec_for(fq: FakeQuantize, value, name: str) -> QuantSpec:
    """The :class:`QuantSpec` an override value stands for (a dict inherits ``bits`` / ``ch_axis`` from ``fq``)."""
    if isinstance(value, QuantSpec):
        spec = value
    elif isinstance(value, QConfig):
        spec = value.spec_for(fq.kind)
        if spec is None:
            raise ValueError(f"override for {name!r}: the QConfig has no {fq.kind} spec")
    elif isinstance(value, Mapping):
        kw = dict(value)
        if "observer" not in kw:
            raise ValueError(f"override for {name!r}: a dict needs an 'observer' key, e.g. {{'observer': 'mse'}}")
        observer = kw.pop("observer")
        bits = kw.pop("bits", fq.bits)
        ch_axis = kw.pop("ch_axis", fq.ch_axis)
        spec = QuantSpec(observer, bits, ch_axis, kw)
    else:
        raise TypeError(f"override for {name!r} must be a QuantSpec, QConfig or dict like {{'observer': 'mse', ...}}, "
                        f"got {type(value).__name__}")
    _check_ch_axis(fq, spec, name)
    return spec


def _check_ch_axis(fq: FakeQuantize, spec: QuantSpec, name: str) -> None:
    if fq.kind == "weight" and spec.ch_axis not in (None, 0):
        raise ValueError(f"override for weight quantizer {name!r}: ch_axis={spec.ch_axis} is not supported, "
                         "use 0 or None")
    if fq.kind == "activation" and spec.ch_axis is not None:
        raise ValueError(f"override for activation quantizer {name!r}: ch_axis={spec.ch_axis}; activations are "
                         "quantized per tensor, use ch_axis=None")


def _replacement(old: FakeQuantize, spec: QuantSpec) -> FakeQuantize:
    """A fresh quantizer from ``spec`` that takes ``old``'s place: same name, kind, state and flags, no data."""
    new = spec.create().to(old.scale.device)
    new.quantizer_name, new.kind, new.spec = old.quantizer_name, old.kind, spec
    new.module_path = getattr(old, "module_path", "")
    new.state = old.state
    new.enable_observer(old.observing)
    new.enable_fake_quant(old.fake_quantizing)
    return new


def _swap(model: nn.Module, path: str, old: FakeQuantize, new: FakeQuantize) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    for m in model.modules():  # weighted ops keep a link to the quantizer of their input
        if m.__dict__.get("_input_quantizer") is old:
            m.__dict__["_input_quantizer"] = new


def override_quantizers(model: nn.Module, overrides: Mapping[str, Any]) -> list[str]:
    """Replace the named quantizers of a prepared ``model`` by fresh ones built from new specs, in place.

    Args:
        overrides: ``{quantizer name: QuantSpec | QConfig | dict}``; a dict is ``{"observer": name,
            **observer kwargs}`` with optional ``bits`` / ``ch_axis`` (default: the old quantizer's).
            The same ``{name: QuantSpec}`` mapping can be passed to ``prepare(..., overrides=...)``
            to build the overridden model from scratch.
    Returns the names replaced. The new quantizers have no data yet: calibrate them with
    :func:`recalibrate` (other quantizers are untouched: same modules, same scales and statistics).
    Unknown names raise ``ValueError`` with close matches; every value is checked before anything changes.
    """
    if not isinstance(overrides, Mapping) or not overrides:
        raise ValueError("overrides must be a non-empty dict {quantizer name: QuantSpec | QConfig | dict}")
    qs = named_quantizers(model)
    check_quantizer_names(model, list(overrides), "overrides")
    specs = {n: _spec_for(qs[n], v, n) for n, v in overrides.items()}
    new = {n: _replacement(qs[n], spec) for n, spec in specs.items()}  # observer arguments are checked here
    paths = {id(m): p for p, m in model.named_modules() if isinstance(m, FakeQuantize)}
    for name, fq in new.items():
        _swap(model, paths[id(qs[name])], qs[name], fq)
    return list(specs)


def recalibrate(model: nn.Module, batches, names: Iterable[str], progress: bool = True) -> float:
    """Calibrate only the quantizers ``names`` on ``batches`` (the network computes in float, as in
    CALIBRATION); every other quantizer neither observes nor changes its scale. Returns seconds.

    The model must be in eval mode; afterwards it is in ``FakeQuantState.VALIDATION``.
    """
    checked = _recalibration_inputs(model, batches, names)
    with all_or_nothing(model, parameters=False):  # eval mode, no gradients: parameter values cannot change
        return _recalibrate(model, *checked, progress)


def _recalibration_inputs(model: nn.Module, batches, names: Iterable[str]) -> tuple[dict, list, set]:
    """``recalibrate``'s checks, before anything changes: ``(quantizers, input batches, names)``."""
    names = set(check_quantizer_names(model, names))
    if not names:
        raise ValueError("names is empty: give the quantizers to recalibrate")
    require_eval(model, "recalibrate")
    batches = input_batches(batches)
    qs = named_quantizers(model)
    require_scales({n: fq for n, fq in qs.items() if n not in names})  # their scales are final before anything runs
    return qs, batches, names


def _recalibrate(model: nn.Module, qs, batches: list, names: set, progress: bool) -> float:
    set_fake_quantize(model, FakeQuantState.CALIBRATION)
    for n, fq in qs.items():
        fq.enable_observer(n in names)
    device = model_device(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i, x in enumerate(tqdm(batches, desc="recalibrate", disable=not progress, leave=False)):
            forward_batch(model, x, i, device)
        for n in names:
            qs[n].compute_scale()
    seconds = time.perf_counter() - t0
    set_fake_quantize(model, FakeQuantState.VALIDATION)
    return seconds


def apply_overrides(model: nn.Module, overrides: Mapping[str, Any], batches, progress: bool = True) -> list[str]:
    """:func:`override_quantizers` then :func:`recalibrate` of exactly those; returns the names.

    All or nothing: the model mode and ``batches`` are checked first, and if anything fails part way (a batch the
    model rejects, a new observer that cannot produce a scale) the old quantizers are put back, unchanged."""
    require_eval(model, "apply_overrides")
    batches = input_batches(batches)
    with all_or_nothing(model, parameters=False):  # one snapshot; swapping quantizers changes no parameter
        names = override_quantizers(model, overrides)
        _recalibrate(model, *_recalibration_inputs(model, batches, names), progress)
    return names
