"""A quantizer's configuration (observer, bits, channel axis, observer parameters) saved beside its scale.

A prepared model's state is only meaningful for a model prepared the same way: the scales of an 8-bit ``min_max``
quantizer mean nothing to a 4-bit ``percentile`` one. Every ``FakeQuantize`` therefore writes its configuration
(:meth:`calibkit.quant.fake_quantize.FakeQuantize.config`) into its ``state_dict`` under ``<prefix>config`` (a
``uint8`` tensor of JSON text, so the state stays tensors only and loads with ``weights_only=True``), and loading
compares it first: :func:`check_config` raises ``CheckpointError`` naming the first difference.
"""

from __future__ import annotations

import json

import torch

from calibkit.errors import CheckpointError

__all__ = ["CONFIG_KEY", "CONFIG_PARAMS", "encode_config", "decode_config", "config_difference", "check_config"]

#: ``state_dict`` key (under each quantizer's prefix) of its configuration, and the observer settings it lists.
CONFIG_KEY = "config"
CONFIG_PARAMS = ("averaging_constant", "percentile", "bins", "stride", "update_interval")


def encode_config(config: dict) -> torch.Tensor:
    """A quantizer configuration as a ``uint8`` tensor of its JSON text (a ``state_dict`` holds tensors only)."""
    return torch.tensor(list(json.dumps(config, sort_keys=True).encode()), dtype=torch.uint8)


def decode_config(t) -> dict:
    """The configuration :func:`encode_config` wrote; ``CheckpointError`` if ``t`` is not one."""
    try:
        out = json.loads(bytes(t.detach().cpu().to(torch.uint8).tolist()).decode())
        if isinstance(out, dict):
            return out
    except (AttributeError, TypeError, ValueError, RuntimeError):
        pass
    raise CheckpointError(f"a quantizer configuration entry is damaged: expected the JSON bytes of a dict, got {t!r:.80}")


def config_difference(mine: dict, theirs: dict, where: str = "") -> str | None:
    """The first difference between two quantizer configurations as ``"<field>: saved X, this model Y"``, or None."""
    for k in sorted(set(mine) | set(theirs)):
        a, b = mine.get(k, "<absent>"), theirs.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            sub = config_difference(a, b, f"{where}{k}.")
            if sub:
                return sub
        elif a != b and not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)):
            return f"{where}{k}: saved {b!r}, this model {a!r}"
    return None


def check_config(mine: dict, theirs: dict, label: str) -> None:
    """``CheckpointError`` naming the first difference when a saved configuration ``theirs`` is not ``mine``."""
    diff = config_difference(mine, theirs)
    if diff:
        raise CheckpointError(f"quantizer {label!r} was saved with another configuration ({diff}): prepare the "
                              "model with the qconfig and overrides the state was saved with")
