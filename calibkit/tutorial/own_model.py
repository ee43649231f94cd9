"""Notebook 07's stand-in for "your own model and images": a small image folder cut from the CIFAR-10 JPEG mirror
and a torchvision architecture fine-tuned on it for a few minutes, so the notebook runs offline on something real.

* :func:`make_image_folder` copies ``per_class`` seeded-random JPEGs of a few classes from the mirror
  (``$CALIBKIT_DATA_DIR/<split>/<class>/*.jpg``) into ``out/<class>/`` -- the ``ImageFolder`` layout a user has.
* :func:`train_classifier` trains a model on such a folder with the one training loop
  (:func:`calibkit.loop.train_steps`): the folder's inference preprocessing (:class:`calibkit.own.data.Preprocessing`)
  after a random horizontal flip, SGD with Nesterov momentum, label smoothing 0.1, linear warm-up then cosine decay.
  Data order and flips come from ``seed``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from calibkit.checks import check_int, check_number
from calibkit.cifar.folders import find_image_folder, resolve_data_dir
from calibkit.errors import DataNotFoundError
from calibkit.loop import lr_multiplier, train_steps
from calibkit.own.data import Preprocessing

__all__ = ["STAND_IN_CLASSES", "make_image_folder", "train_classifier"]

#: The three CIFAR-10 classes of notebook 07's stand-in image folder.
STAND_IN_CLASSES = ("airplane", "automobile", "frog")


def make_image_folder(out: str | Path, classes: Sequence[str], per_class: int, split: str = "train", seed: int = 0,
                      data_dir: str | Path | None = None) -> Path:
    """Copy ``per_class`` JPEGs of each of ``classes`` (drawn with ``seed``) from the mirror's ``split`` folder into
    ``out/<class>/``; returns ``out``. The mirror is ``data_dir`` (see ``resolve_data_dir``) or, as ``make data``
    unpacks it, its ``cifar10-jpeg/`` sub-folder. An ``out`` that already holds exactly those files is reused."""
    check_int("per_class", per_class, 1)
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is unknown: use 'train' or 'test'")
    searched = resolve_data_dir(data_dir)
    mirror = find_image_folder(searched)   # the folder itself, or its cifar10-jpeg/ (where `make data` unpacks it)
    if mirror is None:
        raise DataNotFoundError(f"no CIFAR-10 JPEG mirror (<dir>/<split>/<class>/*.jpg) in {searched} or one level "
                                "down: run `make data`, or set CALIBKIT_DATA_DIR or data_dir to the mirror")
    src_root = mirror / split
    out = Path(out)
    g = torch.Generator().manual_seed(seed)
    for c in classes:
        files = sorted((src_root / c).glob("*.jpg"))
        if len(files) < per_class:
            raise DataNotFoundError(f"{src_root / c} holds {len(files)} JPEGs, {per_class} wanted: set "
                                    "CALIBKIT_DATA_DIR to the CIFAR-10 JPEG mirror (<dir>/<split>/<class>/*.jpg)")
        picked = [files[i] for i in torch.randperm(len(files), generator=g)[:per_class].tolist()]
        dest = out / c
        if dest.is_dir() and sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in picked):
            continue
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for f in picked:
            shutil.copyfile(f, dest / f.name)
    return out


def _forever(loader: DataLoader):
    while True:
        yield from loader


def train_classifier(model: nn.Module, folder: str | Path, preprocessing: Preprocessing, steps: int,
                     batch_size: int = 32, lr: float = 0.1, seed: int = 0, progress: bool = True) -> dict:
    """Train ``model`` (in place, left in eval mode) for ``steps`` optimizer steps on the ``ImageFolder`` at
    ``folder``; returns ``{"steps", "seconds", "train_accuracy"}`` (the last quarter of the steps' batches)."""
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    check_number("lr", lr, 0.0, low_open=True)
    data = ImageFolder(str(folder), transform=v2.Compose([v2.RandomHorizontalFlip(), preprocessing.transform()]))
    torch.manual_seed(seed)  # the flips draw from torch's global generator in the (single-process) loader
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=len(data) >= batch_size,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-5)
    warmup = max(1, steps // 10)

    def loss_fn(m, x, y):
        logits = m(x)
        return F.cross_entropy(logits, y, label_smoothing=0.1), logits

    model.train()
    seconds, correct, seen = 0.0, 0, 0
    for s in train_steps(model, _forever(loader), loss_fn, opt, lambda i: lr_multiplier(i, steps, warmup, "cosine"),
                         steps, "train", progress):
        seconds += s.seconds
        if s.index > steps - max(1, steps // 4):
            correct += int((s.logits.argmax(1) == s.labels).sum())
            seen += len(s.labels)
        if s.index == steps:
            break
    model.eval()
    return {"steps": steps, "seconds": seconds, "train_accuracy": correct / max(1, seen)}
