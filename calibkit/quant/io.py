"""Saving and loading prepared models (their calibration or QAT state).

A prepared model is rebuilt by ``prepare`` from its float model and qconfig; the file holds what
calibration and training changed: the ``state_dict`` (weights, scales, observer statistics, flags), the
quantizer names (to refuse a file from a model prepared differently) and the caller's ``meta``. Files are
written atomically (:func:`calibkit.files.atomic_torch_save`) and read with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from calibkit.errors import CheckpointError
from calibkit.files import atomic_torch_save
from calibkit.devices import model_device
from calibkit.quant.fake_quantize import require_quantizers

__all__ = ["save_prepared", "load_prepared", "PREPARED_FORMAT"]

PREPARED_FORMAT = "calibkit-prepared"


def save_prepared(path: str | Path, model: nn.Module, meta: dict | None = None) -> Path:
    """Save a prepared model's ``state_dict`` (weights, scales, observer statistics, flags) and ``meta``
    to ``path`` atomically (temporary file + ``os.replace``). Returns the path."""
    qs = require_quantizers(model)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"format": PREPARED_FORMAT, "state_dict": state, "quantizers": list(qs), "meta": dict(meta or {})}
    return atomic_torch_save(payload, path)


def load_prepared(path: str | Path, model: nn.Module) -> dict:
    """Load a checkpoint written by :func:`save_prepared` into ``model`` (prepared with the same float
    model and qconfig); returns its ``meta``. Mismatches raise ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint path={str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location=model_device(model), weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable: {type(e).__name__}: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != PREPARED_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a prepared-model checkpoint (format {PREPARED_FORMAT!r})")
    names = list(require_quantizers(model))
    if payload["quantizers"] != names:
        missing = sorted(set(payload["quantizers"]) ^ set(names))[:5]
        raise CheckpointError(f"checkpoint {str(path)!r} was saved from a model with other quantizers "
                              f"(differences: {missing}): prepare the model with the same float model and qconfig")
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model: {e}") from e
    return payload["meta"]
