"""Calibration observers (spec section 3), in the style of ``torch.ao.quantization`` observers.

An observer is an ``nn.Module``: ``forward(x)`` records statistics of ``x`` and returns ``x``
unchanged; ``calculate_qparams()`` returns the symmetric scale (float32, shape ``[]`` per tensor or
``[C]`` per channel along ``ch_axis``). ``get_amax()`` returns the clipping threshold the scale is
derived from (``scale = amax / ((qmax - qmin) / 2)``).

Every observer moving-averages its statistic with ``averaging_constant`` c: the first batch sets
it, then ``v <- v + c * (v_batch - v)``; c = 0 freezes it after the first batch, c = 1 keeps only
the latest batch.

Methods and designs (all vectorized; large tensors are processed in cache-sized chunks):

* ``min_max``: batch min/max. Per tensor or per channel.
* ``percentile``: per batch, a histogram of ``|x|`` with ``bins`` bins over ``[0, amax_batch]``
  (int64 counts); the clip is where the cumulative count reaches ``percentile`` %, interpolated
  linearly inside that bin (so ``percentile=100`` is exactly the batch max). Per tensor/channel.
* ``mse``: candidates ``amax_batch * (1 - k/100)``, ``k = 0, stride, 2*stride, ... <= 95``. A signed
  histogram (``MSEObserver.SCORE_BINS`` bins per sign; bin ``[0, w)``, home of the exact zeros,
  left out) scores *every* candidate at once: for values spread evenly inside a bin the mean
  squared quantize-dequantize error has a closed form (integral of the rounding sawtooth plus the
  clipping parabola), so the scores are one matrix product. The best-scored candidate replaces
  ``k = 0`` (the ``min_max`` clip) only if its L2 error on the batch is smaller: guaranteed error
  bounds of both clips, read from the histogram (per tensor at ``BOUND_REFINE`` times finer bins),
  decide that when they do not overlap, else the errors are measured exactly on the batch. So on
  its batch ``mse`` never has a larger L2 error than ``min_max``. Per tensor/channel.
* ``kl``: a histogram of ``|x|`` accumulated over all batches (``AccumulatingHistogram``:
  power-of-two bin width, exact growth and pair merging, at most ``8 * bins`` bins). Every
  ``update_interval`` steps, inside ``forward``, the clip minimizing the TensorRT-style KL
  divergence is searched over all candidate thresholds at once (``kl_divergences``); each
  search result is one moving-average sample. Bin 0, which holds the exact zeros of ReLU outputs
  (represented exactly by every grid; their spike would dominate the divergence), gets the count
  of bin 1 before the search, as in NVIDIA ModelOpt. Per tensor only. The histogram is not saved
  in ``state_dict`` (``amax``, ``steps`` and ``searches`` are); calibrating again after loading
  starts a new histogram.
* ``mix``: per batch, the exact percentiles (order statistics, no histogram) for a grid of 22
  settings from 99 % to 100 % (``MixObserver.PERCENTILES``, log-spaced tail fractions) are
  candidates; the L2 quantize-dequantize error is *measured* on the batch for 6 coarse settings
  (99, 99.9, 99.99, 99.999, 99.9999, 100), then for the neighbours two and one grid steps from the
  best (10 measured settings in all), and the least error wins. A few rare huge values that carry
  most of the error keep ``mix`` at the max, where a fixed percentile clips them. Per tensor/channel.
* ``MovingAverageMinMax``/``MovingAveragePerChannelMinMax``: ``min_max`` fixed to per tensor / per
  channel; ``fixed_scale``: a known range.

Only ``amax``/``steps`` (plus small per-method buffers) are saved in ``state_dict``; histograms are
working memory.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from calibkit.errors import CalibrationError
from calibkit.quant.histogram import (MAX_BINS, AccumulatingHistogram, abs_histogram, abs_order_statistics, column_chunks,
                        kl_threshold_bins, nonfinite_error, percentile_from_histogram, percentile_ranks,
                        signed_histogram, squared_error_bound_tables, squared_error_table, workspace)
from calibkit.quant.numerics import MIN_SCALE, check_bits, qrange, scale_from_amax


def check_averaging_constant(c: float) -> float:
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not (0.0 <= float(c) <= 1.0) or math.isnan(c):
        raise ValueError(f"averaging_constant={c!r} is out of range: use a number in [0, 1]")
    return float(c)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_percentile(percentile: float) -> float:
    """Validate a percentile: a number in (0, 100]."""
    ok = isinstance(percentile, (int, float)) and not isinstance(percentile, bool) and not math.isnan(percentile)
    if not ok or not (0.0 < float(percentile) <= 100.0):
        raise ValueError(f"percentile={percentile!r} is out of range: use a value in (0, 100]")
    return float(percentile)


def check_int_range(name: str, value: int, lo: int, hi: int | None = None, why: str = "") -> int:
    """Validate an integer parameter in ``[lo, hi]`` (``hi=None``: no upper bound)."""
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        allowed = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
        raise ValueError(f"{name}={value!r} is out of range{why}: use {allowed}")
    return value


class ObserverBase(nn.Module):
    """Common state and checks of every observer.

    Args:
        bits: bit width of the signed symmetric integer grid, 2..16 (default 8).
        averaging_constant: moving-average weight of each new batch, in [0, 1] (default 0.01).
        ch_axis: ``None`` for per-tensor statistics, else the channel axis (per-channel, weights).

    Buffers (saved in ``state_dict``): ``amax`` (float32, ``[]`` or ``[C]``; 0 until data is seen)
    and ``steps`` (int64 number of batches observed).
    """

    #: Name under which the observer is registered (``get_observer_class(name)``).
    name: str = ""
    supports_per_channel: bool = True

    def __init__(self, bits: int = 8, averaging_constant: float = 0.01, ch_axis: int | None = None):
        super().__init__()
        self.bits = check_bits(bits)
        self.averaging_constant = check_averaging_constant(averaging_constant)
        if ch_axis is not None and not self.supports_per_channel:
            raise ValueError(f"ch_axis={ch_axis!r}: the {self.name or type(self).__name__} observer is per-tensor only; use ch_axis=None")
        if ch_axis is not None and (isinstance(ch_axis, bool) or not isinstance(ch_axis, int)):
            raise ValueError(f"ch_axis={ch_axis!r} must be an int axis or None")
        self.ch_axis = ch_axis
        self.register_buffer("amax", torch.tensor(0.0))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))

    # -- input checks -------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(x).__name__}")
        x = x.detach()
        if x.numel() == 0:
            raise CalibrationError(f"{type(self).__name__}: received an empty tensor (shape {tuple(x.shape)}); calibration batches must contain data")
        if not x.is_floating_point():
            x = x.float()
        if self._scans_input(x):  # the observer's own pass finds NaN/Inf (and raises the same error)
            self._batch_minmax = None
        else:
            lo, hi = torch.aminmax(x)  # NaN propagates; cheaper than a full isfinite() mask
            self._batch_minmax = (lo, hi)  # reused by per-tensor observers (not state)
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                raise nonfinite_error(type(self).__name__, x)
        if self.ch_axis is not None and not (-x.dim() <= self.ch_axis < x.dim()):
            raise ValueError(f"ch_axis={self.ch_axis} is out of range for a {x.dim()}-d tensor")
        return x

    def _scans_input(self, x: torch.Tensor) -> bool:
        """True when ``_observe(x)`` itself detects NaN/Inf (raising :func:`~calibkit.quant.histogram.nonfinite_error`)
        without needing the batch min/max, so the input check skips its min/max pass (default: False)."""
        return False

    def _tensor_minmax(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The current batch's (min, max) from the input check, for per-tensor observers; else None."""
        return getattr(self, "_batch_minmax", None) if self.ch_axis is None else None

    def _batch_nonnegative(self) -> bool:
        """True when the input check showed that the current batch has no negative value (per-tensor observers)."""
        minmax = self._tensor_minmax()
        return minmax is not None and float(minmax[0]) >= 0

    def _channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` reshaped to ``[C, N]`` along ``ch_axis`` (per-channel observers); row ``c`` holds
        ``x.select(ch_axis, c)`` in its own element order."""
        return x.movedim(self.ch_axis, 0).reshape(x.shape[self.ch_axis], -1)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """float32 ``[C, N]``: one row per channel, or a single row per tensor."""
        x2d = x.reshape(1, -1) if self.ch_axis is None else self._channels_first(x)
        return x2d.to(torch.float32)

    def _average(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Moving average of a statistic; the first batch sets it."""
        new = new.to(old.device, torch.float32)
        if int(self.steps) == 0 or old.shape != new.shape:
            return new.clone()
        return old + self.averaging_constant * (new - old)

    # -- interface ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xd = self._check_input(x)
        self._observe(xd)
        self.steps += 1
        return x

    def _observe(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _require_data(self) -> None:
        if int(self.steps) == 0:
            raise CalibrationError(
                f"{type(self).__name__} has not observed any data: run calibration batches through the model "
                "(FakeQuantState.CALIBRATION) before reading quantization parameters")

    def get_amax(self) -> torch.Tensor:
        """Clipping threshold (float32, ``[]`` or ``[C]``), >= 0."""
        self._require_data()
        return self.amax.detach().clone()

    def calculate_qparams(self) -> torch.Tensor:
        """Symmetric scale (float32, ``[]`` or ``[C]``), strictly positive and finite."""
        return scale_from_amax(self.get_amax(), self.bits).to(self.amax.device)

    def reset(self) -> None:
        """Forget everything observed so far."""
        self.amax = torch.zeros_like(self.amax)
        self.steps.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # amax may be per-channel ([C]) in the checkpoint while a fresh observer holds a scalar.
        key = prefix + "amax"
        if key in state_dict and state_dict[key].shape != self.amax.shape:
            self.amax = torch.empty_like(state_dict[key], device=self.amax.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, averaging_constant={self.averaging_constant}, ch_axis={self.ch_axis}"


class MinMaxObserver(ObserverBase):
    """``min_max``: moving average of the batch min and max; ``amax = max(|min|, |max|)``.

    Fastest method; use it first to choose batch size and ``averaging_constant``. Per-tensor or
    per-channel (``ch_axis``). Extra buffers: ``min_val``, ``max_val``.
    """

    name = "min_max"

    def __init__(self, bits: int = 8, averaging_constant: float = 0.01, ch_axis: int | None = None):
        super().__init__(bits, averaging_constant, ch_axis)
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))

    def _observe(self, x: torch.Tensor) -> None:
        if self.ch_axis is None:
            lo, hi = self._batch_minmax  # computed by the input check
        else:
            lo, hi = torch.aminmax(self._channels_first(x), dim=1)
        self.min_val = self._average(self.min_val, lo)
        self.max_val = self._average(self.max_val, hi)
        self.amax = torch.maximum(self.min_val.abs(), self.max_val.abs())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for k in ("min_val", "max_val"):
            if prefix + k in state_dict and state_dict[prefix + k].shape != getattr(self, k).shape:
                setattr(self, k, torch.empty_like(state_dict[prefix + k], device=self.amax.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """``MovingAverageMinMax``: per-tensor moving-average min/max (activations)."""

    name = "moving_average_min_max"
    supports_per_channel = False

    def __init__(self, bits: int = 8, averaging_constant: float = 0.01, ch_axis: None = None):
        super().__init__(bits, averaging_constant, ch_axis)


class MovingAveragePerChannelMinMaxObserver(MinMaxObserver):
    """``MovingAveragePerChannelMinMax``: per-channel moving-average min/max (weights), ``ch_axis`` default 0."""

    name = "moving_average_per_channel_min_max"

    def __init__(self, bits: int = 8, averaging_constant: float = 0.01, ch_axis: int = 0):
        if ch_axis is None:
            raise ValueError("ch_axis=None: MovingAveragePerChannelMinMax needs a channel axis (e.g. 0 for conv weights)")
        super().__init__(bits, averaging_constant, ch_axis)


class FixedScaleObserver(ObserverBase):
    """``fixed_scale``: a tensor whose range is known in advance (e.g. a sigmoid output in [0, 1]).

    Args:
        amax: the known clipping threshold (> 0, finite); or give ``scale`` instead.
        scale: the known scale (> 0, finite); ``amax`` is derived from it.
    Observing data only counts steps and checks the input; the threshold never changes.
    """

    name = "fixed_scale"

    def __init__(self, amax: float | None = None, scale: float | None = None, bits: int = 8,
                 averaging_constant: float = 0.0, ch_axis: int | None = None):
        super().__init__(bits, averaging_constant, ch_axis)
        if (amax is None) == (scale is None):
            raise ValueError("fixed_scale needs exactly one of amax=... or scale=... (a positive finite number)")
        value = amax if amax is not None else scale
        label = "amax" if amax is not None else "scale"
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{label}={value!r} is out of range: use a finite number > 0")
        if scale is not None:
            from calibkit.quant.numerics import qrange
            qmin, qmax = qrange(bits)
            value = scale * (qmax - qmin) / 2
        self.amax = torch.tensor(float(value))
        self.steps += 1  # the range is known: qparams are available before any data

    def _observe(self, x: torch.Tensor) -> None:
        pass

    def reset(self) -> None:
        pass


def _row_amax(x2d: torch.Tensor, minmax: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-row ``max |x|`` (float32 ``[C]``); ``minmax``: the tensor's (min, max) if already known (C = 1)."""
    if x2d.shape[0] == 1:
        lo, hi = minmax if minmax is not None else torch.aminmax(x2d)
    else:
        lo, hi = torch.aminmax(x2d, dim=1)
    return torch.maximum(-lo, hi).reshape(-1).to(torch.float32)


class SquaredErrors:
    """Accumulates exact L2 quantize-dequantize errors ``sum((x - qdq(x, s))**2)`` chunk by chunk.

    Args:
        scales: float32 ``[C, T]``: ``T`` candidate scales per row; bits: the integer grid.
    Call it on consecutive column chunks ``xc`` (``[C, n]``, float32) of the data; ``out`` holds the
    float64 ``[C, T]`` sums (float32 partial sums per chunk). ``qdq`` is
    ``round(x / s).clamp(qmin, qmax) * s`` as in :func:`calibkit.quant.numerics.quantize_dequantize`.
    """

    def __init__(self, scales: torch.Tensor, bits: int):
        self.qmin, self.qmax = qrange(bits)
        self.scales = scales.to(torch.float32)
        self.parts: list[torch.Tensor] = []
        # Rows whose scale is tiny or huge would underflow/overflow float32 squares: they are computed
        # on x * 2**-e (e: the exponent of the row's largest scale). Scaling by a power of two is exact,
        # so every rounding is the same as on x itself; the sums are scaled back in float64.
        _, e = torch.frexp(self.scales.amax(1, keepdim=True))
        self.factor = None
        if bool(((e < -40) | (e > 40)).any()):
            self.factor = torch.where((e < -40) | (e > 40), torch.ldexp(torch.ones_like(self.scales[:, :1]), -e),
                                      torch.ones_like(self.scales[:, :1]))
            self.scales = self.scales * self.factor

    def __call__(self, xc: torch.Tensor) -> None:
        if self.factor is not None:
            xc = torch.mul(xc, self.factor, out=workspace("sq_err_x", xc.shape, torch.float32, xc.device))
        C, n = xc.shape
        T = self.scales.shape[1]
        b = workspace("sq_err_f32", (C, T, n), torch.float32, xc.device)
        s, x = self.scales[:, :, None], xc[:, None, :]
        # all candidates in one op each: q = clamp(round(x / s)), then x - q * s, squared and summed
        torch.div(x, s, out=b).round_().clamp_(self.qmin, self.qmax)
        torch.addcmul(x, b, s, value=-1, out=b)
        self.parts.append(b.square_().sum(2))

    @property
    def out(self) -> torch.Tensor:
        """float64 ``[C, T]`` error sums over the chunks seen so far."""
        C, T = self.scales.shape
        if not self.parts:
            return torch.zeros(C, T, dtype=torch.float64, device=self.scales.device)
        total = torch.stack(self.parts).double().sum(0)
        return total if self.factor is None else total / self.factor.double() ** 2


def squared_errors(x2d: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Exact L2 quantize-dequantize errors per row and candidate: float64 ``[C, T]``.

    ``x2d``: float32 ``[C, N]``; ``scales``: float32 ``[C, T]``. All candidates are evaluated together on
    each chunk of ``chunk_elems / T`` elements (see :class:`SquaredErrors`), so the work buffer stays in cache.
    """
    acc = SquaredErrors(scales.to(x2d.device), bits)
    for xc in column_chunks(x2d, merge_tail=True, fan_out=scales.shape[1]):
        acc(xc)
    return acc.out


class _BatchClipObserver(ObserverBase):
    """Observers whose statistic is a per-batch clip (``[C]`` per row), moving-averaged."""

    def _observe(self, x: torch.Tensor) -> None:
        x2d = self._rows(x)
        clip = self._batch_clip(x2d, _row_amax(x2d, self._tensor_minmax()))
        self.amax = self._average(self.amax, clip.reshape(()) if self.ch_axis is None else clip)

    def _batch_clip(self, x2d: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Clip per row (float32 ``[C]``) for this batch; ``amax``: per-row ``max |x|``."""
        raise NotImplementedError


class PercentileObserver(_BatchClipObserver):
    """``percentile``: per batch, the clip where the cumulative histogram of ``|x|`` reaches ``percentile`` %.

    Args:
        percentile: in (0, 100] (default 99.99); 100 gives the batch max.
        bins: histogram bins over ``[0, max|x|]`` of each batch, integer in [2, 2**20] (default 2048).
        bits, averaging_constant, ch_axis: see :class:`ObserverBase` (per channel supported).

    The clip is interpolated linearly inside the bin where the target count is reached (see
    :func:`calibkit.quant.histogram.percentile_from_histogram`); the clip is moving-averaged.
    """

    name = "percentile"

    def __init__(self, bits: int = 8, averaging_constant: float = 0.01, ch_axis: int | None = None,
                 percentile: float = 99.99, bins: int = 2048):
        super().__init__(bits, averaging_constant, ch_axis)
        self.percentile = check_percentile(percentile)
        self.bins = check_int_range("bins", bins, 2, MAX_BINS)

    def _batch_clip(self, x2d: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        counts = abs_histogram(x2d, amax, self.bins, self._batch_nonnegative())
        return percentile_from_histogram(counts, amax, self.percentile)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", percentile={self.percentile}, bins={self.bins}"


class MSEObserver(_BatchClipObserver):
    """``mse``: per batch, the clip ``max|x| * (1 - k/100)`` with the least L2 quantize-dequantize error.

    Args:
        stride: step of ``k`` over ``0, stride, 2*stride, ... <= 95`` (integer in [1, 95], default 1).
        bits, averaging_constant, ch_axis: see :class:`ObserverBase` (per channel supported).

    All candidates are scored at once from a signed histogram (``SCORE_BINS`` bins per sign) with
    the closed-form error table of :func:`calibkit.quant.histogram.squared_error_table`. The best-scored
    candidate is kept only if its L2 error on the batch is smaller than that of ``k = 0`` (the
    ``min_max`` clip; ties keep ``k = 0``). That comparison is exact but as cheap as possible: guaranteed
    lower and upper error bounds of both clips, read from the same histogram with two dot products
    (:func:`calibkit.quant.histogram.squared_error_bound_tables`), settle it when they do not overlap;
    otherwise the best candidate is quantize-dequantized on the batch, and ``k = 0`` too unless its
    bounds already settle the comparison with that measured error. Hence, on its batch, ``mse`` never
    has a larger L2 error than ``min_max``, and it usually
    costs one histogram pass plus at most one quantize-dequantize pass. The clip is moving-averaged.
    """

    name = "mse"
    SCORE_BINS = 2048
    #: Per tensor, the histogram is counted with ``BOUND_REFINE`` times finer bins: the scores use it summed
    #: back to ``SCORE_BINS`` (exactly the coarse histogram, since the bin edges nest), the error bounds use
    #: the fine bins, which makes them about ``BOUND_REFINE`` times tighter, so they settle the comparison
    #: with ``k = 0`` far more often. Per channel (``C`` rows) the coarse bins are kept (``C`` fine histograms
    #: would not stay in cache); the decision is the same either way, only its cost differs.
    BOUND_REFINE = 4
    MAX_SHRINK_PERCENT = 95

    def __init__(self, bits: int = 8, averaging_constant: float = 0.01, ch_axis: int | None = None, stride: int = 1):
        super().__init__(bits, averaging_constant, ch_axis)
        self.stride = check_int_range("stride", stride, 1, self.MAX_SHRINK_PERCENT)
        self.shrinks = tuple(1.0 - k / 100.0 for k in range(0, self.MAX_SHRINK_PERCENT + 1, self.stride))

    def _batch_clip(self, x2d: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        B = self.SCORE_BINS
        refine = self.BOUND_REFINE if x2d.shape[0] == 1 else 1
        if refine > 1 and not bool(torch.isfinite(B * refine / amax.float()).all()):
            refine = 1  # amax ~1e-35: finer bins would overflow where the scoring bins do not (no longer nested)
        fine = signed_histogram(x2d, amax, B * refine, nonnegative=self._batch_nonnegative())
        counts = fine if refine == 1 else fine.view(-1, 2 * B, refine).sum(2)  # nested edges: exact
        table, shrink, order = self._tables(amax.device)
        scored = counts.index_select(1, order)                                          # |x| bins: +, -
        # Bin [0, w) is left out of the scores: it holds the exact zeros (ReLU), which have no error
        # for any candidate; its other values are few and tiny, their error ~constant over candidates.
        scored[:, 0] = 0
        score = torch.stack([self._scores(row, table) for row in scored])               # [C, K]
        best = score.argmin(1)                            # first minimum: ties go to the larger clip
        if not bool(best.any()):  # k = 0 (the min_max clip) scored best everywhere
            return amax
        best_clip = amax * shrink.index_select(0, best)
        scale0, scale_best = scale_from_amax(amax, self.bits), scale_from_amax(best_clip, self.bits)
        # The exact comparison "error(best) < error(k = 0)" per row: settled by the histogram's guaranteed
        # error bounds where they do not overlap, else by measuring the errors.
        bounds = self._bounds(fine, amax, best, scale0, scale_best)
        if bounds is None:
            both = squared_errors(x2d, torch.stack([scale0, scale_best], 1), self.bits)
            return torch.where(both[:, 1] < both[:, 0], best_clip, amax)
        lower0, upper0, lower_best, upper_best = bounds
        take_best = upper_best * (1 + 1e-5) <= lower0
        undecided = ~take_best & (lower_best < upper0 * (1 + 1e-5))
        if bool(undecided.any()):
            # Measuring the best candidate alone settles a row if its error falls outside k = 0's bounds. The
            # scores estimate that error closely: where they predict it will not, measure both clips in one pass.
            est_best = score.gather(1, best[:, None])[:, 0].double() * amax.double() ** 2
            if bool(((est_best > lower0) & (est_best < upper0) & undecided).any()):
                both = squared_errors(x2d, torch.stack([scale0, scale_best], 1), self.bits)
                err0, err_best = both[:, 0], both[:, 1]
            else:
                err_best = squared_errors(x2d, scale_best[:, None], self.bits)[:, 0]
                take_best = take_best | (undecided & (err_best * (1 + 1e-5) <= lower0))
                undecided = undecided & ~take_best & (err_best < upper0 * (1 + 1e-5))
                if bool(undecided.any()):
                    err0 = squared_errors(x2d, scale0[:, None], self.bits)[:, 0]
            if bool(undecided.any()):
                take_best = torch.where(undecided, err_best < err0, take_best)
        return torch.where(take_best, best_clip, amax)

    def _bounds(self, counts, amax, best, scale0, scale_best):
        """float64 ``[C]`` lower/upper error bounds of k = 0 and of the best candidate from the cached bound
        tables (:func:`calibkit.quant.histogram.squared_error_bound_tables`) for the signed histogram ``counts``
        ``[C, 2B]`` (any ``B``), or None where those do not apply (a scale clamped at ``MIN_SCALE``, or
        ``bins / amax`` overflowing float32). One row: tables of just the two candidates (the fine bins make
        a table of all of them large); several rows: the table of every candidate."""
        bins = counts.shape[1] // 2
        if not (bool((scale_best > MIN_SCALE).all()) and bool(torch.isfinite(bins / amax).all())):
            return None
        if counts.shape[0] == 1:
            shrinks, rows = (self.shrinks[0], self.shrinks[int(best[0])]), best.new_ones(1)
        else:
            shrinks, rows = self.shrinks, best
        lo_t, hi_t = squared_error_bound_tables(self.bits, bins, shrinks, device=amax.device)
        c = counts.double()
        lo = torch.stack([c @ lo_t[0], (c * lo_t.index_select(0, rows)).sum(1)], 1)        # [C, 2]: k = 0, best
        hi = torch.stack([c @ hi_t[0], (c * hi_t.index_select(0, rows)).sum(1)], 1)
        s2 = torch.stack([scale0, scale_best], 1).double() ** 2
        lo, hi = lo * s2, hi * s2
        return lo[:, 0] * (1 - 1e-5), hi[:, 0], lo[:, 1], hi[:, 1]

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """On ``device``, built once per observer (not state): the float32 error table ``[2B, K]``, the
        candidate shrinks ``[K]``, and the int64 order ``[2B]`` that turns a signed histogram into the
        table's row order (``|x|`` bins of the positive values, then of the negative ones)."""
        key = (device, self.bits, self.shrinks)
        cached = self.__dict__.get("_table_cache")
        if cached is None or cached[0] != key:
            B = self.SCORE_BINS
            table = squared_error_table(self.bits, B, self.shrinks, device, torch.float32)
            order = torch.cat([torch.arange(B, 2 * B), torch.arange(B - 1, -1, -1)]).to(device)
            cached = (key, table, torch.tensor(self.shrinks, dtype=torch.float32, device=device), order)
            self.__dict__["_table_cache"] = cached
        return cached[1:]

    def _scores(self, counts: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Estimated error of every candidate (float32 ``[K]``) for one row of ``|x|`` bin counts.

        float32 (the estimate itself is good to ~0.1 %; the float32 table stays in cache); one row
        at a time so that a channel scores exactly as the same data would per tensor."""
        used = torch.nonzero(counts)[:, 0]
        if used.numel() <= 256:  # small tensors: only the non-empty bins
            return (counts.index_select(0, used).float()[:, None] * table.index_select(0, used)).sum(0)
        return counts.float() @ table

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stride={self.stride}"


class MixObserver(_BatchClipObserver):
    """``mix``: per batch, the percentile setting whose clip has the least *measured* L2 error.

    No parameters to tune besides ``bits``, ``averaging_constant``, ``ch_axis`` (per channel supported).
    Candidates are exact percentiles of ``|x|`` (order statistics, see
    :func:`calibkit.quant.histogram.abs_order_statistics`) for ``PERCENTILES`` = 99 %, then tail fractions
    ``10**(-2 - j/4)`` down to 99.99999 %, and 100 % (the max). The L2 quantize-dequantize error is
    measured on the batch for the ``COARSE`` settings, then for the settings two and one grid steps on
    either side of the best so far; the least measured error wins (ties keep the earlier best).
    The clip is moving-averaged.
    """

    name = "mix"
    PERCENTILES = tuple(100.0 - 10.0 ** (-j / 4) for j in range(21)) + (100.0,)
    COARSE = (0, 4, 8, 12, 16, 21)

    def _batch_clip(self, x2d: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        C, N = x2d.shape
        clips = abs_order_statistics(x2d, percentile_ranks(self.PERCENTILES, N).to(x2d.device))   # [C, P]
        last = len(self.PERCENTILES) - 1

        def errors(idx: torch.Tensor) -> torch.Tensor:
            return squared_errors(x2d, scale_from_amax(clips.gather(1, idx), self.bits), self.bits)

        idx = torch.tensor(self.COARSE, device=x2d.device).expand(C, -1)
        best_err, pos = errors(idx).min(1)
        best = idx.gather(1, pos[:, None])[:, 0]
        for step in (2, 1):
            idx = torch.stack([best - step, best + step], 1).clamp_(0, last)
            err, pos = errors(idx).min(1)
            better = err < best_err
            best = torch.where(better, idx.gather(1, pos[:, None])[:, 0], best)
            best_err = torch.where(better, err, best_err)
        return clips.gather(1, best[:, None])[:, 0]


class KLObserver(ObserverBase):
    """``kl``: TensorRT-style entropy calibration on a histogram of ``|x|`` accumulated over batches.

    Args:
        bins: resolution of the first batch's range (the power-of-two bin width just below
            ``max|x| / bins``); integer in [2**(bits-1) + 1, 2**20] (default 2048): the search needs
            more bins than the ``2**(bits-1)`` quantization levels per sign.
        update_interval: search for the threshold every this many steps (integer >= 1, default 1);
            it must not exceed the number of calibration steps, else no threshold exists and reading
            the qparams raises :class:`CalibrationError`.
        bits, averaging_constant: see :class:`ObserverBase`. Per tensor only (``ch_axis=None``).

    Each search (over all candidate thresholds, see :func:`calibkit.quant.histogram.kl_divergences`) uses
    every batch seen so far; its result is one sample of the moving average (the first sets it).
    Before the search, bin 0 (``[0, width)``) gets the count of bin 1 (as in NVIDIA ModelOpt): it holds
    the exact zeros of ReLU outputs, which every grid represents exactly and which would otherwise
    dominate the divergence; for smooth densities of ``|x|`` bins 0 and 1 hold about the same count.
    Search cost ``O(L * 2**(bits-1))`` for ``L <= 8 * bins`` bins.
    Buffers: ``amax``, ``steps``, ``searches`` (saved); the histogram is not saved.
    """

    name = "kl"
    supports_per_channel = False

    def __init__(self, bits: int = 8, averaging_constant: float = 0.01, ch_axis: None = None,
                 bins: int = 2048, update_interval: int = 1):
        super().__init__(bits, averaging_constant, ch_axis)
        levels = 2 ** (self.bits - 1)
        self.bins = check_int_range("bins", bins, levels + 1, MAX_BINS,
                                    f" for the kl observer at bits={self.bits} (it needs more bins than the "
                                    f"2**(bits-1) = {levels} quantization levels per sign)")
        self.update_interval = check_int_range("update_interval", update_interval, 1)
        self.register_buffer("searches", torch.tensor(0, dtype=torch.int64))
        self.histogram = AccumulatingHistogram(self.bins)

    def _scans_input(self, x: torch.Tensor) -> bool:
        # after the first batch, the compiled kernel bins a CPU float32 batch and finds its max and NaN/Inf in one pass
        return self.histogram.native_ready(x)

    def _observe(self, x: torch.Tensor) -> None:
        self.histogram.add(x, self._tensor_minmax(), owner=type(self).__name__)
        if (int(self.steps) + 1) % self.update_interval == 0:
            self._search()

    def _search(self) -> None:
        hist = self.histogram
        if hist.counts is None:
            clip = 0.0
        else:
            counts = hist.counts.clone()
            if counts.numel() > 1:
                counts[0] = counts[1]  # bin 0 holds the exact zeros (ReLU): see the class docstring
            clip = min(kl_threshold_bins(counts, 2 ** (self.bits - 1)) * hist.width, hist.max_value)
        new = torch.tensor(clip, dtype=torch.float32, device=self.amax.device)
        self.amax = new if int(self.searches) == 0 else self.amax + self.averaging_constant * (new - self.amax)
        self.searches += 1

    def _require_data(self) -> None:
        super()._require_data()
        if int(self.searches) == 0:
            raise CalibrationError(
                f"update_interval={self.update_interval} is larger than the {int(self.steps)} calibration steps run: "
                "use update_interval <= number of calibration steps")

    def reset(self) -> None:
        super().reset()
        self.searches.zero_()
        self.histogram.reset()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bins={self.bins}, update_interval={self.update_interval}"


_REGISTRY: dict[str, type[ObserverBase]] = {}
#: Alternative spellings accepted by ``get_observer_class`` (the spec's CamelCase names).
_ALIASES = {"MovingAverageMinMax": "moving_average_min_max",
            "MovingAveragePerChannelMinMax": "moving_average_per_channel_min_max"}


def register_observer(cls: type[ObserverBase]) -> type[ObserverBase]:
    """Register an observer class under ``cls.name`` (usable by name in qconfigs)."""
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (MinMaxObserver, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver, FixedScaleObserver,
             PercentileObserver, MSEObserver, KLObserver, MixObserver):
    register_observer(_cls)


def observer_names() -> list[str]:
    """Names accepted by ``get_observer_class`` / qconfigs."""
    return sorted(_REGISTRY)


def get_observer_class(name_or_class: str | type[ObserverBase]) -> type[ObserverBase]:
    """Resolve an observer name (e.g. ``"mse"``) or class; unknown names raise ``ValueError``."""
    if isinstance(name_or_class, type) and issubclass(name_or_class, ObserverBase):
        return name_or_class
    if isinstance(name_or_class, str) and _ALIASES.get(name_or_class, name_or_class) in _REGISTRY:
        return _REGISTRY[_ALIASES.get(name_or_class, name_or_class)]
    raise ValueError(f"observer={name_or_class!r} is unknown: use one of {observer_names()} or an ObserverBase subclass")
