"""Argument checks: the one place that decides what "out of range" says.

Every public call checks its inputs before it changes anything, and a bad value raises ``ValueError`` naming the
parameter, the value and the allowed range, e.g. ``momentum=1.5 is out of range: use a number in [0, 1)``.
Booleans are never accepted as numbers, and NaN is never in range. Shared by every floor (it imports none).
"""

from __future__ import annotations

import math
import numbers

__all__ = ["check_number", "check_int", "check_labels"]


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_number(name: str, value, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False, why: str = "") -> float:
    """``value`` as a float if it is a real number within the bounds (``None``: unbounded; ``*_open``: the bound
    itself is excluded), else ``ValueError``. ``why`` is added after "out of range" to say what the bound is."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name}={value!r} is out of range{why}: use a number {_interval(low, high, low_open, high_open)}")
    return float(value)


def check_int(name: str, value, low: int | None = None, high: int | None = None, why: str = "") -> int:
    """``value`` as an ``int`` if it is an integer (a Python or NumPy integer, not a bool) in ``[low, high]``
    (``None``: unbounded), else ``ValueError``."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        allowed = f"an integer {_interval(low, high, False, False)}" if (low, high) != (None, None) else "an integer"
        raise ValueError(f"{name}={value!r} is out of range{why}: use {allowed}")
    return int(value)


def check_labels(labels, num_classes: int) -> None:
    """``ValueError`` unless every label (an integer tensor) is a class index in ``[0, num_classes)``, the model's
    output width."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels hold values in [{int(labels.min())}, {int(labels.max())}] but the model has "
                         f"{num_classes} outputs: labels must be class indices in [0, {num_classes})")
