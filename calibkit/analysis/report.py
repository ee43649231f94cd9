"""The per-op error report of a calibrated model: find the few quantizers with the largest error
(``docs/methods.md#per-op-error``).

:func:`debug_report` measures, for every quantizer of a prepared, calibrated model, the error of its quantized
tensor against float, two ways on the same batches:

* **accumulated**: the fully quantized model (every quantizer on, VALIDATION arithmetic) against the float
  model, compared at that point of the network. It includes every upstream error.
* **isolated**: only that quantizer on, with the *float* tensor as input: for an activation, ``qdq(x_float)``
  vs ``x_float``; for a weight, the op output ``op(x_float, qdq(w))`` vs ``op(x_float, w)``.

Errors are SQNR in dB (``10 log10(sum x^2 / sum (x - x_hat)^2)``, higher is better), cosine similarity and
relative L2 ``||x - x_hat|| / ||x||``, accumulated over all batches (:mod:`calibkit.analysis.error_stats`). Each
row also holds the scale, the clipping threshold, the float range, the share of float values outside the
representable range (clip ratio) and the observer. Rows are sorted worst first by ``sort_by`` (default: isolated
SQNR -- accumulated SQNR falls steadily with depth, so ranking by it mostly ranks depth; the isolated error points
at the op that *causes* the damage). :func:`op_histogram` gives the float distribution one quantizer sees.

The next steps live next door: :mod:`calibkit.analysis.sensitivity` (accuracy per candidate) and
:mod:`calibkit.analysis.overrides` (new observers for the worst ops). The figures of a report are in
:mod:`calibkit.tutorial.report_figures`; a report's rows become a table with ``Table(**report.table_data())``.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from calibkit.analysis.error_stats import ErrorStats, clip_count, clip_threshold
from calibkit.analysis.overrides import observer_label
from calibkit.analysis.selection import (
    check_quantizer_names, input_batches, quantizers_enabled_only, require_eval, require_scales, saved_flags,
)
from calibkit.checks import check_int
from calibkit.devices import model_device
from calibkit.quant.fake_quantize import FakeQuantize, require_quantizers, named_quantizers
from calibkit.quant.numerics import quantize_dequantize

__all__ = ["OpError", "DebugReport", "debug_report", "op_histogram", "SORT_KEYS"]

#: Columns a report can be sorted by (all "higher is better" except ``*_rel_l2`` and ``clip_ratio``).
SORT_KEYS = ("isolated_sqnr_db", "accumulated_sqnr_db", "isolated_cosine", "accumulated_cosine",
             "isolated_rel_l2", "accumulated_rel_l2", "clip_ratio")
_LOWER_IS_WORSE = {"isolated_sqnr_db", "accumulated_sqnr_db", "isolated_cosine", "accumulated_cosine"}


def _check_sort_by(key: str) -> str:
    if key not in SORT_KEYS:
        raise ValueError(f"sort_by={key!r} is unknown: use one of {list(SORT_KEYS)}")
    return key


# -- the rows ---------------------------------------------------------------------------------------------
@dataclass
class OpError:
    """One quantizer's row of a :class:`DebugReport`.

    Attributes:
        name, kind (``"activation"``/``"weight"``), observer (see
            :func:`calibkit.analysis.overrides.observer_label`), bits.
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


