"""Fake quantization modules and the three fake-quantize states (``docs/methods.md#fake-quantize-states``).

A :class:`FakeQuantize` owns an observer and sits on one tensor of the network (an activation or
a weight). Depending on two flags it records statistics of that tensor (``observer_enabled``)
and/or replaces it by its round-clamp-rescale version ``clamp(round(x / s), qmin, qmax) * s``
(``fake_quant_enabled``), with a straight-through gradient (``calibkit.quant.fake_quantize``).

:func:`set_fake_quantize` sets the flags of every quantizer in a model from the state table:

=============  ===========  ===========================  ==================
state          model mode   observers update             fake quant applied
=============  ===========  ===========================  ==================
CALIBRATION    eval         yes (unless the scale is     no: the network
                            fixed)                       computes in float
QAT            train        yes (unless the scale is     yes, scale follows
                            fixed)                       the observer
VALIDATION     eval         no                           yes, frozen scales
=============  ===========  ===========================  ==================

Weight quantizers follow the same table. In CALIBRATION they observe the (constant) weights, so
that every weight has a scale when VALIDATION starts, and the weights are *not* fake-quantized:
the whole network computes in float, exactly like the float model after BN folding.

Entering VALIDATION computes each scale once from its observer (``calculate_qparams``) and caches
it in the ``scale`` buffer; a quantizer whose observer has seen no data makes the switch fail with
a :class:`CalibrationError` that names it. A *fixed* scale (``fix_scale()`` / ``load_scale()``)
is never touched by its observer again -- the same as an averaging constant of 0 after
calibration -- which is how activation scales are frozen for QAT (``docs/methods.md#fixed-or-free-feature-map-scales``).
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict

import torch
from torch import nn

from calibkit.errors import CalibrationError, PrepareError, StateError
from calibkit.quant.quantizer_config import CONFIG_KEY, CONFIG_PARAMS, check_config, decode_config, encode_config
from calibkit.quant.observers import ObserverBase, get_observer_class
from calibkit.quant.numerics import fake_quantize

_UNSET = object()


class FakeQuantState(enum.Enum):
    """The three states of a prepared model (see the module docstring for the table)."""

    CALIBRATION = "calibration"
    QAT = "qat"
    VALIDATION = "validation"

    @property
    def needs_training_mode(self) -> bool:
        return self is FakeQuantState.QAT

    @property
    def observes(self) -> bool:
        return self is not FakeQuantState.VALIDATION

    @property
    def fake_quantizes(self) -> bool:
        return self is not FakeQuantState.CALIBRATION


class FakeQuantize(nn.Module):
    """Observer + round-clamp-rescale on one tensor.

    Args:
        observer: an observer name (e.g. ``"min_max"``, ``"mse"``), an ``ObserverBase`` subclass,
            or an observer instance (then ``bits`` / ``ch_axis`` / kwargs come from it and must
            not be given).
        bits: bit width of the signed symmetric grid, 2..16 (default 8).
        ch_axis: ``None`` (default) for one scale per tensor, else the channel axis (weights: 0).
        **observer_kwargs: passed to the observer class (e.g. ``averaging_constant=0.01``).

    Buffers (saved in ``state_dict``): ``scale`` (float32, ``[]`` or ``[C]``; NaN until computed),
    ``observer_enabled`` / ``fake_quant_enabled`` / ``fixed`` (uint8 flags). A new quantizer
    observes and passes values through unchanged (the CALIBRATION behaviour).

    Attributes set by ``prepare``: ``quantizer_name`` (readable name, e.g. ``"layer1.0.conv1.out"``),
    ``kind`` (``"activation"`` or ``"weight"``).
    """

    def __init__(self, observer: str | type[ObserverBase] | ObserverBase = "min_max", bits: int | None = None,
                 ch_axis=_UNSET, **observer_kwargs):
        super().__init__()
        if isinstance(observer, ObserverBase):
            if bits is not None or ch_axis is not _UNSET or observer_kwargs:
                raise ValueError("FakeQuantize(observer=<instance>) takes bits, ch_axis and observer settings from the "
                                 "instance: do not pass bits=, ch_axis= or observer kwargs as well")
            self.observer = observer
        else:
            cls = get_observer_class(observer)
            self.observer = cls(bits=8 if bits is None else bits,
                                ch_axis=None if ch_axis is _UNSET else ch_axis, **observer_kwargs)
        self.bits: int = self.observer.bits
        self.ch_axis: int | None = self.observer.ch_axis
        self.quantizer_name: str = ""
        self.kind: str = "activation"
        self.register_buffer("scale", torch.tensor(float("nan")))
        self.register_buffer("observer_enabled", torch.tensor(1, dtype=torch.uint8))
        self.register_buffer("fake_quant_enabled", torch.tensor(0, dtype=torch.uint8))
        self.register_buffer("fixed", torch.tensor(0, dtype=torch.uint8))
        # Python mirrors of the flags: reading a CUDA buffer in forward would synchronize the device.
        self._observe, self._fake_quant, self._fixed = True, False, False
        self._scale_ready = False  # scale buffer holds a valid scale
        self._scale_stale = False  # observer saw data since the scale was last computed
        self.state: FakeQuantState | None = None

    # -- flags ----------------------------------------------------------------------------------
    @property
    def is_fixed(self) -> bool:
        """True when the scale is fixed (``fix_scale`` / ``load_scale``): observers no longer change it."""
        return self._fixed

    @property
    def observing(self) -> bool:
        return self._observe

    @property
    def fake_quantizing(self) -> bool:
        return self._fake_quant

    def enable_observer(self, enabled: bool = True) -> "FakeQuantize":
        """Turn statistic collection on/off (a fixed quantizer never observes)."""
        self._observe = bool(enabled) and not self._fixed
        self.observer_enabled.fill_(int(self._observe))
        return self

    def enable_fake_quant(self, enabled: bool = True) -> "FakeQuantize":
        """Turn round-clamp-rescale on/off (off: the tensor passes through unchanged, in float)."""
        self._fake_quant = bool(enabled)
        self.fake_quant_enabled.fill_(int(self._fake_quant))
        return self

    def _set_fixed(self, fixed: bool) -> None:
        self._fixed = bool(fixed)
        self.fixed.fill_(int(self._fixed))
        if self._fixed:
            self.enable_observer(False)

    # -- scales ---------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return self.quantizer_name or f"{type(self).__name__}({self.observer.name or type(self.observer).__name__})"

    def _set_scale(self, scale: torch.Tensor) -> None:
        self.scale = scale.detach().to(device=self.scale.device, dtype=torch.float32).clone()
        self._scale_ready, self._scale_stale = True, False

    def compute_scale(self) -> torch.Tensor:
        """Compute the scale from the observer and cache it in ``scale`` (float32, ``[]`` or ``[C]``).

        A fixed scale is returned unchanged. Raises ``CalibrationError`` naming this quantizer when
        the observer has no data (or cannot produce a scale).
        """
        if self._fixed:
            return self.scale
        try:
            scale = self.observer.calculate_qparams()
        except CalibrationError as e:
            raise CalibrationError(f"quantizer {self.label!r}: {e}") from e
        self._set_scale(scale)
        return self.scale

    def validation_scale(self) -> torch.Tensor:
        """The scale VALIDATION uses: the fixed scale, else the cached one if the observer saw nothing
        new since it was computed, else a fresh ``compute_scale()``."""
        if self._fixed or (self._scale_ready and not self._scale_stale):
            return self.scale
        return self.compute_scale()

    def fix_scale(self) -> "FakeQuantize":
        """Freeze the current scale: the observer stops updating it (equivalent to averaging constant 0
        from now on). The scale is computed from the observer first if it has not been yet."""
        if not self._fixed:
            self.validation_scale()
        self._set_fixed(True)
        return self

    def unfix_scale(self) -> "FakeQuantize":
        """Let the observer drive the scale again (takes effect at the next ``set_fake_quantize``)."""
        self._set_fixed(False)
        self._scale_stale = True
        return self

    def load_scale(self, scale: torch.Tensor | float) -> "FakeQuantize":
        """Use a given scale (float > 0, finite; shape ``[]``, or ``[C]`` for a per-channel quantizer)
        and fix it, so observers never overwrite it."""
        s = torch.as_tensor(scale, dtype=torch.float32).detach()
        if s.dim() > 1 or (s.dim() == 1 and self.ch_axis is None):
            raise ValueError(f"scale of shape {tuple(s.shape)} does not fit quantizer {self.label!r}: "
                             f"use a scalar{' or a [C] vector' if self.ch_axis is not None else ''}")
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise ValueError(f"scale={s.tolist()} is out of range for quantizer {self.label!r}: use finite values > 0")
        self._set_scale(s)
        self._set_fixed(True)
        return self

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observe:
            self.observer(x.detach())
            self._scale_stale = True
        if not self._fake_quant:
            return x
        if self._observe:  # QAT: the scale follows the observer
            self._set_scale(self.observer.calculate_qparams())
        elif not self._scale_ready:
            raise CalibrationError(f"quantizer {self.label!r} has no scale: calibrate the model and call "
                                   "set_fake_quantize(model, FakeQuantState.VALIDATION), or load_scale()")
        return fake_quantize(x, self.scale, self.bits, self.ch_axis)

    # -- state_dict -----------------------------------------------------------------------------
    def config(self) -> dict:
        """This quantizer's configuration: ``{"observer": name, "bits", "ch_axis", "params": {...}}`` (the observer
        settings among averaging_constant / percentile / bins / stride / update_interval it has). Saved beside the
        scale (``state_dict`` key ``<prefix>config``) and compared when a state is loaded."""
        ob = self.observer
        params = {k: getattr(ob, k) for k in CONFIG_PARAMS if isinstance(getattr(ob, k, None), (bool, int, float, str))}
        return {"observer": ob.name or type(ob).__name__, "bits": int(self.bits), "ch_axis": self.ch_axis,
                "params": params}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + CONFIG_KEY] = encode_config(self.config())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, *args):
        if prefix + CONFIG_KEY in state_dict:  # files without it (older calibkit) are loaded unchecked
            check_config(self.config(), decode_config(state_dict[prefix + CONFIG_KEY]), self.label)
        key = prefix + "scale"
        if key in state_dict and state_dict[key].shape != self.scale.shape:
            self.scale = torch.empty_like(state_dict[key], device=self.scale.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, *args)
        if prefix + CONFIG_KEY in unexpected_keys:
            unexpected_keys.remove(prefix + CONFIG_KEY)
        self._observe = bool(self.observer_enabled.item())
        self._fake_quant = bool(self.fake_quant_enabled.item())
        self._fixed = bool(self.fixed.item())
        self._scale_ready = bool(torch.isfinite(self.scale).all()) and bool((self.scale > 0).all())
        self._scale_stale = True  # the observer statistics may be newer than the saved scale
        if self._fixed and not self._scale_ready:
            raise CalibrationError(f"quantizer {self.label!r}: the state_dict marks its scale fixed but holds no valid scale")

    def extra_repr(self) -> str:
        name = f"name={self.quantizer_name!r}, " if self.quantizer_name else ""
        return (f"{name}bits={self.bits}, ch_axis={self.ch_axis}, observe={self._observe}, "
                f"fake_quant={self._fake_quant}, fixed={self._fixed}")


# -- model-level helpers ---------------------------------------------------------------------------
def named_quantizers(model: nn.Module) -> "OrderedDict[str, FakeQuantize]":
    """Every ``FakeQuantize`` of ``model`` by readable name, in execution order for prepared models.

    Names are those given by ``prepare`` (``"input"``, ``"layer1.0.conv1.weight"``,
    ``"layer1.0.conv1.out"``, ``"layer1.0.add.out"``, ...); a quantizer without one is listed under
    its module path.
    """
    out: OrderedDict[str, FakeQuantize] = OrderedDict()
    seen: set[int] = set()

    def add(path: str, fq: FakeQuantize) -> None:
        if id(fq) not in seen:
            seen.add(id(fq))
            out[fq.quantizer_name or path] = fq

    graph = getattr(model, "graph", None)
    if isinstance(graph, torch.fx.Graph):
        modules = dict(model.named_modules())
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            m = modules.get(node.target)
            if isinstance(m, FakeQuantize):
                add(node.target, m)
            else:
                for sub_path, sub in m.named_modules() if m is not None else ():
                    if isinstance(sub, FakeQuantize):
                        add(f"{node.target}.{sub_path}", sub)
    for path, m in model.named_modules():
        if isinstance(m, FakeQuantize):
            add(path, m)
    return out


def require_quantizers(model: nn.Module) -> "OrderedDict[str, FakeQuantize]":
    """The quantizers of a prepared ``model`` by name; ``PrepareError`` if it has none (``TypeError`` if no module)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    qs = named_quantizers(model)
    if not qs:
        raise PrepareError(f"{type(model).__name__} has no FakeQuantize modules: call calibkit.quant.prepare(model, ...) first")
    return qs


