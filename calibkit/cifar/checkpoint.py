"""Model checkpoints with metadata, written atomically and validated on load.

File layout (a ``torch.save`` dict, loadable with ``weights_only=True``)::

    {"format": "calibkit-checkpoint", "format_version": 1,
     "arch": "cifar_resnet", "arch_kwargs": {...constructor kwargs...},
     "state_dict": {...float tensors...},
     "meta": {...caller metadata plus calibkit_version, torch_version, created (ISO 8601 UTC)...}}

``meta`` must hold only JSON-like values (str, int, float, bool, None, lists and dicts of them);
typical keys: ``data_source``, ``test_accuracy`` (0..1), ``seed``, ``profile``.
"""

import datetime
import pathlib

import torch

from calibkit.errors import CheckpointError
from calibkit.files import atomic_torch_save
from calibkit.cifar.models import ARCHITECTURES, build_model

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_meta", "reusable_checkpoint", "FORMAT", "FORMAT_VERSION"]

FORMAT = "calibkit-checkpoint"
FORMAT_VERSION = 1


def _arch_of(model) -> tuple[str, dict]:
    config = getattr(model, "config", None)
    arch = getattr(model, "arch_name", None)
    if arch not in ARCHITECTURES or not isinstance(config, dict):
        raise TypeError(f"model {type(model).__name__} cannot be checkpointed: build it with calibkit.cifar.models "
                        f"({sorted(ARCHITECTURES)}) so that its architecture and constructor kwargs are known")
    return arch, dict(config)


def _check_json_like(value, where: str):
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_json_like(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has key {k!r} of type {type(k).__name__}: meta keys must be str")
            _check_json_like(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}: meta values must be str, int, float, bool, None, "
                    "or lists / dicts of them")


def save_checkpoint(path, model, meta: dict | None = None) -> pathlib.Path:
    """Write ``model`` (a ``calibkit.cifar.models`` model) and ``meta`` to ``path`` atomically.

    The file is first written to a temporary ``<stem>.<random>.pt.tmp`` beside ``path`` and then moved
    over it with ``os.replace``, so readers never see a partial file; parent folders are created.
    ``calibkit_version``, ``torch_version`` and ``created`` are added to ``meta`` (caller keys win).
    Returns the path written.
    """
    from calibkit.version import __version__

    path = pathlib.Path(path)
    arch, arch_kwargs = _arch_of(model)
    meta = dict(meta or {})
    _check_json_like(meta, "meta")
    meta = {"calibkit_version": __version__, "torch_version": str(torch.__version__),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **meta}
    state = {k: v.detach().to("cpu", memory_format=torch.contiguous_format).clone() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": arch, "arch_kwargs": arch_kwargs,
               "state_dict": state, "meta": meta}
    return atomic_torch_save(payload, path)


def _read(path, map_location) -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint path={str(path)!r} does not exist (or is not a file)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError / ... for damaged files
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable (corrupt, truncated or not a torch file): "
                              f"{type(e).__name__}: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a calibkit checkpoint (no format={FORMAT!r} marker)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format_version={payload.get('format_version')!r}; "
                              f"this calibkit reads version {FORMAT_VERSION}")
    for key, kind in (("arch", str), ("arch_kwargs", dict), ("state_dict", dict), ("meta", dict)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"checkpoint {str(path)!r} is damaged: field {key!r} is missing or not a {kind.__name__}")
    return payload


def read_checkpoint_meta(path) -> dict:
    """The ``meta`` dict of the checkpoint at ``path`` plus ``arch`` and ``arch_kwargs`` (validated, no model built)."""
    payload = _read(path, "cpu")
    return {**payload["meta"], "arch": payload["arch"], "arch_kwargs": payload["arch_kwargs"]}


def reusable_checkpoint(path, **want) -> tuple[dict | None, str]:
    """Whether the checkpoint at ``path`` was made with exactly the settings ``want`` (keyword = meta key).

    Returns ``(meta, reason)``: ``meta`` (as :func:`read_checkpoint_meta`) when every ``want`` key is in the
    checkpoint's meta with an equal value, else ``None``; ``reason`` says why in one line (missing or
    unreadable file, or the differing keys as ``found -> wanted``). Nothing is raised for a missing file.
    """
    try:
        meta = read_checkpoint_meta(path)
    except CheckpointError as e:
        return None, f"no reusable checkpoint: {e}"
    diff = {k: (meta.get(k, "<absent>"), v) for k, v in want.items() if meta.get(k, "<absent>") != v}
    if diff:
        shown = "; ".join(f"{k}: {found!r} -> {wanted!r}" for k, (found, wanted) in diff.items())
        return None, f"checkpoint {str(path)!r} was made with other settings ({shown})"
    return meta, f"checkpoint {str(path)!r} matches {sorted(want)}"


def load_checkpoint(path, map_location="cpu", arch: str | None = None):
    """Rebuild the model saved at ``path`` and return ``(model, meta)``; the model is in eval mode.

    Args:
        map_location: device for the tensors (default CPU).
        arch: if given, the architecture name the caller expects; a different one raises ``CheckpointError``.
    Raises ``CheckpointError`` for a missing, corrupt or truncated file, a file that is not a calibkit checkpoint,
    an unknown or unexpected architecture, or weights that do not fit the rebuilt model.
    ``meta`` also holds ``arch`` and ``arch_kwargs``.
    """
    payload = _read(path, map_location)
    name = payload["arch"]
    if arch is not None and name != arch:
        raise CheckpointError(f"checkpoint {str(path)!r} holds arch={name!r}, expected arch={arch!r}")
    if name not in ARCHITECTURES:
        raise CheckpointError(f"checkpoint {str(path)!r} has unknown arch={name!r}: known are {sorted(ARCHITECTURES)}")
    try:
        model = build_model(name, **payload["arch_kwargs"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: cannot build {name} from arch_kwargs="
                              f"{payload['arch_kwargs']!r}: {e}") from e
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: weights do not match {name}({payload['arch_kwargs']}): {e}") from e
    model.to(map_location).eval()
    return model, {**payload["meta"], "arch": name, "arch_kwargs": payload["arch_kwargs"]}