@dataclass
class DebugReport:
    """Result of :func:`debug_report`: ``ops`` in execution order, ``sort_by``, and the sorted view."""

    ops: list[OpError]
    sort_by: str
    batches: int
    images: int

    COLUMNS = ("rank", "name", "kind", "accumulated_sqnr_db", "isolated_sqnr_db", "accumulated_cosine",
               "isolated_cosine", "accumulated_rel_l2", "isolated_rel_l2", "scale", "clip", "range_min", "range_max",
               "clip_ratio", "observer")
    SHORT_COLUMNS = ("rank", "name", "kind", "accumulated_sqnr_db", "isolated_sqnr_db", "accumulated_cosine",
                     "isolated_rel_l2", "clip", "range_max", "clip_ratio", "observer")
    FORMATS = {"accumulated_sqnr_db": ".2f", "isolated_sqnr_db": ".2f", "accumulated_cosine": ".4f",
               "isolated_cosine": ".4f", "accumulated_rel_l2": ".4f", "isolated_rel_l2": ".4f", "scale": ".4g",
               "clip": ".4g", "range_min": ".4g", "range_max": ".4g", "clip_ratio": ".2e"}

    def sorted(self, sort_by: str | None = None, kind: str | None = None) -> list[OpError]:
        """Rows worst first by ``sort_by`` (default: the report's); ``kind`` filters activation/weight."""
        key = _check_sort_by(sort_by or self.sort_by)
        if kind not in (None, "activation", "weight"):
            raise ValueError(f"kind={kind!r} is unknown: use 'activation', 'weight' or None (both)")
        rows = [o for o in self.ops if kind is None or o.kind == kind]
        sign = 1 if key in _LOWER_IS_WORSE else -1
        return sorted(rows, key=lambda o: sign * getattr(o, key))

    def worst(self, k: int = 5, kind: str | None = None, sort_by: str | None = None) -> list[str]:
        """Names of the ``k`` worst quantizers (optionally only ``kind``)."""
        return [o.name for o in self.sorted(sort_by, kind)[:check_int("k", k, 1)]]

    def __getitem__(self, name: str) -> OpError:
        for o in self.ops:
            if o.name == name:
                return o
        close = difflib.get_close_matches(name, [o.name for o in self.ops], n=5, cutoff=0.5)
        raise KeyError(f"{name!r} is not in the report{f'; close matches: {close}' if close else ''}")

    def rows(self, top: int | None = None, sort_by: str | None = None, kind: str | None = None) -> list[dict]:
        """The sorted rows as dicts with a ``rank`` (1 = worst); ``top`` rows (``None`` = all)."""
        ops = self.sorted(sort_by, kind)
        if top is not None:
            ops = ops[:check_int("top", top, 1)]
        return [{"rank": i + 1, **o.as_dict()} for i, o in enumerate(ops)]

    def table_data(self, top: int | None = 10, sort_by: str | None = None, kind: str | None = None,
                   columns: Sequence[str] | None = None) -> dict:
        """The sorted report (``top`` rows; ``None`` = all) as ``{"rows", "columns", "formats", "title"}``, the
        keyword arguments of a table (e.g. ``calibkit.tutorial.table.Table(**report.table_data())``)."""
        key = sort_by or self.sort_by
        return {"rows": self.rows(top, key, kind), "columns": list(columns or self.SHORT_COLUMNS),
                "formats": dict(self.FORMATS), "title": f"per-op error, worst first by {key} ({self.images} images)"}

    def to_json_rows(self, top: int = 10, keys: Sequence[str] = ("name", "kind", "accumulated_sqnr_db",
                                                                  "isolated_sqnr_db", "clip_ratio")) -> list[dict]:
        """Plain JSON-ready rows (non-finite SQNRs become ``None``)."""
        out = []
        for r in self.rows(top):
            out.append({k: (None if isinstance(r[k], float) and not math.isfinite(r[k]) else r[k]) for k in keys})
        return out


# -- measuring --------------------------------------------------------------------------------------------
def _weighted_modules(model: nn.Module) -> dict[int, nn.Module]:
    """The weighted ops of ``model`` by the ``id`` of their weight quantizer."""
    out = {}
    for mod in model.modules():
        wfq = getattr(mod, "weight_fake_quant", None)
        if isinstance(wfq, FakeQuantize):
            out[id(wfq)] = mod
    return out


class _OpStats:
    """What the report sums up for one quantizer over the batches."""

    def __init__(self):
        self.accumulated, self.isolated = ErrorStats(), ErrorStats()
        self.clipped = self.counted = 0
        self.lo, self.hi = math.inf, -math.inf

    def count_clips(self, t: torch.Tensor, fq: FakeQuantize) -> None:
        self.clipped += clip_count(t, fq)
        self.counted += t.numel()

    def see_range(self, t: torch.Tensor) -> None:
        self.lo = min(self.lo, float(t.min()))
        self.hi = max(self.hi, float(t.max()))

    def row(self, name: str, fq: FakeQuantize) -> OpError:
        acc, iso = self.accumulated, self.isolated
        return OpError(name=name, kind=fq.kind, observer=observer_label(fq), bits=fq.bits,
                       scale=float(fq.scale.max()), clip=float(clip_threshold(fq).max()),
                       range_min=self.lo, range_max=self.hi, clip_ratio=self.clipped / max(1, self.counted),
                       accumulated_sqnr_db=acc.sqnr_db(), accumulated_cosine=acc.cosine(),
                       accumulated_rel_l2=acc.rel_l2(), isolated_sqnr_db=iso.sqnr_db(), isolated_cosine=iso.cosine(),
                       isolated_rel_l2=iso.rel_l2(), numel=acc.n)


