"""Your images in: an image folder with the model's inference preprocessing, split into calibration and
evaluation images (``docs/methods.md#calibration-data``: calibrate on what inference sees).

* :class:`Preprocessing` -- the torchvision classification preset, built from ``torchvision.transforms.v2``
  only: ``Resize(resize_size)`` (shorter side, bilinear, antialiased), ``CenterCrop(image_size)``,
  ``ToDtype(float32, scale=True)`` (uint8 ``[0, 255]`` to ``[0, 1]``), ``Normalize(mean, std)``, i.e.
  ``x = (pixel / 255 - mean[c]) / std[c]``. ``resize_size`` defaults to ``round(image_size / 0.875)``
  (256 for 224, as torchvision's weights use).
* :func:`image_folder` -- ``torchvision.datasets.ImageFolder`` (``root/<class>/<image>``) with that transform;
  a missing folder or one without images raises :class:`~calibkit.errors.DataNotFoundError`.
* :func:`image_data` -- the calibration batches and the evaluation ``DataLoader``: from one folder, a seeded
  permutation gives the first ``calib_batches * batch_size`` images to calibration and the rest to evaluation;
  with ``val_root`` every image of ``root``'s permutation may calibrate and ``val_root`` is evaluated whole
  (its classes must be ``root``'s). Calibration batches are loaded once, so every method sees the same tensors;
  evaluation streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from calibkit.checks import check_int, check_number
from calibkit.errors import DataNotFoundError

__all__ = ["Preprocessing", "ImageData", "image_folder", "image_data", "parse_floats", "MIN_IMAGE_SIZE",
           "MAX_IMAGE_SIZE"]

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 4096


def parse_floats(name: str, text: str | Sequence[float]) -> tuple[float, ...]:
    """``"0.49,0.48,0.45"`` (or a sequence) as a tuple of floats; ``ValueError`` naming ``name`` otherwise."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        return tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={text!r} is not a list of numbers: use e.g. 0.485,0.456,0.406") from None


@dataclass(frozen=True)
class Preprocessing:
    """Inference preprocessing of one model: ``image_size`` (crop side, pixels), per-channel ``mean`` and
    ``std`` (of ``[0, 1]`` pixels, one per channel), ``resize_size`` (shorter side before the crop; ``None``:
    ``round(image_size / 0.875)``). Checked at construction: sizes in ``[8, 4096]`` with
    ``resize_size >= image_size``, ``mean`` and ``std`` of ``channels`` finite values, ``std > 0``."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_size: int | None = None
    channels: int = 3

    def __post_init__(self):
        check_int("image_size", self.image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        if self.resize_size is None:
            object.__setattr__(self, "resize_size", max(self.image_size, round(self.image_size / 0.875)))
        check_int("resize_size", self.resize_size, self.image_size, MAX_IMAGE_SIZE,
                  why=" (the shorter side is resized before the center crop of image_size)")
        for name, low, low_open in (("mean", None, False), ("std", 0.0, True)):
            values = parse_floats(name, getattr(self, name))
            if len(values) != self.channels:
                raise ValueError(f"{name}={list(values)} has {len(values)} values: use one per channel "
                                 f"({self.channels}, e.g. 0.485,0.456,0.406)")
            for c, v in enumerate(values):
                check_number(f"{name}[{c}]", v, low, None, low_open=low_open)
            if any(v in (float("inf"), float("-inf")) for v in values):
                raise ValueError(f"{name}={list(values)} holds an infinite value: use finite numbers")
            object.__setattr__(self, name, values)

    def transform(self) -> v2.Compose:
        """The ``transforms.v2`` pipeline (PIL image or uint8 tensor in, normalized float32 ``[C, H, W]`` out)."""
        return v2.Compose([v2.ToImage(), v2.Resize(self.resize_size, antialias=True), v2.CenterCrop(self.image_size),
                           v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std))])

    def as_dict(self) -> dict:
        return {"image_size": self.image_size, "resize_size": self.resize_size, "mean": list(self.mean),
                "std": list(self.std)}


def image_folder(root: str | Path, preprocessing: Preprocessing, param: str = "data") -> ImageFolder:
    """``ImageFolder(root)`` with ``preprocessing``'s transform; ``DataNotFoundError`` (naming ``param``) for a
    missing folder, a folder without class folders or class folders without images."""
    path = Path(root)
    if not path.is_dir():
        raise DataNotFoundError(f"{param}={str(path)!r} is not a folder: give a folder of class folders "
                                "(DIR/<class>/<image>.jpg)")
    try:
        return ImageFolder(str(path), transform=preprocessing.transform())
    except FileNotFoundError as e:  # no class folder, or no image with a known extension in any of them
        raise DataNotFoundError(f"{param}={str(path)!r} holds no images: ImageFolder wants DIR/<class>/<image> "
                                f"(.jpg, .png, ...) ({e})") from None


@dataclass
class ImageData:
    """What :func:`image_data` returns: ``calib`` (list of ``[B, C, H, W]`` tensors, the same for every
    method), ``eval_loader`` (a ``DataLoader`` of ``(images, labels)``), ``classes``, the image counts and the
    preprocessing."""

    calib: list[torch.Tensor]
    eval_loader: DataLoader
    classes: list[str]
    calib_images: int
    eval_images: int
    preprocessing: Preprocessing

    def describe(self) -> str:
        return (f"{len(self.classes)} classes, calibration {self.calib_images} images in {len(self.calib)} batches, "
                f"evaluation {self.eval_images} images ({self.preprocessing.resize_size} px resize, "
                f"{self.preprocessing.image_size} px crop)")


def _calibration_batches(dataset, indices: list[int], batch_size: int, workers: int) -> list[torch.Tensor]:
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=workers)
    return [x for x, _ in loader]


def image_data(root: str | Path, preprocessing: Preprocessing, calib_batches: int, batch_size: int,
               val_root: str | Path | None = None, seed: int = 0, eval_batch_size: int | None = None,
               workers: int = 0) -> ImageData:
    """Calibration batches and the evaluation loader (see the module docstring).

    ``calib_batches * batch_size`` images calibrate; a folder too small for that (and, without ``val_root``,
    for at least one evaluation image) raises ``ValueError`` saying how many it holds."""
    check_int("calib_batches", calib_batches, 1)
    check_int("batch_size", batch_size, 1)
    check_int("seed", seed, 0)
    check_int("workers", workers, 0)
    eval_batch_size = check_int("eval_batch_size", batch_size if eval_batch_size is None else eval_batch_size, 1)
    data = image_folder(root, preprocessing, "data")
    val = image_folder(val_root, preprocessing, "val_data") if val_root is not None else None
    if val is not None and val.classes != data.classes:
        raise ValueError(f"val_data={str(val_root)!r} has classes {val.classes[:5]}... but data has "
                         f"{data.classes[:5]}...: both folders need the same class folders")
    n_calib = calib_batches * batch_size
    need = n_calib + (0 if val is not None else 1)
    if len(data) < need:
        raise ValueError(f"data={str(root)!r} holds {len(data)} images but calib_batches x batch_size = {n_calib}"
                         f"{'' if val is not None else ' plus at least one evaluation image'} are needed: "
                         "lower --calib-batches / --batch-size or add images")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    calib = _calibration_batches(data, order[:n_calib], batch_size, workers)
    evaluated = val if val is not None else Subset(data, sorted(order[n_calib:]))
    loader = DataLoader(evaluated, batch_size=eval_batch_size, shuffle=False, num_workers=workers)
    return ImageData(calib, loader, list(data.classes), n_calib, len(evaluated), preprocessing)
