"""``fixed_scale``: a tensor whose range is known in advance (docs/methods.md#fixed-scale)."""

from __future__ import annotations

import math

import torch

from calibkit.checks import check_number
from calibkit.quant import distributed
from calibkit.quant.numerics import qrange
from calibkit.quant.observers.base import ObserverBase


class FixedScaleObserver(ObserverBase):
    """``fixed_scale``: a known range (e.g. a sigmoid output in [0, 1]); ``scale = amax / ((qmax - qmin) / 2)``.

    Args:
        amax: the known clipping threshold, a finite number > 0; or give ``scale`` instead.
        scale: the known scale, a finite number > 0; ``amax = scale * (qmax - qmin) / 2``.
        bits, averaging_constant, ch_axis: see :class:`ObserverBase` (averaging_constant defaults to 0, unused).

    Calibrated from construction: observing data only counts steps and checks the input; the threshold never
    changes. See docs/methods.md#fixed-scale.
    """

    name = "fixed_scale"

    def __init__(self, amax: float | None = None, scale: float | None = None, bits: int = 8,
                 averaging_constant: float = 0.0, ch_axis: int | None = None):
        super().__init__(bits, averaging_constant, ch_axis)
        if (amax is None) == (scale is None):
            raise ValueError("fixed_scale needs exactly one of amax=... or scale=... (a positive finite number)")
        if amax is not None:
            value = check_number("amax", amax, 0, math.inf, low_open=True, high_open=True)
        else:
            qmin, qmax = qrange(bits)
            value = check_number("scale", scale, 0, math.inf, low_open=True, high_open=True) * (qmax - qmin) / 2
        self.amax = torch.tensor(value)
        self.steps += 1  # the range is known: qparams are available before any data

    def _observe(self, x: torch.Tensor) -> None:
        pass

    def _observe_ranks(self, x: torch.Tensor) -> None:
        self.steps += distributed.world_size()  # nothing to share: the range is known

    def reset(self) -> None:
        pass
