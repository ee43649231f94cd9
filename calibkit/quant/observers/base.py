"""What every observer shares: its state, the moving average, the input checks and the argument checks.

An observer is an ``nn.Module``: ``forward(x)`` records statistics of ``x`` and returns ``x`` unchanged;
``calculate_qparams()`` returns the symmetric scale ``amax / ((qmax - qmin) / 2)`` (float32, shape ``[]`` per
tensor or ``[C]`` per channel along ``ch_axis``; docs/methods.md#quantization-scheme); ``get_amax()`` returns
the clipping threshold ``amax`` it is derived from.
"""

from __future__ import annotations

import torch
from torch import nn

from calibkit.checks import check_int, check_number
from calibkit.errors import CalibrationError
from calibkit.quant import distributed
from calibkit.quant.histogram import nonfinite_error
from calibkit.quant.intra_op import single_threaded
from calibkit.quant.numerics import check_bits, scale_from_amax

#: Largest float32 value: scales and histograms are float32, so larger (float64) inputs are refused.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_averaging_constant(c: float) -> float:
    """The moving-average weight of a new batch as a float: a number in [0, 1] (docs/methods.md#averaging-constant)."""
    return check_number("averaging_constant", c, 0, 1)


def check_percentile(percentile: float) -> float:
    """A percentile as a float: a number in (0, 100] (docs/methods.md#percentile)."""
    return check_number("percentile", percentile, 0, 100, low_open=True)


def check_int_range(name: str, value: int, lo: int, hi: int | None = None, why: str = "") -> int:
    """An integer parameter in ``[lo, hi]`` (``hi=None``: no upper bound): :func:`calibkit.checks.check_int`."""
    return check_int(name, value, lo, hi, why)


class ObserverBase(nn.Module):
    """Common state and checks of every observer.

    Every observer moving-averages its statistic ``v`` with ``averaging_constant`` c: the first batch sets it,
    then ``v <- v + c * (v_batch - v)``; c = 0 freezes it after the first batch, c = 1 keeps only the latest
    batch (docs/methods.md#averaging-constant).

    Args:
        bits: bit width of the signed symmetric integer grid, 2..16 (default 8).
        averaging_constant: moving-average weight of each new batch, in [0, 1] (default 0.01).
        ch_axis: ``None`` for per-tensor statistics, else the channel axis (per-channel, weights).

    Buffers (saved in ``state_dict``): ``amax`` (float32, ``[]`` or ``[C]``; 0 until data is seen)
    and ``steps`` (int64 number of batches observed). Histograms are working memory, never saved.

    Under ``torch.distributed`` (:func:`calibkit.quant.distributed.world_size` > 1) each batch's statistic
    (:meth:`_batch_stat`) is gathered from every rank and absorbed rank by rank (:meth:`_observe_ranks`), so
    ``steps`` counts the batches of all ranks (docs/methods.md#many-processes).
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

    # -- interface ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Records the statistics of ``x`` (one calibration batch) and returns ``x`` unchanged."""
        with single_threaded(x):  # short passes: see calibkit.quant.intra_op
            xd = self._check_input(x)
            if distributed.world_size() > 1:
                self._observe_ranks(xd)
            else:
                self._observe(xd)
                self.steps += 1
        return x

    def _observe(self, x: torch.Tensor) -> None:
        """Records one batch: :meth:`_absorb` of :meth:`_batch_stat` (or an override)."""
        self._absorb(self._batch_stat(x))

    def _batch_stat(self, x: torch.Tensor) -> torch.Tensor:
        """The batch's statistic as one tensor on ``x``'s device, to be moving-averaged by :meth:`_absorb`."""
        raise CalibrationError(
            f"{type(self).__name__} has no per-batch statistic to share across ranks under torch.distributed: "
            "implement _batch_stat/_absorb (or _observe_ranks), or calibrate(..., sync=False) to keep per-rank scales")

    def _absorb(self, stat: torch.Tensor) -> None:  # pragma: no cover - abstract
        """Folds one batch statistic from :meth:`_batch_stat` into the state."""
        raise NotImplementedError

    def _observe_ranks(self, x: torch.Tensor) -> None:
        """Under ``torch.distributed`` (docs/methods.md#many-processes): every rank's batch statistic, gathered, is
        absorbed in rank order, one step each, as one process fed the batches step by step, rank by rank."""
        for stat in distributed.gather_in_step_order(self._batch_stat(x)):
            self._absorb(stat)
            self.steps += 1

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

    def extra_repr(self) -> str:
        return f"bits={self.bits}, averaging_constant={self.averaging_constant}, ch_axis={self.ch_axis}"

    # -- input checks -------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` detached (floating point), after checking that it is a non-empty finite tensor whose ``ch_axis``
        exists. Per tensor, the batch (min, max) found on the way is kept for :meth:`_tensor_minmax`."""
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
            if torch.finfo(x.dtype).max > FLOAT32_MAX and max(-float(lo), float(hi)) > FLOAT32_MAX:
                raise CalibrationError(
                    f"{type(self).__name__}: input holds a value of magnitude {max(-float(lo), float(hi)):.6g} "
                    f"({x.dtype}, shape {tuple(x.shape)}), beyond the float32 range (max {FLOAT32_MAX:.6g}) in "
                    "which scales are computed -- check the model / data for overflow")
        if self.ch_axis is not None and not (-x.dim() <= self.ch_axis < x.dim()):
            raise ValueError(f"ch_axis={self.ch_axis} is out of range for a {x.dim()}-d tensor")
        return x

    def _scans_input(self, x: torch.Tensor) -> bool:
        """True when ``_observe(x)`` itself detects NaN/Inf (raising :func:`~calibkit.quant.histogram.nonfinite_error`)
        without needing the batch min/max, so the input check skips its min/max pass (default: False)."""
        return False

    def _require_data(self) -> None:
        if int(self.steps) == 0:
            raise CalibrationError(
                f"{type(self).__name__} has not observed any data: run calibration batches through the model "
                "(FakeQuantState.CALIBRATION) before reading quantization parameters")

    # -- helpers for the observers ------------------------------------------------------------
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # amax may be per-channel ([C]) in the checkpoint while a fresh observer holds a scalar.
        key = prefix + "amax"
        if key in state_dict and state_dict[key].shape != self.amax.shape:
            self.amax = torch.empty_like(state_dict[key], device=self.amax.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def row_amax(x2d: torch.Tensor, minmax: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-row ``max |x|`` (float32 ``[C]``); ``minmax``: the tensor's (min, max) if already known (C = 1)."""
    if x2d.shape[0] == 1:
        lo, hi = minmax if minmax is not None else torch.aminmax(x2d)
    else:
        lo, hi = torch.aminmax(x2d, dim=1)
    return torch.maximum(-lo, hi).reshape(-1).to(torch.float32)


class BatchClipObserver(ObserverBase):
    """Observers whose statistic is a per-batch clip (``[C]``, one per row), moving-averaged: ``percentile``,
    ``mse`` and ``mix``. A subclass answers :meth:`_batch_clip`."""

    def _batch_stat(self, x: torch.Tensor) -> torch.Tensor:
        x2d = self._rows(x)
        clip = self._batch_clip(x2d, row_amax(x2d, self._tensor_minmax()))
        return clip.reshape(()) if self.ch_axis is None else clip

    def _absorb(self, stat: torch.Tensor) -> None:
        self.amax = self._average(self.amax, stat)

    def _batch_clip(self, x2d: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Clip per row (float32 ``[C]``) for this batch; ``amax``: per-row ``max |x|``."""
        raise NotImplementedError
