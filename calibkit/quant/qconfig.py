"""Quantization configs: which observer and parameters each quantizer of a prepared model uses.

A :class:`QuantSpec` describes one quantizer (observer + bit width + channel axis + observer
kwargs); a :class:`QConfig` pairs the spec for activations with the one for weights, like
``torch.ao.quantization.QConfig``. ``prepare(model, qconfig, example_inputs, overrides=...)``
applies the global qconfig and per-op overrides.

Override keys and priority (highest first):

1. **quantizer name** -- a name from ``named_quantizers(prepared)``, e.g. ``"layer1.0.conv1.out"``,
   ``"layer1.0.add.out"``, ``"fc.weight"``, ``"input"``; value: ``QuantSpec`` (or ``QConfig``,
   whose ``activation``/``weight`` part is used according to the quantizer's kind).
2. **module name** -- a module path of the float model, e.g. ``"layer3"`` or ``"layer1.0.conv1"``;
   applies to every quantizer of ops inside that module (the longest matching path wins);
   value: ``QConfig``.
3. **module type** -- an ``nn.Module`` subclass, e.g. ``nn.Linear`` or ``BasicBlock``; applies to
   ops that are such a module or lie inside one (the innermost match wins); value: ``QConfig``.
4. the **global** qconfig.

In a ``QConfig`` override a field left ``None`` falls through to the next level, so
``QConfig(activation=QuantSpec("percentile", percentile=99.9))`` changes only activations.
A key that matches nothing raises ``ValueError`` listing the closest names (difflib).

**Keeping a module in float**: ``overrides={"blocks.3.attn": KEEP_FLOAT}`` or ``{nn.LayerNorm: KEEP_FLOAT}``
(module name or type keys only). ``prepare`` does not trace into such a module (so Python control flow on
tensor values inside it is fine), quantizes none of its weights or inner ops, and quantizes only its output,
so that the ops after it stay integer; ``convert`` runs it in float between a dequantize and a quantize.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from calibkit.quant.observers import ObserverBase, get_observer_class
from calibkit.quant.numerics import check_bits


class _KeepFloat:
    """The override value that keeps a module in float (see the module docstring); use :data:`KEEP_FLOAT`."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "KEEP_FLOAT"

    def __reduce__(self):
        return (_KeepFloat, ())


#: Override value: keep that module (by name or type) in float; ``prepare`` treats it as one opaque op.
KEEP_FLOAT = _KeepFloat()


def float_modules(model: nn.Module, overrides: Mapping | None) -> tuple[set[str], dict]:
    """Split ``overrides`` into the module paths of ``model`` kept in float (``KEEP_FLOAT`` keys, validated: a
    name must be a module of the model, a type must occur in it) and the remaining overrides."""
    kept, rest = set(), {}
    modules = dict(model.named_modules())
    for key, value in dict(overrides or {}).items():
        if value is not KEEP_FLOAT:
            rest[key] = value
        elif isinstance(key, type) and issubclass(key, nn.Module):
            found = {p for p, m in modules.items() if p and isinstance(m, key)}
            if not found:
                raise ValueError(f"override key {key.__name__}: KEEP_FLOAT matches no submodule of that type; types "
                                 f"present: {sorted({type(m).__name__ for m in modules.values()})[:20]}")
            kept |= found
        elif isinstance(key, str) and key:
            if key not in modules:
                raise ValueError(f"override key {key!r}: KEEP_FLOAT needs a submodule name of the model"
                                 f"{_close(key, [p for p in modules if p])}")
            kept.add(key)
        else:
            raise TypeError(f"KEEP_FLOAT override keys must be submodule names (str) or nn.Module subclasses, "
                            f"got {key!r}")
    # a module inside a kept module is not traced anyway: keep the outermost paths only
    kept = {p for p in kept if not any(p.startswith(o + ".") for o in kept)}
    return kept, rest


@dataclass(frozen=True)
class QuantSpec:
    """One quantizer's settings.

    Args:
        observer: observer name (``"min_max"``, ``"mse"``, ``"percentile"``, ...) or class.
        bits: bit width, 2..16 (default 8).
        ch_axis: ``None`` = per tensor (activations); ``0`` = per output channel (weights).
        kwargs: extra observer arguments, e.g. ``{"averaging_constant": 0.01}``.

    The observer is resolved and instantiated once at construction, so bad names or parameters fail
    here with the observer's own message.
    """

    observer: Any = "min_max"
    bits: int = 8
    ch_axis: int | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "observer", get_observer_class(self.observer))
        check_bits(self.bits)
        if self.kwargs is None:
            object.__setattr__(self, "kwargs", {})
        if not isinstance(self.kwargs, Mapping):
            raise TypeError(f"kwargs must be a dict of observer arguments, got {type(self.kwargs).__name__}")
        for k in ("bits", "ch_axis"):
            if k in self.kwargs:
                raise ValueError(f"kwargs contains {k!r}: pass {k}= to QuantSpec directly")
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        self.create_observer()  # validate now, not in the middle of prepare

    def create_observer(self) -> ObserverBase:
        return self.observer(bits=self.bits, ch_axis=self.ch_axis, **self.kwargs)

    def create(self):
        """A new ``FakeQuantize`` with this spec."""
        from calibkit.quant.fake_quantize import FakeQuantize
        return FakeQuantize(self.create_observer())

    def __repr__(self) -> str:
        name = getattr(self.observer, "name", "") or self.observer.__name__
        kw = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"QuantSpec({name!r}, bits={self.bits}, ch_axis={self.ch_axis}{kw})"

    def __hash__(self):
        return hash((self.observer, self.bits, self.ch_axis, tuple(sorted(self.kwargs.items()))))