class _Capture:
    """Forward hooks that keep every quantizer's float tensor from a float pass and add the quantized tensor's
    error against it, in a fully quantized pass, to the accumulated error.

    An activation is hooked at its quantizer: its input in the float pass (where it passes values through), its
    output in the quantized pass. A weight is hooked at its op: the float input and output, then the quantized
    output. ``ref`` / ``ref_in`` hold the float tensors of the last batch; outside :meth:`run` the hooks idle.
    """

    def __init__(self, qs: Mapping[str, FakeQuantize], weighted: Mapping[int, nn.Module], stats: dict[str, _OpStats]):
        self.phase = None  # "float", "quant" or None
        self.ref: dict[str, torch.Tensor] = {}
        self.ref_in: dict[str, torch.Tensor] = {}
        self._stats = stats
        self._handles = [weighted.get(id(fq), fq).register_forward_hook(self._hook(name, id(fq) in weighted))
                         for name, fq in qs.items()]

    def _hook(self, name: str, weight: bool):
        def hook(mod, inputs, output):
            if self.phase == "float":
                # copies: an in-place op later in the model (ReLU(inplace=True), ``out += x``) would change a view
                self.ref[name] = (output if weight else inputs[0]).detach().clone()
                if weight:
                    self.ref_in[name] = inputs[0].detach().clone()
            elif self.phase == "quant":
                self._stats[name].accumulated.add(self.ref[name], output)
        return hook

    def run(self, model: nn.Module, qs: Mapping[str, FakeQuantize], x: torch.Tensor) -> None:
        """The float pass, then the fully quantized pass of batch ``x`` (observers off)."""
        self.ref.clear()
        self.ref_in.clear()
        for fq in qs.values():
            fq.enable_observer(False)
            fq.enable_fake_quant(False)
        self.phase = "float"
        model(x)
        for fq in qs.values():
            fq.enable_fake_quant(True)
        self.phase = "quant"
        model(x)
        self.phase = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self.phase = None
        self.ref.clear()
        self.ref_in.clear()


def _isolated_errors(qs: Mapping[str, FakeQuantize], weighted: Mapping[int, nn.Module], capture: _Capture,
                     stats: dict[str, _OpStats]) -> None:
    """Each quantizer alone on the float tensors of the last float pass: isolated errors, clip counts, ranges."""
    for name, fq in qs.items():
        st, mod = stats[name], weighted.get(id(fq))
        if mod is not None:  # the op output with only this weight quantized
            for other in qs.values():
                other.enable_fake_quant(other is fq)
            st.isolated.add(capture.ref[name], mod(capture.ref_in[name]))
            t = mod.weight.detach()
            if st.counted == 0:  # the weight is the same for every batch
                st.count_clips(t, fq)
        else:
            t = capture.ref[name]
            st.isolated.add(t, quantize_dequantize(t, fq.scale, fq.bits, fq.ch_axis))
            st.count_clips(t, fq)
        st.see_range(t)


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
    _check_sort_by(sort_by)
    require_eval(model, "debug_report")
    batches = input_batches(batches)
    qs = require_quantizers(model)
    device = model_device(model)
    weighted = _weighted_modules(model)
    stats = {n: _OpStats() for n in qs}
    with saved_flags(model):
        require_scales(qs)
        capture = _Capture(qs, weighted, stats)
        try:
            with torch.no_grad():
                for x in tqdm(batches, desc="debug report", disable=not progress, leave=False):
                    capture.run(model, qs, x.to(device))
                    _isolated_errors(qs, weighted, capture, stats)
        finally:
            capture.remove()
    ops = [stats[name].row(name, fq) for name, fq in qs.items()]
    return DebugReport(ops, sort_by, len(batches), sum(int(b.shape[0]) for b in batches))


# -- one quantizer's distribution -------------------------------------------------------------------------
def _float_values(model: nn.Module, fq: FakeQuantize, batches) -> torch.Tensor:
    """The float tensor ``fq`` sees, flattened to float64 on the CPU: a weight itself, or an activation's input
    over ``batches`` with every quantizer off."""
    if fq.kind == "weight":
        return _weighted_modules(model)[id(fq)].weight.detach().flatten().cpu().double()
    values = []
    h = fq.register_forward_hook(lambda m, i, o: values.append(i[0].detach().flatten().cpu().clone()))
    try:
        with quantizers_enabled_only(model, []), torch.no_grad():
            for x in input_batches(batches):
                model(x.to(model_device(model)))
    finally:
        h.remove()
    return torch.cat([t.double() for t in values])


def op_histogram(model: nn.Module, name: str, batches, bins: int = 256) -> dict:
    """Histogram of the float tensor a quantizer sees (weights: the weight itself).

    Returns ``{"edges": float64 [bins+1], "counts": int64 [bins], "clip": float, "scale": float,
    "bits": int, "name": str, "numel": int}``; the range spans the data and the clipping threshold.
    Drawn by :func:`calibkit.tutorial.report_figures.plot_op_histogram`.
    """
    (name,) = check_quantizer_names(model, [name], "name")
    check_int("bins", bins, 2)
    require_eval(model, "op_histogram")
    fq = named_quantizers(model)[name]
    require_scales({name: fq})
    v = _float_values(model, fq, batches)
    clip = float(clip_threshold(fq).max())
    lo, hi = min(float(v.min()), -clip if float(v.min()) < 0 else 0.0), max(float(v.max()), clip)
    counts = torch.histc(v, bins=bins, min=lo, max=hi).to(torch.int64)
    return {"edges": torch.linspace(lo, hi, bins + 1, dtype=torch.float64), "counts": counts, "clip": clip,
            "scale": float(fq.scale.max()), "bits": fq.bits, "name": name, "numel": v.numel()}