def _as_state(state) -> FakeQuantState:
    if isinstance(state, FakeQuantState):
        return state
    if isinstance(state, str):
        for s in FakeQuantState:
            if state.lower() in (s.value, s.name.lower()):
                return s
    raise ValueError(f"state={state!r} is unknown: use one of {[f'FakeQuantState.{s.name}' for s in FakeQuantState]}")


def ready_scales(qs, context: str = "quantizers are not calibrated") -> None:
    """Compute (and cache) the scale of every quantizer in ``qs`` (name -> FakeQuantize); one
    ``CalibrationError`` starting with ``context`` lists every quantizer that has no data."""
    missing = []
    for name, fq in qs.items():
        try:
            fq.validation_scale()
        except CalibrationError as e:
            missing.append(f"{name} ({e.__cause__ or e})")
    if missing:
        raise CalibrationError(f"{context}: {len(missing)} quantizer(s) have no scale -- "
                               "run calibration batches (calibkit.quant.calibrate) first:\n  " + "\n  ".join(missing))


def set_fake_quantize(model: nn.Module, state: FakeQuantState | str) -> nn.Module:
    """Put every quantizer of ``model`` into ``state`` (table in the module docstring); returns ``model``.

    The model mode must already match: ``model.eval()`` for CALIBRATION and VALIDATION,
    ``model.train()`` for QAT -- otherwise ``StateError`` (the mode is never switched silently).
    VALIDATION computes all scales first and fails with ``CalibrationError`` listing every
    quantizer without data, leaving the model unchanged.
    """
    state = _as_state(state)
    qs = require_quantizers(model)
    if model.training != state.needs_training_mode:
        need, call = ("train", "model.train()") if state.needs_training_mode else ("eval", "model.eval()")
        have = "train" if model.training else "eval"
        raise StateError(f"FakeQuantState.{state.name} needs the model in {need} mode but it is in {have} mode: "
                         f"call {call} first")
    if state is FakeQuantState.VALIDATION:
        from calibkit.quant.snapshot import all_or_nothing  # snapshot builds on this module

        with all_or_nothing(model, parameters=False):  # a failure leaves no scale half computed
            ready_scales(qs, "cannot enter FakeQuantState.VALIDATION")
    for fq in qs.values():
        fq.enable_observer(state.observes)
        fq.enable_fake_quant(state.fake_quantizes)
        fq.state = state
    return model


