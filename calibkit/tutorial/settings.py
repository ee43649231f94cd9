"""What the experiments of notebooks 02 and 04 share: the methods, the quantization settings, the calibration data.

Calibration batches are lists of normalized float ``[B, 3, H, W]`` tensors; a *batches function* is
``(num_batches, batch_size, seed) -> batches``, built from an ``ImageTensors`` dataset by :func:`batches_fn`.
See docs/methods.md#calibration-workflow and docs/methods.md#calibration-data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from calibkit.checks import check_int
from calibkit.cifar.data import ImageTensors, calibration_batches
from calibkit.errors import CalibrationError
from calibkit.quant.numerics import check_bits
from calibkit.quant.observers import CALIBRATION_METHODS, check_averaging_constant
from calibkit.quant.qconfig import QConfig, get_default_qconfig

__all__ = ["METHODS", "QuantSetting", "SETTINGS", "BatchesFn", "batches_fn", "calibration_sets", "check_batches",
           "example_inputs_of", "positive_ints", "mean", "CalibrationChoice", "CHOICE_FILE", "find_calibration_choice"]

#: The five calibration methods (docs/methods.md#calibration-methods), in the order of the method table.
METHODS = CALIBRATION_METHODS


@dataclass(frozen=True)
class QuantSetting:
    """One quantization setting: activation / weight bit widths and weight granularity.

    Activations are always per tensor with the method under test; weights use ``min_max`` (the
    recommended weight observer, docs/methods.md#min-max), per output channel or per tensor.
    """

    name: str
    activation_bits: int = 8
    weight_bits: int = 8
    per_channel_weights: bool = True

    def __post_init__(self):
        check_bits(self.activation_bits, "activation_bits")
        check_bits(self.weight_bits, "weight_bits")

    def qconfig(self, method: str = "min_max", **activation_kwargs) -> QConfig:
        """The qconfig for ``method`` on activations (``activation_kwargs`` go to its observer)."""
        return get_default_qconfig(activation_observer=method, weight_observer="min_max",
                                   activation_kwargs=activation_kwargs,
                                   weight_kwargs=None if self.per_channel_weights else {"ch_axis": None},
                                   activation_bits=self.activation_bits, weight_bits=self.weight_bits)

    def describe(self) -> str:
        w = "per-channel" if self.per_channel_weights else "per-tensor"
        return f"{self.activation_bits}-bit activations, {self.weight_bits}-bit {w} weights"


#: The settings notebook 04 compares the methods on: int8 with per-channel and per-tensor weights,
#: then 6- and 4-bit activations (8-bit per-channel weights), where the methods separate.
SETTINGS = (
    QuantSetting("a8/w8-ch", 8, 8, True),
    QuantSetting("a8/w8-tensor", 8, 8, False),
    QuantSetting("a6/w8-ch", 6, 8, True),
    QuantSetting("a4/w8-ch", 4, 8, True),
)

BatchesFn = Callable[[int, int, int], list]


def batches_fn(data, device=None) -> BatchesFn:
    """``(num_batches, batch_size, seed) -> batches`` from an ``ImageTensors`` dataset (flips on) or a callable."""
    if isinstance(data, ImageTensors):
        return lambda n, bs, seed: calibration_batches(data, n, bs, seed=seed, flip=True, device=device)
    if callable(data):
        return data
    raise TypeError(f"data must be an ImageTensors dataset (calibkit.cifar.data.load_cifar10) or a callable "
                    f"(num_batches, batch_size, seed) -> list of batches, got {type(data).__name__}")


def calibration_sets(data, seeds: Sequence[int], num_batches: int, batch_size: int, device=None) -> dict[int, list]:
    """``{seed: batches}``: one calibration set per seed (same size, different images / flips)."""
    get = batches_fn(data, device)
    return {int(s): get(num_batches, batch_size, int(s)) for s in seeds}


def check_batches(calib) -> list:
    """``calib`` as a list; an empty one raises ``CalibrationError``."""
    calib = list(calib)
    if not calib:
        raise CalibrationError("calib is empty: calibration needs at least one batch")
    return calib


def example_inputs_of(example_inputs, calib) -> tuple:
    """``example_inputs`` for tracing, or by default the first two images of the first batch."""
    if example_inputs is not None:
        return example_inputs
    first = calib[0]
    first = first[0] if isinstance(first, (tuple, list)) else first
    return (first[:2],)


def positive_ints(name: str, values) -> list[int]:
    """``values`` as a non-empty list of integers >= 1, else ``ValueError`` naming ``name``."""
    values = list(values)
    if not values:
        raise ValueError(f"{name}={values!r} is out of range: use a non-empty list of integers >= 1")
    for v in values:
        check_int(name, v, 1)
    return values


def mean(xs) -> float:
    """``sum / len`` -- not ``statistics.mean``, whose exact arithmetic can differ in the last bit from the
    numbers the recorded results were computed with."""
    xs = list(xs)
    return sum(xs) / len(xs)


#: the file notebook 02 writes its choice into, in its output folder
CHOICE_FILE = "calibration_choice.json"


@dataclass(frozen=True)
class CalibrationChoice:
    """The batch size and averaging constant notebook 02 chose with ``min_max`` (docs/methods.md#calibration-workflow):
    every later notebook calibrates with them. ``steps``: the number of calibration batches the choice was made at;
    ``accuracy``: its accuracy there; ``source``: where it was read from."""

    batch_size: int
    averaging_constant: float
    steps: int
    accuracy: float
    source: str = ""

    def __post_init__(self):
        check_int("batch_size", self.batch_size, 1)
        check_int("steps", self.steps, 1)
        check_averaging_constant(self.averaging_constant)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({k: v for k, v in asdict(self).items() if k != "source"}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationChoice":
        path = Path(path)
        try:
            values = json.loads(path.read_text())
            return cls(int(values["batch_size"]), float(values["averaging_constant"]), int(values["steps"]),
                       float(values["accuracy"]), str(path))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"calibration choice file {str(path)!r} is unreadable ({e}): re-run notebook 02, "
                             f"which writes it") from e


def find_calibration_choice(output_dir: str | Path, path: str | Path | None = None) -> CalibrationChoice | None:
    """Notebook 02's choice: from ``path`` if given (it must exist), else from the ``02_calibration_workflow``
    folder beside ``output_dir`` (the runner's layout); ``None`` when that folder has none."""
    if path is not None:
        if not Path(path).exists():
            raise FileNotFoundError(f"calibration_choice={str(path)!r} does not exist: run notebook 02, or pass None")
        return CalibrationChoice.load(path)
    default = Path(output_dir).parent / "02_calibration_workflow" / CHOICE_FILE
    return CalibrationChoice.load(default) if default.exists() else None
