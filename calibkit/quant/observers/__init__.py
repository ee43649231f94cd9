"""Calibration observers, in the style of ``torch.ao.quantization`` observers (docs/methods.md#calibration-methods).

An observer is an ``nn.Module``: ``forward(x)`` records statistics of ``x`` and returns ``x`` unchanged;
``calculate_qparams()`` returns the symmetric scale ``amax / ((qmax - qmin) / 2)`` (float32, ``[]`` per tensor or
``[C]`` per channel along ``ch_axis``); ``get_amax()`` returns the clipping threshold ``amax``. Every observer
moving-averages its statistic with ``averaging_constant`` (docs/methods.md#averaging-constant). Only ``amax`` /
``steps`` (plus small per-method buffers) are saved in ``state_dict``; histograms are working memory.

One module per method, each class docstring stating its formula and parameters:

* :mod:`~calibkit.quant.observers.base`: :class:`ObserverBase` (state, input checks, moving average) and the
  argument checks;
* :mod:`~calibkit.quant.observers.minmax`: ``min_max``, ``moving_average_min_max``,
  ``moving_average_per_channel_min_max``; :mod:`~calibkit.quant.observers.fixed`: ``fixed_scale``;
* :mod:`~calibkit.quant.observers.percentile`, :mod:`~calibkit.quant.observers.mse`,
  :mod:`~calibkit.quant.observers.kl`, :mod:`~calibkit.quant.observers.mix`.

This module holds the registry: :func:`get_observer_class` resolves the names used in qconfigs.
"""

from __future__ import annotations

from calibkit.quant.observers.base import ObserverBase, check_averaging_constant, check_int_range, check_percentile
from calibkit.quant.observers.fixed import FixedScaleObserver
from calibkit.quant.observers.kl import KLObserver, LeftOutBatchesWarning
from calibkit.quant.observers.minmax import (MinMaxObserver, MovingAverageMinMaxObserver,
                                             MovingAveragePerChannelMinMaxObserver)
from calibkit.quant.observers.mix import MixObserver
from calibkit.quant.observers.mse import MSEObserver
from calibkit.quant.observers.percentile import PercentileObserver

__all__ = ["ObserverBase", "MinMaxObserver", "MovingAverageMinMaxObserver", "MovingAveragePerChannelMinMaxObserver",
           "FixedScaleObserver", "PercentileObserver", "MSEObserver", "KLObserver", "LeftOutBatchesWarning", "MixObserver",
           "get_observer_class", "observer_names", "register_observer", "check_averaging_constant",
           "check_percentile", "check_int_range", "CALIBRATION_METHODS"]

#: The five calibration methods of docs/methods.md#calibration-methods, in the guide's order.
CALIBRATION_METHODS = ("min_max", "percentile", "mse", "kl", "mix")

_REGISTRY: dict[str, type[ObserverBase]] = {}
#: Alternative spellings accepted by ``get_observer_class`` (the CamelCase names of docs/methods.md#min-max).
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
