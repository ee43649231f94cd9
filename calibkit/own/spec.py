"""Build a model from a spec string: ``"package.module:callable"`` plus keyword arguments and weights.

``load_model("torchvision.models:resnet18", {"num_classes": 10}, "w.pt")`` imports ``torchvision.models``,
calls ``resnet18(num_classes=10)``, loads the ``state_dict`` in ``w.pt`` (``torch.load(weights_only=True)``,
strict: every key present, none extra, every shape equal) and returns the model in eval mode.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from calibkit.errors import CheckpointError, ModelSpecError

SPEC_FORM = "'package.module:callable' (for example 'torchvision.models:resnet18' or 'mypkg.nets:build')"
_SPEC_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_SHOWN_KEYS = 5


def resolve_spec(spec: str) -> Any:
    """Return the callable named by ``spec`` = ``"module.path:attr[.attr]"``; ModelSpecError otherwise."""
    if not isinstance(spec, str) or not _SPEC_RE.match(spec.strip()):
        raise ModelSpecError(f"model spec {spec!r} does not parse; expected {SPEC_FORM}")
    module_name, attr_path = spec.strip().split(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"model spec {spec!r}: cannot import module {module_name!r} ({exc}); "
                             f"expected {SPEC_FORM}") from exc
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ModelSpecError(f"model spec {spec!r}: {obj.__name__ if hasattr(obj, '__name__') else obj!r} "
                                 f"has no attribute {attr!r}; expected {SPEC_FORM}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ModelSpecError(f"model spec {spec!r} names {type(obj).__name__}, not a callable; "
                             f"expected {SPEC_FORM}")
    return obj


def _shown(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
    return ", ".join(keys[:_SHOWN_KEYS]) + more


def _read_state_dict(weights: Path) -> Mapping[str, torch.Tensor]:
    if not weights.is_file():
        raise CheckpointError(f"weights={str(weights)!r}: no such file")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- any unpickling failure is a bad file
        raise CheckpointError(f"weights={str(weights)!r} cannot be read as a state_dict "
                              f"(weights_only=True): {exc}") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"weights={str(weights)!r} holds {type(state).__name__}, "
                              "not a state_dict (a mapping of names to tensors)")
    return state


def check_state_dict_fits(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming the first missing / unexpected / wrong-shape keys, if ``state`` does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_shown(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_shown(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_shown(shapes)}")
    if problems:
        raise CheckpointError(f"weights={source!r} do not fit the model ({type(model).__name__}): "
                              + "; ".join(problems))


def load_model(spec: str, kwargs: dict | None = None, weights: str | Path | None = None) -> nn.Module:
    """Build ``spec(**kwargs)``, load ``weights`` (a state_dict file, strict) and return it in eval mode."""
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ModelSpecError(f"kwargs must be a dict of keyword arguments for {spec!r}, "
                             f"got {type(kwargs).__name__}")
    factory = resolve_spec(spec)
    try:
        model = factory(**dict(kwargs or {}))
    except TypeError as exc:
        raise ModelSpecError(f"model spec {spec!r} cannot be called with kwargs={dict(kwargs or {})!r}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model spec {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        path = Path(weights)
        state = _read_state_dict(path)
        check_state_dict_fits(model, state, str(path))
        model.load_state_dict(state, strict=True)
    return model.eval()
