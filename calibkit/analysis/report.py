"""Per-op debugging of a calibrated model (spec section 5: find the few ops with the largest error).

Three tools, used in this order by notebook 05:

1. :func:`debug_report` -- for every quantizer of a prepared, calibrated model, the error of its
   quantized tensor against float, measured two ways on the same batches:

   * **accumulated**: the fully quantized model (every quantizer on, VALIDATION arithmetic) against
     the float model, compared at that point of the network. It includes every upstream error.
   * **isolated**: only that quantizer on, with the *float* tensor as input: for an activation,
     ``qdq(x_float)`` vs ``x_float``; for a weight, the op output ``op(x_float, qdq(w))`` vs
     ``op(x_float, w)``.

   Errors are SQNR in dB (``10 log10(sum x^2 / sum (x - x_hat)^2)``, higher is better), cosine
   similarity and relative L2 ``||x - x_hat|| / ||x||``, accumulated over all batches. Each row
   also holds the scale, the clipping threshold, the float range, the share of float values
   outside the representable range (clip ratio) and the observer. Rows are sorted worst first by
   ``sort_by`` (default: isolated SQNR -- accumulated SQNR falls steadily with depth, so ranking by
   it mostly ranks depth; the isolated error points at the op that *causes* the damage).
2. :func:`sensitivity` -- validation accuracy when only one candidate quantizer is on (everything
   else float) or when only it is off (everything else quantized), for the top-k candidates.
3. :func:`override_quantizers` + :func:`recalibrate` (or both at once, :func:`apply_overrides`) --
   give the worst ops their own observer / parameters by name (the same ``{name: QuantSpec}`` a
   qconfig's per-op ``overrides`` takes) and calibrate only those quantizers: every other scale
   stays bit-identical.

Plus :class:`Table` (text / HTML / CSV tables without pandas), :func:`plot_report` (bar chart) and
:func:`op_histogram` / :func:`plot_op_histogram` (the float distribution at one quantizer with its
clipping threshold).
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import html
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from calibkit.tutorial.table import Table  # TEMPORARY wrong-way import: helper B removes it
from calibkit.quant.calibrate import evaluate, model_device
from calibkit.errors import CalibrationError, StateError
from calibkit.quant.fake_quantize import FakeQuantize, FakeQuantState, _require_quantizers, named_quantizers, ready_scales, set_fake_quantize
from calibkit.quant.qconfig import QConfig, QuantSpec
from calibkit.quant.numerics import qrange, quantize_dequantize

__all__ = ["OpError", "DebugReport", "Table", "debug_report", "op_histogram", "plot_report", "plot_op_histogram",
           "SensitivityResult", "sensitivity", "quantizers_enabled_only", "quantizers_disabled",
           "override_quantizers", "recalibrate", "apply_overrides", "check_quantizer_names", "observer_label",
           "SORT_KEYS"]

#: Columns a report can be sorted by (all "higher is better" except ``*_rel_l2`` and ``clip_ratio``).
SORT_KEYS = ("isolated_sqnr_db", "accumulated_sqnr_db", "isolated_cosine", "accumulated_cosine",
             "isolated_rel_l2", "accumulated_rel_l2", "clip_ratio")
_LOWER_IS_WORSE = {"isolated_sqnr_db", "accumulated_sqnr_db", "isolated_cosine", "accumulated_cosine"}


# -- small helpers -----------------------------------------------------------------------------------
def check_quantizer_names(model: nn.Module, names: Iterable[str], param: str = "names") -> list[str]:
    """Validate quantizer names of ``model``; unknown ones raise ``ValueError`` with close matches."""
    qs = _require_quantizers(model)
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


def observer_label(fq: FakeQuantize) -> str:
    """Short readable description of a quantizer's observer, e.g. ``"mse(bits=4, c=0.01)"``."""
    ob = fq.observer
    parts = [f"bits={ob.bits}", f"c={ob.averaging_constant:g}"]
    for k in ("percentile", "bins", "stride", "update_interval"):
        if hasattr(ob, k):
            parts.append(f"{k}={getattr(ob, k):g}")
    if ob.ch_axis is not None:
        parts.append(f"ch_axis={ob.ch_axis}")
    return f"{ob.name or type(ob).__name__}({', '.join(parts)})"


