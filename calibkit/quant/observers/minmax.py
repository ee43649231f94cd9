"""``min_max`` and its fixed-granularity variants (docs/methods.md#min-max)."""

from __future__ import annotations

import torch

from calibkit.quant.observers.base import ObserverBase


class MinMaxObserver(ObserverBase):
    """``min_max``: moving average of the batch min and max; ``amax = max(|min_avg|, |max_avg|)``.

    Args:
        bits, averaging_constant, ch_axis: see :class:`ObserverBase` (bits 2..16, averaging_constant in
            [0, 1], per tensor or per channel).

    Fastest method; use it first to choose batch size and ``averaging_constant``
    (docs/methods.md#choosing-batch-size-and-averaging-constant). Extra buffers: ``min_val``, ``max_val``.
    See docs/methods.md#min-max.
    """

    name = "min_max"

    def __init__(self, bits: int = 8, averaging_constant: float = 0.01, ch_axis: int | None = None):
        super().__init__(bits, averaging_constant, ch_axis)
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))

    def _batch_stat(self, x: torch.Tensor) -> torch.Tensor:
        """The batch's ``(min, max)`` stacked: ``[2]`` per tensor, ``[2, C]`` per channel."""
        if self.ch_axis is None:
            lo, hi = self._batch_minmax  # computed by the input check
        else:
            lo, hi = torch.aminmax(self._channels_first(x), dim=1)
        return torch.stack([lo, hi])

    def _absorb(self, stat: torch.Tensor) -> None:
        self.min_val = self._average(self.min_val, stat[0])
        self.max_val = self._average(self.max_val, stat[1])
        self.amax = torch.maximum(self.min_val.abs(), self.max_val.abs())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for k in ("min_val", "max_val"):  # per channel ([C]) in the checkpoint, a scalar in a fresh observer
            if prefix + k in state_dict and state_dict[prefix + k].shape != getattr(self, k).shape:
                setattr(self, k, torch.empty_like(state_dict[prefix + k], device=self.amax.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """``MovingAverageMinMax``: per-tensor moving-average min/max (activations); a ``ch_axis`` raises."""

    name = "moving_average_min_max"
    supports_per_channel = False

    def __init__(self, bits: int = 8, averaging_constant: float = 0.01, ch_axis: None = None):
        super().__init__(bits, averaging_constant, ch_axis)


class MovingAveragePerChannelMinMaxObserver(MinMaxObserver):
    """``MovingAveragePerChannelMinMax``: per-channel moving-average min/max (weights), ``ch_axis`` default 0
    (``None`` raises)."""

    name = "moving_average_per_channel_min_max"

    def __init__(self, bits: int = 8, averaging_constant: float = 0.01, ch_axis: int = 0):
        if ch_axis is None:
            raise ValueError("ch_axis=None: MovingAveragePerChannelMinMax needs a channel axis (e.g. 0 for conv weights)")
        super().__init__(bits, averaging_constant, ch_axis)
