"""Calibration observers (spec section 3), in the style of ``torch.ao.quantization`` observers.

An observer is an ``nn.Module``: ``forward(x)`` records statistics of ``x`` and returns ``x``
unchanged; ``calculate_qparams()`` returns the symmetric scale (float32, shape ``[]`` per tensor or
``[C]`` per channel along ``ch_axis``). ``get_amax()`` returns the clipping threshold the scale is
derived from (``scale = amax / ((qmax - qmin) / 2)``).

Every observer moving-averages its statistic with ``averaging_constant`` c: the first batch sets
it, then ``v <- v + c * (v_batch - v)``; c = 0 freezes it after the first batch, c = 1 keeps only
the latest batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import CalibrationError
from .quant import check_bits, scale_from_amax


def check_averaging_constant(c: float) -> float:
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not (0.0 <= float(c) <= 1.0) or math.isnan(c):
        raise ValueError(f"averaging_constant={c!r} is out of range: use a number in [0, 1]")
    return float(c)


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
        if x.numel() == 0:
            raise CalibrationError(f"{type(self).__name__}: received an empty tensor (shape {tuple(x.shape)}); calibration batches must contain data")
        if not x.is_floating_point():
            x = x.float()
        if not bool(torch.isfinite(x).all()):
            n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
            raise CalibrationError(
                f"{type(self).__name__}: input contains {n_nan} NaN and {n_inf} Inf values (shape {tuple(x.shape)}); "
                "only finite activations can be calibrated -- check the model / data for overflow")
        if self.ch_axis is not None and not (-x.dim() <= self.ch_axis < x.dim()):
            raise ValueError(f"ch_axis={self.ch_axis} is out of range for a {x.dim()}-d tensor")
        return x

    def _channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` reshaped to ``[C, N]`` along ``ch_axis`` (per-channel observers)."""
        return x.transpose(0, self.ch_axis).reshape(x.shape[self.ch_axis], -1)

    def _average(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Moving average of a statistic; the first batch sets it."""
        new = new.to(old.device, torch.float32)
        if int(self.steps) == 0 or old.shape != new.shape:
            return new.clone()
        return old + self.averaging_constant * (new - old)

    # -- interface ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xd = self._check_input(x.detach())
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
            lo, hi = torch.aminmax(x)
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
            from .quant import qrange
            qmin, qmax = qrange(bits)
            value = scale * (qmax - qmin) / 2
        self.amax = torch.tensor(float(value))
        self.steps += 1  # the range is known: qparams are available before any data

    def _observe(self, x: torch.Tensor) -> None:
        pass

    def reset(self) -> None:
        pass


_REGISTRY: dict[str, type[ObserverBase]] = {}


def register_observer(cls: type[ObserverBase]) -> type[ObserverBase]:
    """Register an observer class under ``cls.name`` (usable by name in qconfigs)."""
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (MinMaxObserver, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver, FixedScaleObserver):
    register_observer(_cls)


def observer_names() -> list[str]:
    """Names accepted by ``get_observer_class`` / qconfigs."""
    return sorted(_REGISTRY)


def get_observer_class(name_or_class: str | type[ObserverBase]) -> type[ObserverBase]:
    """Resolve an observer name (e.g. ``"mse"``) or class; unknown names raise ``ValueError``."""
    if isinstance(name_or_class, type) and issubclass(name_or_class, ObserverBase):
        return name_or_class
    if isinstance(name_or_class, str) and name_or_class in _REGISTRY:
        return _REGISTRY[name_or_class]
    raise ValueError(f"observer={name_or_class!r} is unknown: use one of {observer_names()} or an ObserverBase subclass")
