"""Sensitivity: what one quantizer costs in accuracy, measured with only it on or only it off
(``docs/methods.md#per-op-error``). Tensor errors from the per-op report point at candidates; this turns them into
validation accuracy, one op at a time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from calibkit.analysis.report import DebugReport
from calibkit.analysis.selection import check_quantizer_names, quantizers_disabled, quantizers_enabled_only
from calibkit.checks import check_int
from calibkit.quant.batches import require_reiterable
from calibkit.quant.calibrate import evaluate

__all__ = ["SensitivityResult", "sensitivity", "SENSITIVITY_MODES"]

SENSITIVITY_MODES = ("only_enabled", "only_disabled")


@dataclass
class SensitivityResult:
    """Result of :func:`sensitivity`.

    ``mode``: ``"only_enabled"`` (one quantizer on, the rest float: ``delta`` = float accuracy -
    accuracy, the drop that quantizer alone causes) or ``"only_disabled"`` (one quantizer off, the rest
    quantized: ``delta`` = accuracy - quantized accuracy, what leaving it in float recovers).
    ``rows``: ``{"name", "accuracy", "delta"}`` sorted by ``delta``, largest first. Accuracies are
    fractions in [0, 1].
    """

    mode: str
    float_accuracy: float
    quant_accuracy: float
    rows: list[dict]

    def table_data(self) -> dict:
        """The rows in percent as ``{"rows", "columns", "formats", "title"}``, the keyword arguments of a table
        (e.g. ``calibkit.tutorial.table.Table(**result.table_data())``)."""
        label = "drop vs float" if self.mode == "only_enabled" else "recovery vs quantized"
        rows = [{"name": r["name"], "accuracy": 100 * r["accuracy"], label: 100 * r["delta"]} for r in self.rows]
        return {"rows": rows, "columns": ["name", "accuracy", label], "formats": {"accuracy": ".2f", label: "+.2f"},
                "title": f"sensitivity ({self.mode}); float {100 * self.float_accuracy:.2f} %, "
                         f"quantized {100 * self.quant_accuracy:.2f} %"}


def _candidate_names(candidates: DebugReport | Sequence[str], top_k: int | None) -> list[str]:
    if isinstance(candidates, DebugReport):
        return candidates.worst(top_k if top_k is not None else len(candidates.ops))
    if isinstance(candidates, str):
        candidates = [candidates]
    return list(candidates)[:top_k]


def _top1(model: nn.Module, images, labels, batch_size: int) -> float:
    """Top-1 accuracy on tensors or a loader (``float`` of an :class:`~calibkit.quant.calibrate.Accuracy`)."""
    return float(evaluate(model, images, labels, batch_size, progress=False))


def sensitivity(model: nn.Module, candidates: DebugReport | Sequence[str], images, labels: torch.Tensor | None = None,
                top_k: int | None = 5, mode: str = "only_enabled", batch_size: int = 500,
                progress: bool = True) -> SensitivityResult:
    """Accuracy effect of single quantizers (see :class:`SensitivityResult`).

    Args:
        model: prepared, calibrated model in eval mode.
        candidates: a :class:`~calibkit.analysis.report.DebugReport` (its ``top_k`` worst rows) or a list of
            quantizer names (the first ``top_k``; ``None`` = all).
        images, labels: validation data for :func:`calibkit.quant.calibrate.evaluate`: tensors, or a ``DataLoader``
            (any re-iterable) of ``(inputs, labels)`` pairs with ``labels=None``; accuracies are top-1.
        mode: ``"only_enabled"`` or ``"only_disabled"``.
        progress: a progress bar over the candidates.
    The model's flags are restored afterwards.
    """
    if mode not in SENSITIVITY_MODES:
        raise ValueError(f"mode={mode!r} is unknown: use one of {list(SENSITIVITY_MODES)}")
    if top_k is not None:
        check_int("top_k", top_k, 1)
    names = _candidate_names(candidates, top_k)
    if not names:
        raise ValueError("candidates is empty: give at least one quantizer name")
    check_quantizer_names(model, names, "candidates")
    if labels is None:
        require_reiterable(images, "images")
    with quantizers_enabled_only(model, []):
        float_acc = _top1(model, images, labels, batch_size)
    with quantizers_disabled(model, []):
        quant_acc = _top1(model, images, labels, batch_size)
    only = quantizers_enabled_only if mode == "only_enabled" else quantizers_disabled
    rows = []
    for name in tqdm(names, desc=f"sensitivity ({mode})", disable=not progress):
        with only(model, [name]):
            a = _top1(model, images, labels, batch_size)
        rows.append({"name": name, "accuracy": a, "delta": (float_acc - a) if mode == "only_enabled" else (a - quant_acc)})
    rows.sort(key=lambda r: -r["delta"])
    return SensitivityResult(mode, float_acc, quant_acc, rows)