def _check_k(k, name: str = "top_k") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name}={k!r} is out of range: use an integer >= 1")
    return k


@contextlib.contextmanager
def _saved_flags(model: nn.Module):
    """Restore every quantizer's observe / fake-quant flags on exit."""
    qs = named_quantizers(model)
    saved = {n: (fq.observing, fq.fake_quantizing) for n, fq in qs.items()}
    try:
        yield qs
    finally:
        for n, fq in qs.items():
            fq.enable_observer(saved[n][0])
            fq.enable_fake_quant(saved[n][1])


def _ready_scales(qs: Mapping[str, FakeQuantize]) -> None:
    ready_scales(qs, "the debug tools need a calibrated model")


def _require_eval(model: nn.Module, what: str) -> None:
    if model.training:
        raise StateError(f"{what} needs the model in eval mode: call model.eval() first")


@contextlib.contextmanager
def _fake_quantize_selected(model: nn.Module, names: Iterable[str], what: str, selected: bool):
    """Observers off, scales frozen; a quantizer fake-quantizes iff its membership in ``names`` equals
    ``selected``. Flags are restored on exit."""
    names = set(check_quantizer_names(model, names))
    _require_eval(model, what)
    with _saved_flags(model) as qs:
        _ready_scales(qs)
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


def _batches_list(batches) -> list[torch.Tensor]:
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    out = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    if not out:
        raise ValueError("batches is empty: give at least one batch of inputs")
    for b in out:
        if not isinstance(b, torch.Tensor) or not b.is_floating_point():
            raise TypeError("batches must hold normalized float input tensors (or (inputs, labels) pairs)")
    return out


# -- tables -----------------------------------------------------------------------------------------
# -- the per-op report ------------------------------------------------------------------------------
@dataclass
class OpError:
    """One quantizer's row of a :class:`DebugReport`.

    Attributes:
        name, kind (``"activation"``/``"weight"``), observer (see :func:`observer_label`), bits.
        scale: the quantizer's scale (per-channel weights: the largest channel scale).
        clip: clipping threshold ``amax = scale * (qmax - qmin) / 2`` (per-channel: the largest).
        range_min, range_max: min / max of the float tensor (weights: of the weight).
        clip_ratio: share of float values with ``|x| > amax`` (per channel for weights), in [0, 1].
        accumulated_* / isolated_*: ``sqnr_db`` (dB, ``inf`` if exact), ``cosine``, ``rel_l2``;
            for weights measured at the op output (before the activation quantizer), see the module
            docstring.
        numel: values compared per pass (summed over batches).
    """

    name: str
    kind: str
    observer: str
    bits: int
    scale: float
    clip: float
    range_min: float
    range_max: float
    clip_ratio: float
    accumulated_sqnr_db: float
    accumulated_cosine: float
    accumulated_rel_l2: float
    isolated_sqnr_db: float
    isolated_cosine: float
    isolated_rel_l2: float
    numel: int

    def as_dict(self) -> dict:
        return asdict(self)


class _ErrStats:
    """Streaming sums for SQNR / cosine / relative L2 of ``x_hat`` against reference ``x`` (float32 dot
    products per batch, summed in Python floats)."""

    def __init__(self):
        self.ref2 = self.err2 = self.hat2 = self.dot = 0.0
        self.n = 0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x, x_hat = x.detach().float().flatten(), x_hat.detach().float().flatten()
        d = x - x_hat
        self.ref2 += float(torch.dot(x, x))
        self.err2 += float(torch.dot(d, d))
        self.hat2 += float(torch.dot(x_hat, x_hat))
        self.dot += float(torch.dot(x, x_hat))
        self.n += x.numel()

    def sqnr_db(self) -> float:
        if self.err2 == 0:
            return math.inf
        if self.ref2 == 0:
            return -math.inf
        return 10 * math.log10(self.ref2 / self.err2)

    def cosine(self) -> float:
        den = math.sqrt(self.ref2 * self.hat2)
        if den == 0:
            return 1.0 if self.ref2 == self.hat2 else 0.0
        return self.dot / den

    def rel_l2(self) -> float:
        if self.ref2 == 0:
            return 0.0 if self.err2 == 0 else math.inf
        return math.sqrt(self.err2 / self.ref2)


