"""Shared set-up of the quantization notebooks (02-06): profiles, the float model, the data splits.

Notebook 01 trains the float model and saves it; every later notebook calls :func:`setup` with
its ``profile`` and ``checkpoint_path`` parameters and gets the same, seeded ingredients:

* ``calib``: calibration batches drawn from the training split (inference preprocessing + flips),
* ``val_images`` / ``val_labels``: the validation set accuracy is measured on (a fixed, class-
  balanced subset of the test split; the whole test split in the full profile),
* ``slider_images`` / ``slider_labels``: a smaller fixed subset for interactive re-evaluation.

All image tensors are normalized float32 ``[N, 3, 32, 32]``; labels int64 ``[N]``.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from calibkit.cifar.checkpoint import load_checkpoint
from calibkit.cifar.data import ImageTensors, calibration_batches, load_cifar10, normalize
from calibkit.errors import CheckpointError
from calibkit.tutorial.settings import CalibrationChoice


@dataclass(frozen=True)
class QuantProfile:
    """Sizes used by the quantization notebooks for one profile.

    Attributes:
        calib_batches, calib_batch_size: calibration set = ``calib_batches`` x ``calib_batch_size``
            training images.
        val_images: test images used for validation accuracy (class-balanced, seeded subset;
            ``None`` = the whole test split).
        slider_images: test images re-evaluated on every slider move (first of ``val_images``).
        qat_epochs, qat_train_images: QAT budget (notebook 06).
    """

    name: str
    calib_batches: int
    calib_batch_size: int
    val_images: int | None
    slider_images: int
    qat_epochs: float
    qat_train_images: int | None


QUANT_PROFILES = {
    "full": QuantProfile("full", calib_batches=32, calib_batch_size=128, val_images=None, slider_images=2000,
                         qat_epochs=2.0, qat_train_images=None),
    "smoke": QuantProfile("smoke", calib_batches=4, calib_batch_size=64, val_images=1000, slider_images=300,
                          qat_epochs=0.25, qat_train_images=4000),
}


def get_quant_profile(profile: str) -> QuantProfile:
    if profile not in QUANT_PROFILES:
        raise ValueError(f"profile={profile!r} is unknown: use one of {sorted(QUANT_PROFILES)}")
    return QUANT_PROFILES[profile]


#: Per-profile defaults of the notebooks' optional parameters (a parameter cell value of ``None`` takes these):
#: notebook 02's sweep grids and steps curve, notebook 04's calibration seeds and tuning budget, notebook 05's
#: report and sweep sizes, notebook 06's QAT budget and tie tolerance. Smoke must finish
#: in about a minute on 2 CPU cores.
NOTEBOOK_DEFAULTS: dict[str, dict[str, dict]] = {
    "02": {
        "full": dict(sweep_batch_sizes=[32, 256], sweep_averaging_constants=[0.01, 0.1, 0.5], sweep_steps=[2, 16, 128],
                     sweep_bits=[8, 6, 4], curve_steps=[1, 2, 4, 8, 16, 32, 64, 128], curve_seeds=[0, 1],
                     curve_bits=[8, 4]),
        "smoke": dict(sweep_batch_sizes=[16, 64], sweep_averaging_constants=[0.01, 0.1, 0.5], sweep_steps=[2, 16],
                      sweep_bits=[8, 6, 4], curve_steps=[1, 2, 4, 8, 16, 32, 64, 128], curve_seeds=[0],
                      curve_bits=[8, 4]),
    },
    "04": {
        "full": dict(calib_seeds=[0, 1], tune_max_evals=24),
        "smoke": dict(calib_seeds=[0], tune_max_evals=12),
    },
    "05": {
        "full": dict(max_overrides=6, debug_batches=4, sensitivity_top_k=8),
        "smoke": dict(max_overrides=3, debug_batches=2, sensitivity_top_k=3),
    },
    "06": {  # QAT budget from QUANT_PROFILES; qat_train_images None = every training image
        "full": dict(qat_epochs=QUANT_PROFILES["full"].qat_epochs, qat_train_images=QUANT_PROFILES["full"].qat_train_images,
                     qat_evals=8, tie_tolerance=0.002),
        "smoke": dict(qat_epochs=QUANT_PROFILES["smoke"].qat_epochs,
                      qat_train_images=QUANT_PROFILES["smoke"].qat_train_images, qat_evals=2, tie_tolerance=0.01),
    },
    "07": {  # the stand-in "own" model: training steps and folder sizes (images per class), calibration batches
        "full": dict(train_steps=1200, train_per_class=2000, eval_per_class=300, calib_batches=8, batch_size=32),
        "smoke": dict(train_steps=150, train_per_class=500, eval_per_class=80, calib_batches=2, batch_size=32),
    },
    "08": {  # timed runs per model and runtime (median) in the deployment table
        "full": dict(latency_repeats=10),
        "smoke": dict(latency_repeats=2),
    },
}


def resolve_parameters(notebook: str, profile: str, **values) -> SimpleNamespace:
    """The parameters of ``notebook`` ("02", "04", "05", "06") for ``profile``: each of ``values`` as given, or where it is
    ``None`` (or not given) the profile's default from :data:`NOTEBOOK_DEFAULTS`."""
    if notebook not in NOTEBOOK_DEFAULTS:
        raise ValueError(f"notebook={notebook!r} is unknown: use one of {sorted(NOTEBOOK_DEFAULTS)}")
    defaults = NOTEBOOK_DEFAULTS[notebook][get_quant_profile(profile).name]
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(f"notebook {notebook} has no parameter {unknown}: use some of {sorted(defaults)}")
    return SimpleNamespace(**{k: deepcopy(default) if values.get(k) is None else values[k] for k, default in defaults.items()})