def get_fake_quantize_state(model: nn.Module) -> FakeQuantState | None:
    """The state last set by ``set_fake_quantize`` (``None`` if never set or mixed)."""
    states = {fq.state for fq in require_quantizers(model).values()}
    return states.pop() if len(states) == 1 else None


def fix_activation_scales(model: nn.Module) -> list[str]:
    """Fix the scale of every activation quantizer (weights keep following their observers), the
    setting (``docs/methods.md#fixed-or-free-feature-map-scales``) for starting QAT from calibration. Returns the names fixed.

    Scales are computed from the observers first where needed; if one has no data, one ``CalibrationError``
    lists them all and no scale is fixed (all or nothing).
    """
    from calibkit.quant.snapshot import all_or_nothing  # snapshot builds on this module

    acts = {name: fq for name, fq in require_quantizers(model).items() if fq.kind != "weight"}
    with all_or_nothing(model, parameters=False):
        ready_scales(acts, "cannot fix the activation scales")
        for fq in acts.values():
            fq.fix_scale()
    return list(acts)


def reset_observers(model: nn.Module) -> None:
    """Forget all statistics (not fixed scales), e.g. before calibrating again with new data."""
    for fq in require_quantizers(model).values():
        fq.observer.reset()
        if not fq.is_fixed:
            fq._scale_stale = True
            fq._scale_ready = False
            fq.scale = torch.full_like(fq.scale, math.nan)