@dataclass(frozen=True)
class QConfig:
    """Specs for activations and weights. In overrides, ``None`` means "inherit from the next level"."""

    activation: QuantSpec | None = None
    weight: QuantSpec | None = None

    def __post_init__(self):
        for k in ("activation", "weight"):
            v = getattr(self, k)
            if v is not None and not isinstance(v, QuantSpec):
                raise TypeError(f"QConfig.{k} must be a QuantSpec or None, got {type(v).__name__}")

    def spec_for(self, kind: str) -> QuantSpec | None:
        return self.weight if kind == "weight" else self.activation


def get_default_qconfig(activation_observer: Any = "mse", weight_observer: Any = "min_max",
                        activation_kwargs: Mapping[str, Any] | None = None, weight_kwargs: Mapping[str, Any] | None = None,
                        activation_bits: int = 8, weight_bits: int = 8) -> QConfig:
    """The recommended qconfig: activations per tensor with ``activation_observer`` (default ``"mse"``),
    weights per output channel (``ch_axis=0``) with ``weight_observer`` (default ``"min_max"``).

    Observers are names or ``ObserverBase`` subclasses; ``*_kwargs`` go to the observer
    (``weight_kwargs`` may set ``ch_axis``, e.g. ``None`` for per-tensor weights).
    """
    wk = dict(weight_kwargs or {})
    w_axis = wk.pop("ch_axis", 0)
    ak = dict(activation_kwargs or {})
    a_axis = ak.pop("ch_axis", None)
    return QConfig(activation=QuantSpec(activation_observer, activation_bits, a_axis, ak),
                   weight=QuantSpec(weight_observer, weight_bits, w_axis, wk))


@dataclass
class QuantizerSite:
    """Where a quantizer sits (filled by ``prepare``; used to resolve its spec).

    ``name``: readable quantizer name; ``kind``: ``"activation"`` or ``"weight"``; ``module_path``:
    module path of the op in the float model (``""`` for top-level functions, the model input);
    ``scopes``: enclosing module paths with their types, outermost first, including the op's own
    module for module ops.
    """

    name: str
    kind: str
    module_path: str
    scopes: list[tuple[str, type]]


def _close(key: str, candidates) -> str:
    m = difflib.get_close_matches(key, list(candidates), n=5, cutoff=0.5)
    return f"; close matches: {m}" if m else ""


def resolve_specs(sites: list[QuantizerSite], qconfig: QConfig, overrides: Mapping | None,
                  module_names: set[str]) -> dict[str, QuantSpec]:
    """Spec for every site according to the priority in the module docstring.

    ``module_names``: all module paths of the (float) model, used to validate module-name keys.
    Raises ``ValueError`` for keys that match nothing and ``TypeError`` for bad values.
    """
    if not isinstance(qconfig, QConfig) or qconfig.activation is None or qconfig.weight is None:
        raise TypeError("qconfig must be a QConfig with both activation and weight specs, e.g. get_default_qconfig()")
    overrides = dict(overrides or {})
    by_quantizer: dict[str, QuantSpec | QConfig] = {}
    by_module: dict[str, QConfig] = {}
    by_type: dict[type, QConfig] = {}
    site_names = {s.name for s in sites}
    types_present = {t for s in sites for _, t in s.scopes}
    scoped = {p for s in sites for p, _ in s.scopes if p}
    for key, value in overrides.items():
        if isinstance(key, type) and issubclass(key, nn.Module):
            if not isinstance(value, QConfig):
                raise TypeError(f"override for module type {key.__name__} must be a QConfig, got {type(value).__name__}")
            if key not in types_present and not any(issubclass(t, key) for t in types_present):
                raise ValueError(f"override key {key.__name__}: no quantized op is (inside) a module of that type; "
                                 f"types present: {sorted({t.__name__ for t in types_present})}")
            by_type[key] = value
        elif isinstance(key, str):
            if key in site_names:
                if not isinstance(value, (QuantSpec, QConfig)):
                    raise TypeError(f"override for quantizer {key!r} must be a QuantSpec or QConfig, got {type(value).__name__}")
                by_quantizer[key] = value
            elif key in scoped:
                if not isinstance(value, QConfig):
                    raise TypeError(f"override for module {key!r} must be a QConfig, got {type(value).__name__}")
                by_module[key] = value
            elif key in module_names:
                raise ValueError(f"override key {key!r}: that module has no quantizer of its own (a BatchNorm folded into "
                                 f"its conv, a shape-only op such as flatten/dropout/max-pool, or unused){_close(key, scoped)}")
            else:
                raise ValueError(f"override key {key!r} matches no quantizer name and no module name"
                                 f"{_close(key, site_names | module_names)}")
        else:
            raise TypeError(f"override keys must be quantizer/module names (str) or nn.Module subclasses, got {key!r}")

    specs = {}
    for s in sites:
        chain: list[QuantSpec | QConfig] = []
        if s.name in by_quantizer:
            chain.append(by_quantizer[s.name])
        paths = [p for p, _ in s.scopes if p in by_module]
        chain += [by_module[p] for p in sorted(paths, key=len, reverse=True)]
        for _, t in reversed(s.scopes):
            chain += [v for k, v in sorted(by_type.items(), key=lambda kv: kv[0] is not t) if issubclass(t, k)]
        chain.append(qconfig)
        for c in chain:
            spec = c if isinstance(c, QuantSpec) else c.spec_for(s.kind)
            if spec is not None:
                specs[s.name] = spec
                break
    return specs