def load_float_model(checkpoint_path: str | Path, device=None) -> tuple[nn.Module, dict]:
    """The float model notebook 01 trained (eval mode), with its metadata.

    A missing file raises ``CheckpointError`` telling how to create it.
    """
    path = Path(checkpoint_path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint_path={str(path)!r} does not exist. The quantization notebooks start from the float model "
            "that notebook 01 trains: run it first (`make tutorial`, or "
            "`python -m calibkit.tutorial.runner --profile smoke --only 01` for a fast one) or point checkpoint_path at "
            "your own calibkit checkpoint.")
    model, meta = load_checkpoint(path, map_location=device or "cpu")
    return model.eval(), meta


@dataclass
class TutorialSetup:
    """What :func:`setup` returns (see the module docstring)."""

    profile: QuantProfile
    model: nn.Module
    meta: dict
    data: ImageTensors
    calib: list[torch.Tensor]
    val_images: torch.Tensor
    val_labels: torch.Tensor
    slider_images: torch.Tensor
    slider_labels: torch.Tensor
    seed: int
    notes: dict = field(default_factory=dict)
    choice: CalibrationChoice | None = None

    @property
    def averaging_constant(self) -> float:
        """The averaging constant every activation observer of notebooks 03-06 uses: notebook 02's choice, or the
        observers' default 0.01 without one."""
        return self.choice.averaging_constant if self.choice is not None else 0.01

    @property
    def calibration_settings(self) -> dict:
        """What the notebooks calibrate with, for their ``metrics.json``: batch size and averaging constant."""
        return {"batch_size": int(self.calib[0].shape[0]), "averaging_constant": self.averaging_constant}

    @property
    def example_inputs(self) -> tuple[torch.Tensor]:
        return (self.calib[0][:2],)

    def describe(self) -> str:
        p = self.profile
        if self.choice is not None:
            chosen = (f"batch size {self.choice.batch_size} and averaging constant {self.choice.averaging_constant} "
                      f"as notebook 02 chose them ({self.choice.source})")
        else:
            chosen = (f"the profile's batch size {p.calib_batch_size} and the default averaging constant 0.01 "
                      "(no choice of notebook 02 was given or found)")
        return (f"profile={p.name}: calibration {len(self.calib)} x {self.calib[0].shape[0]} training images (seed "
                f"{self.seed}, flips), {chosen}; validation {len(self.val_labels)} test images, slider subset "
                f"{len(self.slider_labels)} test images; data {self.data.source}")


def setup(profile: str, checkpoint_path: str | Path, data_dir=None, seed: int = 0, device=None,
          progress: bool = False, choice: CalibrationChoice | None = None) -> TutorialSetup:
    """Load the float model and build the calibration / validation data for ``profile``.

    ``choice``: notebook 02's batch size and averaging constant (:func:`~calibkit.tutorial.settings.
    find_calibration_choice`); the calibration set is then the profile's number of batches at that batch size, and
    ``averaging_constant`` returns its constant. ``None``: the profile's batch size and the default constant."""
    prof = get_quant_profile(profile)
    model, meta = load_float_model(checkpoint_path, device)
    data = load_cifar10(data_dir, progress=progress)
    test = data.subset(test=prof.val_images, seed=seed) if prof.val_images is not None else data
    dev = torch.device(device or "cpu")
    val_x, val_y = normalize(test.test_images).to(dev), test.test_labels.to(dev)
    n_slider = min(prof.slider_images, len(val_y))
    slider = test.subset(train=0, test=n_slider, seed=seed)
    batch_size = choice.batch_size if choice is not None else prof.calib_batch_size
    calib = calibration_batches(data, prof.calib_batches, batch_size, seed=seed, flip=True, device=dev)
    return TutorialSetup(prof, model, meta, data, calib, val_x, val_y, normalize(slider.test_images).to(dev),
                         slider.test_labels.to(dev), seed, choice=choice)
