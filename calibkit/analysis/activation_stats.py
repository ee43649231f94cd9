"""Activation statistics collected once, from which percentile thresholds are re-derived instantly.

Re-running calibration for every percentile / bins setting is slow (a forward pass over all the
calibration data per setting). :class:`ActivationStats` runs the calibration batches through a
prepared model **once** and keeps, for every activation quantizer and every batch:

* ``amax``: the batch ``max |x|`` (float32, exactly what the observers compute),
* ``cum_counts``: the *cumulative* counts of a fine histogram of ``|x|`` over ``[0, amax]`` with
  ``fine_bins`` equal bins, built with the same binning code as
  :class:`~calibkit.quant.observers.PercentileObserver` (:func:`calibkit.quant.histogram.abs_histogram`),
* ``numel``: the number of values in the batch.

:meth:`ActivationStats.percentile_amax` then reproduces a ``PercentileObserver(percentile, bins,
averaging_constant)`` calibration on the same batches **bit for bit**, for every ``bins`` dividing
``fine_bins``: ``fine_bins`` is a power of two, so ``bins`` is one as well and the observer's bin
multiplier ``bins / amax`` differs from ``fine_bins / amax`` by an exact power of two. Scaling a
float by a power of two is exact, so ``floor(fine_index / (fine_bins / bins))`` *is* the observer's
bin index for every value (the last, closed bin included). Every ``fine_bins / bins``-th cumulative
count therefore gives the observer's histogram exactly (a strided read, no summation); the clip is
computed by the observer's own :func:`~calibkit.quant.histogram.percentile_from_histogram` and
moving-averaged with the same float32 operations, so the thresholds are identical, ties and
interpolation included.

Storage: cumulative counts are ``int32`` (exact while a batch holds fewer than ``2**31`` values per
tensor; checked), ``fine_bins * 4`` bytes per (quantizer, batch). With the default ``fine_bins = 32768``
that is 128 KiB; the full tutorial profile (32 batches x 12 activation quantizers of the CIFAR
ResNet) holds 48 MiB. ``nbytes`` reports the actual size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from calibkit.analysis.selection import require_eval, saved_flags
from calibkit.checks import check_int, check_number
from calibkit.devices import model_device
from calibkit.errors import CalibrationError, CheckpointError, PrepareError
from calibkit.files import atomic_torch_save
from calibkit.quant.batches import batch_input
from calibkit.quant.fake_quantize import FakeQuantize, named_quantizers
from calibkit.quant.histogram import MAX_BINS, abs_histogram, percentile_from_histogram
from calibkit.quant.observers import check_averaging_constant, check_percentile
from calibkit.quant.numerics import check_bits, scale_from_amax

__all__ = ["ActivationStats", "activation_quantizers", "DEFAULT_FINE_BINS"]

#: Default resolution of the stored histograms: every ``bins`` in 2, 4, ..., 32768 is re-derivable.
DEFAULT_FINE_BINS = 32768
_INT32_MAX = 2**31 - 1
_FORMAT = 1


def activation_quantizers(model: nn.Module) -> dict[str, FakeQuantize]:
    """The activation quantizers of a prepared model, by name, in execution order."""
    qs = {n: q for n, q in named_quantizers(model).items() if q.kind != "weight"}
    if not qs:
        raise PrepareError(f"{type(model).__name__} has no activation quantizers: "
                           "call calibkit.quant.prepare(model, ...) first")
    return qs


def _check_fine_bins(fine_bins: int) -> int:
    why = " (a power of two, so that every smaller power-of-two bins value is re-derived exactly)"
    check_int("fine_bins", fine_bins, 2, MAX_BINS, why)
    if fine_bins & (fine_bins - 1):
        raise ValueError(f"fine_bins={fine_bins!r} is out of range{why}: use a power of two in [2, {MAX_BINS}], "
                         "e.g. 32768")
    return fine_bins


def _batch_stats(name: str, x: torch.Tensor, fine_bins: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One batch of one quantizer's input: ``(amax float32 [1], cumulative counts int32 [fine_bins], numel)``,
    on the CPU. ``amax`` is the batch ``max |x|`` exactly as the observers compute it."""
    if x.numel() == 0:
        raise CalibrationError(f"quantizer {name!r} received an empty tensor; calibration batches must contain data")
    x2d = x.reshape(1, -1).to(torch.float32)
    lo, hi = torch.aminmax(x2d)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise CalibrationError(f"quantizer {name!r}: input contains NaN or Inf values; only finite "
                               "activations can be calibrated -- check the model / data for overflow")
    if x2d.shape[1] > _INT32_MAX:
        raise CalibrationError(f"quantizer {name!r}: {x2d.shape[1]} values in one batch exceed the int32 "
                               "counters of ActivationStats: use smaller calibration batches")
    a = torch.maximum(-lo, hi).reshape(-1).to(torch.float32)  # as the observers' _row_amax
    cum = abs_histogram(x2d, a, fine_bins)[0].cumsum(0).to(torch.int32)
    return a.cpu(), cum.cpu(), x2d.shape[1]


