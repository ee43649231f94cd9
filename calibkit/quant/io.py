"""Saving and loading prepared models (their calibration or QAT state).

A prepared model is rebuilt by ``prepare`` from its float model and qconfig; the file holds what
calibration and training changed: the ``state_dict`` (weights, scales, observer statistics, flags), the
quantizer names (to refuse a file from a model prepared differently) and the caller's ``meta``. Each quantizer's
configuration travels inside the ``state_dict`` (:mod:`calibkit.quant.quantizer_config`), so loading the state
refuses another configuration, naming the first difference. Files are written atomically (:func:`calibkit.files.atomic_torch_save`) and read with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from calibkit.errors import CheckpointError
from calibkit.files import atomic_torch_save
from calibkit.quant.fake_quantize import require_quantizers
from calibkit.quant.snapshot import all_or_nothing

__all__ = ["save_prepared", "load_prepared", "PREPARED_FORMAT", "FORMAT_VERSION"]

PREPARED_FORMAT = "calibkit-prepared"
#: 2: quantizer configurations saved beside the scales (version 1 files, without them, still load)
FORMAT_VERSION = 2


def save_prepared(path: str | Path, model: nn.Module, meta: dict | None = None) -> Path:
    """Save a prepared model's ``state_dict`` (weights, scales, observer statistics, flags, each quantizer's
    configuration), its quantizer names and ``meta`` to ``path`` atomically (temporary file +
    ``os.replace``). ``meta`` must hold only what ``weights_only`` loading reads back (dicts, lists, str, numbers,
    tensors). Returns the path."""
    qs = require_quantizers(model)
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict or None, got {type(meta).__name__}")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"format": PREPARED_FORMAT, "format_version": FORMAT_VERSION, "state_dict": state,
               "quantizers": list(qs), "meta": dict(meta or {})}
    return atomic_torch_save(payload, path)


def _read(path: Path, map_location) -> dict:
    """The payload at ``path``, read with ``weights_only=True`` and checked field by field (``CheckpointError``)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint path={str(path)!r} does not exist (or is not a file)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError (code in the file), EOFError / RuntimeError (truncated, garbage), ...
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable (corrupt, truncated, not a torch file, or it "
                              f"holds objects other than tensors and plain data): {type(e).__name__}: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != PREPARED_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a prepared-model checkpoint (no format={PREPARED_FORMAT!r} marker)")
    if payload.get("format_version", 1) not in (1, FORMAT_VERSION):
        raise CheckpointError(f"checkpoint {str(path)!r} has format_version={payload.get('format_version')!r}; "
                              f"this calibkit reads versions 1 and {FORMAT_VERSION}")
    for key, kind in (("state_dict", dict), ("quantizers", list), ("meta", dict)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"checkpoint {str(path)!r} is damaged: field {key!r} is missing or not a {kind.__name__}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["state_dict"].items()):
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: state_dict must map names to tensors")
    if not all(isinstance(n, str) for n in payload["quantizers"]):
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: quantizers must be a list of names")
    return payload


def _check_fits(path: Path, payload: dict, qs) -> None:
    """The saved quantizers must be this model's, in order (their configurations are checked as the state loads)."""
    names = list(qs)
    if payload["quantizers"] != names:
        saved = payload["quantizers"]
        i = next((i for i, (a, b) in enumerate(zip(saved, names)) if a != b), min(len(saved), len(names)))
        raise CheckpointError(
            f"checkpoint {str(path)!r} was saved from a model with other quantizers: {len(saved)} saved, {len(names)} "
            f"here; first difference at position {i}: saved {saved[i] if i < len(saved) else '<none>'!r}, this model "
            f"{names[i] if i < len(names) else '<none>'!r}. Prepare the model with the same float model and qconfig")


def load_prepared(path: str | Path, model: nn.Module) -> dict:
    """Load a checkpoint written by :func:`save_prepared` into ``model`` (prepared with the same float
    model, qconfig and overrides); returns its ``meta``.

    Read with ``weights_only=True`` (a file holding code is refused, never run) and checked field by field; a
    missing, damaged or foreign file, other quantizer names, another quantizer configuration (observer, bits,
    axis, parameters: the first difference is named) or tensors that do not fit raise ``CheckpointError``. All or
    nothing: on any error the model is left as it was."""
    path = Path(path)
    qs = require_quantizers(model)
    payload = _read(path, "cpu")
    _check_fits(path, payload, qs)
    try:
        with all_or_nothing(model):
            model.load_state_dict(payload["state_dict"])
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: {e}") from e
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model: {e}") from e
    return payload["meta"]