def _scale_view(scale: torch.Tensor, x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    if scale.dim() == 0 or ch_axis is None:
        return scale.to(x.device)
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return scale.to(x.device).reshape(shape)


def _clip_threshold(fq: FakeQuantize) -> torch.Tensor:
    """``amax = scale * (qmax - qmin) / 2``, the threshold the scale stands for (``[]`` or ``[C]``)."""
    qmin, qmax = qrange(fq.bits)
    return fq.scale * ((qmax - qmin) / 2)


def _clip_count(x: torch.Tensor, fq: FakeQuantize) -> int:
    return int((x.abs() > _scale_view(_clip_threshold(fq), x, fq.ch_axis)).sum())


@dataclass
class DebugReport:
    """Result of :func:`debug_report`: ``ops`` in execution order, ``sort_by``, and the sorted view."""

    ops: list[OpError]
    sort_by: str
    batches: int
    images: int

    def sorted(self, sort_by: str | None = None, kind: str | None = None) -> list[OpError]:
        """Rows worst first by ``sort_by`` (default: the report's); ``kind`` filters activation/weight."""
        key = sort_by or self.sort_by
        if key not in SORT_KEYS:
            raise ValueError(f"sort_by={key!r} is unknown: use one of {list(SORT_KEYS)}")
        if kind not in (None, "activation", "weight"):
            raise ValueError(f"kind={kind!r} is unknown: use 'activation', 'weight' or None (both)")
        rows = [o for o in self.ops if kind is None or o.kind == kind]
        sign = 1 if key in _LOWER_IS_WORSE else -1
        return sorted(rows, key=lambda o: sign * getattr(o, key))

    def worst(self, k: int = 5, kind: str | None = None, sort_by: str | None = None) -> list[str]:
        """Names of the ``k`` worst quantizers (optionally only ``kind``)."""
        return [o.name for o in self.sorted(sort_by, kind)[:_check_k(k, "k")]]

    def __getitem__(self, name: str) -> OpError:
        for o in self.ops:
            if o.name == name:
                return o
        close = difflib.get_close_matches(name, [o.name for o in self.ops], n=5, cutoff=0.5)
        raise KeyError(f"{name!r} is not in the report{f'; close matches: {close}' if close else ''}")

    COLUMNS = ("rank", "name", "kind", "accumulated_sqnr_db", "isolated_sqnr_db", "accumulated_cosine",
               "isolated_cosine", "accumulated_rel_l2", "isolated_rel_l2", "scale", "clip", "range_min", "range_max",
               "clip_ratio", "observer")
    SHORT_COLUMNS = ("rank", "name", "kind", "accumulated_sqnr_db", "isolated_sqnr_db", "accumulated_cosine",
                     "isolated_rel_l2", "clip", "range_max", "clip_ratio", "observer")
    FORMATS = {"accumulated_sqnr_db": ".2f", "isolated_sqnr_db": ".2f", "accumulated_cosine": ".4f",
               "isolated_cosine": ".4f", "accumulated_rel_l2": ".4f", "isolated_rel_l2": ".4f", "scale": ".4g",
               "clip": ".4g", "range_min": ".4g", "range_max": ".4g", "clip_ratio": ".2e"}

    def rows(self, top: int | None = None, sort_by: str | None = None, kind: str | None = None) -> list[dict]:
        ops = self.sorted(sort_by, kind)
        if top is not None:
            ops = ops[:_check_k(top, "top")]
        return [{"rank": i + 1, **o.as_dict()} for i, o in enumerate(ops)]

    def table(self, top: int | None = 10, sort_by: str | None = None, kind: str | None = None,
              columns: Sequence[str] | None = None) -> Table:
        """The sorted report as a :class:`Table` (``top`` rows; ``None`` = all)."""
        key = sort_by or self.sort_by
        return Table(self.rows(top, key, kind), columns or self.SHORT_COLUMNS, self.FORMATS,
                     title=f"per-op error, worst first by {key} ({self.images} images)")

    def to_json_rows(self, top: int = 10, keys: Sequence[str] = ("name", "kind", "accumulated_sqnr_db",
                                                                  "isolated_sqnr_db", "clip_ratio")) -> list[dict]:
        """Plain JSON-ready rows (non-finite SQNRs become ``None``)."""
        out = []
        for r in self.rows(top):
            out.append({k: (None if isinstance(r[k], float) and not math.isfinite(r[k]) else r[k]) for k in keys})
        return out


def debug_report(model: nn.Module, batches, sort_by: str = "isolated_sqnr_db", progress: bool = True) -> DebugReport:
    """Per-quantizer error report of a prepared, calibrated ``model`` (see the module docstring).

    Args:
        model: output of ``prepare``, calibrated, in eval mode (``StateError`` otherwise).
        batches: a tensor or iterable of normalized float input batches (or ``(inputs, labels)``
            pairs), e.g. a few calibration batches. Two forward passes per batch (float, quantized)
            plus one op call per weighted layer.
        sort_by: one of ``SORT_KEYS`` (default ``"isolated_sqnr_db"``).
        progress: tqdm progress bar over the batches.

    The model's state (flags, scales, observer statistics) is unchanged afterwards.
    """
    if sort_by not in SORT_KEYS:
        raise ValueError(f"sort_by={sort_by!r} is unknown: use one of {list(SORT_KEYS)}")
    _require_eval(model, "debug_report")
    batches = _batches_list(batches)
    qs = _require_quantizers(model)
    device = model_device(model)
    # weighted modules by their weight quantizer
    weighted = {}
    for mod in model.modules():
        wfq = getattr(mod, "weight_fake_quant", None)
        if isinstance(wfq, FakeQuantize):
            weighted[id(wfq)] = mod
    acc = {n: _ErrStats() for n in qs}
    iso = {n: _ErrStats() for n in qs}
    clips = dict.fromkeys(qs, 0)
    counts = dict.fromkeys(qs, 0)
    lo = {n: math.inf for n in qs}
    hi = {n: -math.inf for n in qs}
    phase = {"p": None}
    ref: dict[str, torch.Tensor] = {}
    ref_in: dict[str, torch.Tensor] = {}
    hooks = []

    def act_hook(name):
        def hook(mod, inputs, output):
            if phase["p"] == "float":
                ref[name] = inputs[0].detach()
            elif phase["p"] == "quant":
                acc[name].add(ref[name], output)
        return hook

    def weight_hook(name):
        def hook(mod, inputs, output):
            if phase["p"] == "float":
                ref_in[name], ref[name] = inputs[0].detach(), output.detach()
            elif phase["p"] == "quant":
                acc[name].add(ref[name], output)
        return hook

    with _saved_flags(model):
        _ready_scales(qs)
        try:
            for name, fq in qs.items():
                if id(fq) in weighted:
                    hooks.append(weighted[id(fq)].register_forward_hook(weight_hook(name)))
                else:
                    hooks.append(fq.register_forward_hook(act_hook(name)))
            with torch.no_grad():
                for x in tqdm(batches, desc="debug report", disable=not progress, leave=False):
                    x = x.to(device)
                    ref.clear()
                    ref_in.clear()
                    for fq in qs.values():
                        fq.enable_observer(False)
                        fq.enable_fake_quant(False)
                    phase["p"] = "float"
                    model(x)
                    for fq in qs.values():
                        fq.enable_fake_quant(True)
                    phase["p"] = "quant"
                    model(x)
                    phase["p"] = None
                    for name, fq in qs.items():
                        if id(fq) in weighted:
                            mod = weighted[id(fq)]
                            for other in qs.values():
                                other.enable_fake_quant(other is fq)
                            iso[name].add(ref[name], mod(ref_in[name]))
                            t = mod.weight.detach()
                            if counts[name] == 0:  # the weight is the same for every batch
                                clips[name] += _clip_count(t, fq)
                                counts[name] += t.numel()
                        else:
                            t = ref[name]
                            iso[name].add(t, quantize_dequantize(t, fq.scale, fq.bits, fq.ch_axis))
                            clips[name] += _clip_count(t, fq)
                            counts[name] += t.numel()
                        lo[name] = min(lo[name], float(t.min()))
                        hi[name] = max(hi[name], float(t.max()))
        finally:
            for h in hooks:
                h.remove()
            phase["p"] = None
            ref.clear()
            ref_in.clear()

    ops = []
    for name, fq in qs.items():
        ops.append(OpError(name=name, kind=fq.kind, observer=observer_label(fq), bits=fq.bits,
                           scale=float(fq.scale.max()), clip=float(_clip_threshold(fq).max()),
                           range_min=lo[name], range_max=hi[name],
                           clip_ratio=clips[name] / max(1, counts[name]),
                           accumulated_sqnr_db=acc[name].sqnr_db(), accumulated_cosine=acc[name].cosine(),
                           accumulated_rel_l2=acc[name].rel_l2(), isolated_sqnr_db=iso[name].sqnr_db(),
                           isolated_cosine=iso[name].cosine(), isolated_rel_l2=iso[name].rel_l2(),
                           numel=acc[name].n))
    return DebugReport(ops, sort_by, len(batches), sum(int(b.shape[0]) for b in batches))


def op_histogram(model: nn.Module, name: str, batches, bins: int = 256) -> dict:
    """Histogram of the float tensor a quantizer sees (weights: the weight itself).

    Returns ``{"edges": float64 [bins+1], "counts": int64 [bins], "clip": float, "scale": float,
    "bits": int, "name": str, "numel": int}``; the range spans the data and the clipping threshold.
    """
    (name,) = check_quantizer_names(model, [name], "name")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins={bins!r} is out of range: use an integer >= 2")
    _require_eval(model, "op_histogram")
    qs = named_quantizers(model)
    fq = qs[name]
    _ready_scales({name: fq})
    if fq.kind == "weight":
        values = [next(m.weight.detach() for m in model.modules() if getattr(m, "weight_fake_quant", None) is fq)]
    else:
        values = []
        h = fq.register_forward_hook(lambda m, i, o: values.append(i[0].detach().flatten().cpu()))
        try:
            with quantizers_enabled_only(model, []), torch.no_grad():
                for x in _batches_list(batches):
                    model(x.to(model_device(model)))
        finally:
            h.remove()
    v = torch.cat([t.flatten().cpu().double() for t in values])
    clip = float(_clip_threshold(fq).max())
    lo, hi = min(float(v.min()), -clip if float(v.min()) < 0 else 0.0), max(float(v.max()), clip)
    counts = torch.histc(v, bins=bins, min=lo, max=hi).to(torch.int64)
    return {"edges": torch.linspace(lo, hi, bins + 1, dtype=torch.float64), "counts": counts, "clip": clip,
            "scale": float(fq.scale.max()), "bits": fq.bits, "name": name, "numel": v.numel()}


# -- figures ------------------------------------------------------------------------------------------
def plot_report(report: DebugReport, top: int = 15, sort_by: str | None = None, ax=None):
    """Horizontal bar chart of accumulated and isolated SQNR (dB) for the ``top`` worst quantizers."""
    import matplotlib.pyplot as plt

    rows = report.sorted(sort_by)[:_check_k(top, "top")]
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    y = torch.arange(len(rows)).double()
    cap = 80.0  # exact (inf dB) rows are drawn at the cap
    acc = [min(o.accumulated_sqnr_db, cap) for o in rows]
    iso = [min(o.isolated_sqnr_db, cap) for o in rows]
    ax.barh((y - 0.2).tolist(), acc, height=0.4, label="accumulated (whole model quantized)", color="tab:red")
    ax.barh((y + 0.2).tolist(), iso, height=0.4, label="isolated (this quantizer only)", color="tab:blue")
    ax.set_yticks(y.tolist())
    ax.set_yticklabels([o.name for o in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR (dB, higher is better)")
    ax.set_title(f"worst {len(rows)} quantizers by {sort_by or report.sort_by}")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return ax


def plot_op_histogram(hist: dict, ax=None, log: bool = True):
    """Draw the output of :func:`op_histogram` with the clipping threshold(s) marked."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    e = hist["edges"]
    ax.stairs(hist["counts"].double().clamp_min(0.5 if log else 0).numpy(), e.numpy(), fill=True, alpha=0.6)
    for c in (hist["clip"], -hist["clip"]):
        if e[0] <= c <= e[-1]:
            ax.axvline(c, color="tab:red", ls="--", lw=1)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("value")
    ax.set_ylabel("count")
    ax.set_title(f"{hist['name']}: {hist['numel']} values, clip ±{hist['clip']:.4g} ({hist['bits']} bits)", fontsize=9)
    return ax


# -- sensitivity --------------------------------------------------------------------------------------
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

    def table(self) -> Table:
        label = "drop vs float" if self.mode == "only_enabled" else "recovery vs quantized"
        rows = [{"name": r["name"], "accuracy": 100 * r["accuracy"], label: 100 * r["delta"]} for r in self.rows]
        return Table(rows, ["name", "accuracy", label], {"accuracy": ".2f", label: "+.2f"},
                     title=f"sensitivity ({self.mode}); float {100 * self.float_accuracy:.2f} %, "
                           f"quantized {100 * self.quant_accuracy:.2f} %")


SENSITIVITY_MODES = ("only_enabled", "only_disabled")


def sensitivity(model: nn.Module, candidates: DebugReport | Sequence[str], images: torch.Tensor, labels: torch.Tensor,
                top_k: int | None = 5, mode: str = "only_enabled", batch_size: int = 500,
                progress: bool = True) -> SensitivityResult:
    """Accuracy effect of single quantizers (see :class:`SensitivityResult`).

    Args:
        model: prepared, calibrated model in eval mode.
        candidates: a :class:`DebugReport` (its ``top_k`` worst rows) or a list of quantizer names
            (the first ``top_k``; ``None`` = all).
        images, labels: validation data for :func:`calibkit.quant.calibrate.evaluate`.
        mode: ``"only_enabled"`` or ``"only_disabled"``.
        progress: a progress bar over the candidates.
    The model's flags are restored afterwards.
    """
    if mode not in SENSITIVITY_MODES:
        raise ValueError(f"mode={mode!r} is unknown: use one of {list(SENSITIVITY_MODES)}")
    if top_k is not None:
        _check_k(top_k)
    if isinstance(candidates, DebugReport):
        names = candidates.worst(top_k if top_k is not None else len(candidates.ops))
    else:
        if isinstance(candidates, str):
            candidates = [candidates]
        names = list(candidates)[:top_k]
    if not names:
        raise ValueError("candidates is empty: give at least one quantizer name")
    check_quantizer_names(model, names, "candidates")
    with quantizers_enabled_only(model, []):
        float_acc = evaluate(model, images, labels, batch_size, progress=False)
    with quantizers_disabled(model, []):
        quant_acc = evaluate(model, images, labels, batch_size, progress=False)
    rows = []
    for name in tqdm(names, desc=f"sensitivity ({mode})", disable=not progress):
        ctx = quantizers_enabled_only(model, [name]) if mode == "only_enabled" else quantizers_disabled(model, [name])
        with ctx:
            a = evaluate(model, images, labels, batch_size, progress=False)
        delta = (float_acc - a) if mode == "only_enabled" else (a - quant_acc)
        rows.append({"name": name, "accuracy": a, "delta": delta})
    rows.sort(key=lambda r: -r["delta"])
    return SensitivityResult(mode, float_acc, quant_acc, rows)


# -- overrides ----------------------------------------------------------------------------------------
def _spec_for(fq: FakeQuantize, value, name: str) -> QuantSpec:
    if isinstance(value, QuantSpec):
        return value
    if isinstance(value, QConfig):
        spec = value.spec_for(fq.kind)
        if spec is None:
            raise ValueError(f"override for {name!r}: the QConfig has no {fq.kind} spec")
        return spec
    if isinstance(value, Mapping):
        kw = dict(value)
        if "observer" not in kw:
            raise ValueError(f"override for {name!r}: a dict needs an 'observer' key, e.g. {{'observer': 'mse'}}")
        observer = kw.pop("observer")
        bits = kw.pop("bits", fq.bits)
        ch_axis = kw.pop("ch_axis", fq.ch_axis)
        return QuantSpec(observer, bits, ch_axis, kw)
    raise TypeError(f"override for {name!r} must be a QuantSpec, QConfig or dict like {{'observer': 'mse', ...}}, "
                    f"got {type(value).__name__}")


def override_quantizers(model: nn.Module, overrides: Mapping[str, Any]) -> list[str]:
    """Replace the named quantizers of a prepared ``model`` by fresh ones built from new specs, in place.

    Args:
        overrides: ``{quantizer name: QuantSpec | QConfig | dict}``; a dict is ``{"observer": name,
            **observer kwargs}`` with optional ``bits`` / ``ch_axis`` (default: the old quantizer's).
            The same ``{name: QuantSpec}`` mapping can be passed to ``prepare(..., overrides=...)``
            to build the overridden model from scratch.
    Returns the names replaced. The new quantizers have no data yet: calibrate them with
    :func:`recalibrate` (other quantizers are untouched: same modules, same scales and statistics).
    Unknown names raise ``ValueError`` with close matches.
    """
    if not isinstance(overrides, Mapping) or not overrides:
        raise ValueError("overrides must be a non-empty dict {quantizer name: QuantSpec | QConfig | dict}")
    qs = named_quantizers(model)
    check_quantizer_names(model, list(overrides), "overrides")
    specs = {n: _spec_for(qs[n], v, n) for n, v in overrides.items()}  # validate all before changing anything
    paths = {id(m): p for p, m in model.named_modules() if isinstance(m, FakeQuantize)}
    for name, spec in specs.items():
        old = qs[name]
        if old.kind == "weight" and spec.ch_axis not in (None, 0):
            raise ValueError(f"override for weight quantizer {name!r}: ch_axis={spec.ch_axis} is not supported, "
                             "use 0 or None")
        if old.kind == "activation" and spec.ch_axis is not None:
            raise ValueError(f"override for activation quantizer {name!r}: ch_axis={spec.ch_axis}; activations are "
                             "quantized per tensor, use ch_axis=None")
        new = spec.create().to(old.scale.device)
        new.quantizer_name, new.kind, new.spec = old.quantizer_name, old.kind, spec
        new.module_path = getattr(old, "module_path", "")
        new.state = old.state
        new.enable_observer(old.observing)
        new.enable_fake_quant(old.fake_quantizing)
        path = paths[id(old)]
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        for m in model.modules():  # weighted ops keep a link to the quantizer of their input
            if m.__dict__.get("_input_quantizer") is old:
                m.__dict__["_input_quantizer"] = new
    return list(specs)


def recalibrate(model: nn.Module, batches, names: Iterable[str], progress: bool = True) -> float:
    """Calibrate only the quantizers ``names`` on ``batches`` (the network computes in float, as in
    CALIBRATION); every other quantizer neither observes nor changes its scale. Returns seconds.

    The model must be in eval mode; afterwards it is in ``FakeQuantState.VALIDATION``.
    """
    import time

    names = set(check_quantizer_names(model, names))
    if not names:
        raise ValueError("names is empty: give the quantizers to recalibrate")
    _require_eval(model, "recalibrate")
    batches = _batches_list(batches)
    qs = named_quantizers(model)
    others = {n: fq for n, fq in qs.items() if n not in names}
    _ready_scales(others)  # their scales are final before anything runs
    set_fake_quantize(model, FakeQuantState.CALIBRATION)
    for n, fq in qs.items():
        fq.enable_observer(n in names)
    device = model_device(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in tqdm(batches, desc="recalibrate", disable=not progress, leave=False):
            model(x.to(device))
        for n in names:
            qs[n].compute_scale()
    seconds = time.perf_counter() - t0
    set_fake_quantize(model, FakeQuantState.VALIDATION)
    return seconds


def apply_overrides(model: nn.Module, overrides: Mapping[str, Any], batches, progress: bool = True) -> list[str]:
    """:func:`override_quantizers` then :func:`recalibrate` of exactly those; returns the names."""
    names = override_quantizers(model, overrides)
    recalibrate(model, batches, names, progress)
    return names