def _run_float(model: nn.Module, batches: Iterable, calibrate_weights: bool, progress: bool) -> None:
    """Run ``batches`` through ``model`` with no quantizer fake-quantizing (weight observers observe iff
    ``calibrate_weights``); the caller restores the flags."""
    for q in named_quantizers(model).values():
        q.enable_fake_quant(False)
        q.enable_observer(calibrate_weights and q.kind == "weight")  # a fixed scale never observes
    device = model_device(model)
    total = len(batches) if hasattr(batches, "__len__") else None
    seen = 0
    for batch in tqdm(batches, total=total, desc="collect stats", disable=not progress, leave=False):
        model(batch_input(batch, seen).to(device))
        seen += 1
    if seen == 0:
        raise CalibrationError("batches is empty: collecting statistics needs at least one batch")


class ActivationStats:
    """Per-batch fine histograms of every activation quantizer's input (see the module docstring).

    Build with :meth:`collect`. Attributes:
        names: activation quantizer names (execution order).
        fine_bins: bins of the stored histograms (a power of two).
        amax: ``{name: float32 [B]}`` per-batch ``max |x|``.
        cum_counts: ``{name: int32 [B, fine_bins]}`` per-batch cumulative histograms of ``|x|`` over
            ``[0, amax_b]`` (entry ``k``: values below the upper edge of fine bin ``k``, the last one all).
        numel: ``{name: int64 [B]}`` values per batch.
        num_batches: ``B``.
    """

    def __init__(self, names: list[str], fine_bins: int, amax: dict, cum_counts: dict, numel: dict):
        self.names = list(names)
        self.fine_bins = _check_fine_bins(fine_bins)
        self.amax, self.cum_counts, self.numel = amax, cum_counts, numel
        self._hist_cache: dict = {}
        sizes = {int(self.amax[n].numel()) for n in self.names}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"every quantizer needs the same, non-zero number of batches; got {sorted(sizes)}")
        self.num_batches = sizes.pop()

    # -- collection ---------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def collect(cls, model: nn.Module, batches: Iterable, fine_bins: int = DEFAULT_FINE_BINS, progress: bool = True,
                calibrate_weights: bool = True) -> "ActivationStats":
        """Run ``batches`` through the prepared ``model`` once (in float) and record the statistics.

        Args:
            model: output of :func:`calibkit.quant.prepare`, in eval mode (``StateError`` otherwise).
            batches: list/iterable of normalized float input tensors, or ``(inputs, labels)`` pairs.
            fine_bins: bins of the stored histograms, a power of two in ``[2, 2**20]`` (default 32768).
            progress: show a tqdm progress bar.
            calibrate_weights: let the *weight* observers observe during the pass (default True), so
                the model can enter VALIDATION afterwards (weights are constant: this equals
                calibrating them). Activation observers never see these batches.

        During the pass no quantizer fake-quantizes (the network computes in float, exactly as in
        ``FakeQuantState.CALIBRATION``); every quantizer's flags are restored afterwards.
        """
        fine_bins = _check_fine_bins(fine_bins)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a prepared nn.Module, got {type(model).__name__}")
        require_eval(model, "ActivationStats.collect")
        acts = activation_quantizers(model)
        seen = {n: [] for n in acts}  # per batch: (amax, cumulative counts, numel)

        def record(name):
            return lambda module, args: seen[name].append(_batch_stats(name, args[0].detach(), fine_bins))

        hooks = [q.register_forward_pre_hook(record(n)) for n, q in acts.items()]
        try:
            with saved_flags(model):
                _run_float(model, batches, calibrate_weights, progress)
        finally:
            for h in hooks:
                h.remove()
        return cls(list(acts), fine_bins, {n: torch.cat([b[0] for b in v]) for n, v in seen.items()},
                   {n: torch.stack([b[1] for b in v]) for n, v in seen.items()},
                   {n: torch.tensor([b[2] for b in v], dtype=torch.int64) for n, v in seen.items()})

    # -- re-derivation --------------------------------------------------------------------------------
    def _check_name(self, name: str) -> str:
        if name not in self.amax:
            raise ValueError(f"name={name!r} is not an activation quantizer of these statistics: use one of {self.names}")
        return name

    def check_bins(self, bins: int) -> int:
        """Validate ``bins`` for re-derivation: a divisor of ``fine_bins`` (power of two) >= 2."""
        check_int("bins", bins, 2, MAX_BINS)
        if self.fine_bins % bins:
            raise ValueError(f"bins={bins} does not divide fine_bins={self.fine_bins}: use one of {self.allowed_bins()} "
                             "or collect the statistics with a larger power-of-two fine_bins")
        return bins

    def allowed_bins(self, min_bins: int = 2) -> list[int]:
        """Every ``bins`` value that can be re-derived exactly (powers of two up to ``fine_bins``)."""
        return [2**k for k in range(1, self.fine_bins.bit_length()) if 2**k >= min_bins]

    def batch_counts(self, name: str, bins: int) -> torch.Tensor:
        """int64 ``[B, bins]``: the histograms a ``bins``-bin ``PercentileObserver`` builds per batch."""
        self._check_name(name)
        return self._coarse_counts([name], self.check_bins(bins))

    def fine_counts(self, name: str) -> torch.Tensor:
        """int64 ``[B, fine_bins]``: the stored fine histograms (not cumulative)."""
        self._check_name(name)
        return self._coarse_counts([name], self.fine_bins)

    def _coarse_counts(self, names: list[str], bins: int) -> torch.Tensor:
        """int64 ``[len(names) * B, bins]`` histograms, quantizer-major (rows ``i*B .. i*B+B-1``: ``names[i]``)."""
        r = self.fine_bins // bins
        cum = torch.cat([self.cum_counts[n][:, r - 1::r] for n in names]).to(torch.int64)
        return torch.diff(cum, dim=1, prepend=torch.zeros_like(cum[:, :1]))

    def batch_clips(self, name: str, percentile: float, bins: int = 2048) -> torch.Tensor:
        """float32 ``[B]``: the per-batch clips of ``PercentileObserver(percentile, bins)`` (before averaging)."""
        percentile = check_percentile(percentile)
        return percentile_from_histogram(self.batch_counts(name, bins), self.amax[name], percentile)

    def percentile_amax(self, percentile: float = 99.99, bins: int = 2048,
                        averaging_constant: float = 0.01) -> dict[str, float]:
        """``{name: amax}`` that ``PercentileObserver(percentile, bins, averaging_constant)`` reaches on
        the collected batches (bit for bit; the first batch sets the value, then
        ``v <- v + c * (v_batch - v)`` in float32).

        Raises ``ValueError`` for a percentile outside (0, 100], ``bins`` not dividing ``fine_bins`` or
        a constant outside [0, 1].
        """
        percentile = check_percentile(percentile)
        self.check_bins(bins)
        c = check_averaging_constant(averaging_constant)
        # all quantizers at once: the percentile search is row-wise, the average element-wise (float32)
        amax = torch.cat([self.amax[n] for n in self.names])
        clips = percentile_from_histogram(self._coarse_counts(self.names, bins), amax, percentile)
        clips = clips.view(len(self.names), self.num_batches)
        v = clips[:, 0].clone()
        for k in range(1, self.num_batches):
            v = v + c * (clips[:, k] - v)
        return dict(zip(self.names, v.tolist()))

    def tail_ratio(self, percentile: float = 99.9) -> dict[str, float]:
        """``{name: max|x| / percentile clip}`` over all collected values (fine histograms): how far the
        largest values lie beyond the bulk. Large ratios mark heavy-tailed activations."""
        percentile = check_percentile(percentile)
        out = {}
        for name in self.names:
            edges, counts = self.histogram(name, bins=self.fine_bins)
            clip = float(percentile_from_histogram(counts[None], torch.tensor([float(edges[-1])]), percentile)[0])
            out[name] = float(edges[-1]) / clip if clip > 0 else math.inf
        return out

    # -- use ------------------------------------------------------------------------------------------
    def apply(self, model: nn.Module, amaxes: dict[str, float], bits: int | None = None) -> nn.Module:
        """Load ``scale_from_amax(amax, bits)`` into each named activation quantizer of ``model`` and fix it.

        Args:
            model: a prepared model with the same activation quantizers.
            amaxes: ``{name: clip}`` (e.g. from :meth:`percentile_amax`); names not given are left alone.
            bits: activation bit width (2..16); ``None`` keeps each quantizer's own. Changing it
                changes the quantizer's grid (``FakeQuantize.bits`` and its observer's ``bits``);
                weight quantizers keep their bit width and calibrated scales.
        Returns ``model`` (then ``set_fake_quantize(model, FakeQuantState.VALIDATION)`` and evaluate).
        """
        acts = activation_quantizers(model)
        if bits is not None:
            check_bits(bits)
        unknown = [n for n in amaxes if n not in acts]
        if unknown:
            raise ValueError(f"amaxes names {unknown} are not activation quantizers of the model: "
                             f"use names from {list(acts)}")
        for name, a in amaxes.items():
            a = check_number(f"amaxes[{name!r}]", float(a), 0, math.inf, high_open=True, why=" (a finite clip)")
            q = acts[name]
            if bits is not None:
                q.bits = bits
                q.observer.bits = bits
            q.load_scale(scale_from_amax(a, q.bits))
        return model

    def histogram(self, name: str, bins: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
        """All batches of ``name`` on one grid, for plotting: ``(edges float64 [bins+1], counts int64 [bins])``
        over ``[0, max_b amax_b]``. Each fine bin is assigned by its centre (error < one fine bin)."""
        self._check_name(name)
        check_int("bins", bins, 1, MAX_BINS)
        key = (name, bins)
        if key not in self._hist_cache:
            self._hist_cache[key] = self._histogram(name, bins)
        edges, counts = self._hist_cache[key]
        return edges.clone(), counts.clone()

    def _histogram(self, name: str, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.amax[name].double()
        top = float(a.max())
        edges = torch.linspace(0.0, top, bins + 1, dtype=torch.float64)
        out = torch.zeros(bins, dtype=torch.int64)
        if top == 0:
            out[0] = int(self.numel[name].sum())
            return edges, out
        F = self.fine_bins
        centres = (torch.arange(F, dtype=torch.float64) + 0.5) / F            # fraction of each batch amax
        idx = (centres[None, :] * a[:, None] / top * bins).long().clamp_(0, bins - 1)  # [B, F]
        out.index_add_(0, idx.reshape(-1), self.fine_counts(name).reshape(-1))
        return edges, out

    @property
    def nbytes(self) -> int:
        """Memory held by the statistics, in bytes."""
        return sum(t.element_size() * t.numel() for d in (self.amax, self.cum_counts, self.numel) for t in d.values())

    def __repr__(self) -> str:
        return (f"ActivationStats({len(self.names)} activation quantizers, {self.num_batches} batches, "
                f"fine_bins={self.fine_bins}, {self.nbytes / 2**20:.1f} MiB)")

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the statistics to ``path`` (``torch.save``); reload with :meth:`load`."""
        return atomic_torch_save({"format": _FORMAT, "names": self.names, "fine_bins": self.fine_bins,
                                  "amax": self.amax, "cum_counts": self.cum_counts, "numel": self.numel}, path)

    @classmethod
    def load(cls, path: str | Path) -> "ActivationStats":
        """Read statistics written by :meth:`save` (``weights_only=True``); a missing, damaged or foreign file raises
        ``CheckpointError`` (a ``ValueError``)."""
        try:
            blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as e:  # missing, truncated, garbage, or holding code (refused by weights_only)
            raise CheckpointError(f"{path}: not a readable ActivationStats file: {type(e).__name__}: {e}") from e
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
            raise CheckpointError(f"{path}: not an ActivationStats file (format {_FORMAT})")
        try:
            return cls(blob["names"], blob["fine_bins"], blob["amax"], blob["cum_counts"], blob["numel"])
        except (AttributeError, KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{path}: ActivationStats file is damaged: {type(e).__name__}: {e}") from e
