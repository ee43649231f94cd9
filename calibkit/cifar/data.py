"""CIFAR-10 and image-folder data as uint8 tensors, a content-keyed tensor cache, and calibration batches.

Every dataset is held in memory as an :class:`ImageTensors`: ``uint8 [N, 3, H, W]`` images (0..255,
RGB, contiguous NCHW) and ``int64 [N]`` labels for a train and a test split.

Sources
    * **image folder** -- ``<root>/train/<class>/<image>`` and ``<root>/test/<class>/<image>``; classes
      are the folder names sorted by name (for CIFAR-10 that is its label order 0..9). Files are decoded
      once with PIL (converted to RGB) and stored in the tensor cache.
    * **torchvision** -- ``<data_dir>/cifar-10-batches-py`` (``torchvision.datasets.CIFAR10``), downloaded
      by torchvision when allowed.

Directories (resolved when a function is called, so environment changes take effect at once)
    * data dir: the ``data_dir`` argument, else ``$CALIBKIT_DATA_DIR``, else ``~/.cache/calibkit/data``.
    * tensor cache: the ``cache_dir`` argument, else ``$CALIBKIT_CACHE_DIR``, else ``~/.cache/calibkit/tensors``.

Cache key (what a cached tensor file is keyed by, see :func:`content_key`): the relative path, size in
bytes and modification time (ns) of every source file, the full bytes of a fixed sample of the files
(all files when there are at most 256; otherwise 256 evenly spaced ones, at most the first and last
64 KiB of each), the decode options (``image_size``) and the cache format version. Editing, adding,
removing or renaming any file therefore changes the key; copying the folder without preserving
modification times also changes it (one extra decode, never stale data).

Preprocessing at inference time (and for calibration) is :func:`normalize` only: ``(x / 255 - mean) / std``
per channel with :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import numpy as np
import torch

from calibkit.checks import check_int
from calibkit.cifar.archive import KNOWN_ARCHIVES, UnpackResult, file_sha256, unpack_archive
from calibkit.cifar.folders import (CACHE_DIR_ENV, CACHE_FORMAT, DATA_DIR_ENV, IMAGE_EXTENSIONS, content_key, decode_images,
                                    find_image_folder, is_image_folder, load_image_folder, load_cache, resolve_cache_dir,
                                    resolve_data_dir, save_cache, tensors_from_blob)
from calibkit.cifar.images import CifarTensors, ImageTensors
from calibkit.errors import DataNotFoundError

# The front door of the CIFAR example's data: these names are importable from here.
__all__ = ["CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "TORCHVISION_FOLDER", "ImageTensors", "CifarTensors",
           "load_cifar10", "normalize", "denormalize", "calibration_batches", "load_image_folder", "decode_images",
           "find_image_folder", "is_image_folder", "content_key", "resolve_data_dir", "resolve_cache_dir",
           "unpack_archive", "file_sha256", "UnpackResult", "KNOWN_ARCHIVES", "IMAGE_EXTENSIONS", "DATA_DIR_ENV",
           "CACHE_DIR_ENV"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: Per-channel (R, G, B) mean and standard deviation of the CIFAR-10 training images, on the 0..1 scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

TORCHVISION_FOLDER = "cifar-10-batches-py"


# ----------------------------------------------------------------------------------------------------
# CIFAR-10


def _offline() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _fix_message(data_dir: Path, from_arg: bool, why: str) -> str:
    origin = ("the data_dir argument" if from_arg else f"${DATA_DIR_ENV}" if os.environ.get(DATA_DIR_ENV)
              else f"the default; ${DATA_DIR_ENV} is not set")
    q = shlex.quote(str(data_dir))
    return (f"CIFAR-10 not found in {data_dir} ({origin}). Searched for an image-folder layout "
            f"({data_dir}/train/<class>/*.jpg and test/, or one level down such as "
            f"{data_dir}/cifar10-jpeg/train) and for torchvision's {data_dir}/{TORCHVISION_FOLDER}. {why}\n"
            f"Fix it with one of:\n"
            f"  python data_scripts/prepare_cifar10.py --data-dir {q}      # online: torchvision download\n"
            f"  python data_scripts/unpack_archive.py ARCHIVE --dest {q}   # offline: ARCHIVE=cifar10-jpeg.tar.gz\n"
            f"or set {DATA_DIR_ENV} (or pass data_dir=) to a folder that already holds CIFAR-10.")


def _load_torchvision(data_dir: Path, download: bool, cache_dir, use_cache: bool) -> ImageTensors:
    import torchvision

    folder = data_dir / TORCHVISION_FOLDER
    source = f"torchvision:{folder}"

    def key_and_path():
        files = sorted(str(p) for p in folder.iterdir() if p.is_file())
        key = content_key(folder, files, extra="torchvision-cifar10")
        return key, resolve_cache_dir(cache_dir) / f"torchvision-cifar10-{key[:32]}.pt"

    if use_cache and folder.is_dir():
        key, path = key_and_path()
        if (blob := load_cache(path, key)) is not None:
            return tensors_from_blob(blob, source)
    splits = {}
    for train in (True, False):  # downloads (when allowed) with the first split; the second finds the files
        tv = torchvision.datasets.CIFAR10(str(data_dir), train=train, download=download and train)
        splits[train] = (torch.from_numpy(np.asarray(tv.data, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous(),
                         torch.as_tensor(np.asarray(tv.targets), dtype=torch.int64))
        classes = list(tv.classes)
    if classes != list(CIFAR10_CLASSES):
        raise ValueError(f"torchvision CIFAR-10 in {folder} has classes {classes}, expected {list(CIFAR10_CLASSES)}")
    key, path = key_and_path()
    blob = dict(format=CACHE_FORMAT, key=key, root=str(folder), classes=classes, train_images=splits[True][0],
                train_labels=splits[True][1], test_images=splits[False][0], test_labels=splits[False][1])
    if use_cache:
        save_cache(path, blob)
    return tensors_from_blob(blob, source)


def load_cifar10(data_dir: str | os.PathLike | None = None, source: str = "auto", download: bool = True,
                 cache_dir: str | os.PathLike | None = None, use_cache: bool = True, workers: int | None = None,
                 progress: bool = True) -> ImageTensors:
    """Load CIFAR-10 (50,000 train and 10,000 test images, ``uint8 [N, 3, 32, 32]``, labels 0..9).

    Args:
        data_dir: where to look (see :func:`resolve_data_dir`).
        source: ``"auto"`` (default) uses, in this order, an image folder in ``data_dir`` (or one level
            down, ``cifar10-jpeg/`` first), torchvision's ``cifar-10-batches-py`` in ``data_dir``, or a
            torchvision download into ``data_dir``; ``"image-folder"`` and ``"torchvision"`` use only that
            source.
        download: allow a torchvision download. Never attempted when ``download=False`` or the
            environment variable ``CI`` is ``true``/``1``.
        cache_dir, use_cache, workers, progress: see :func:`load_image_folder`.

    Raises:
        DataNotFoundError: nothing found (and no download possible); the message names the folder
            searched and the commands that fix it.
    """
    if source not in ("auto", "image-folder", "torchvision"):
        raise ValueError(f"source={source!r} is not valid: use 'auto', 'image-folder' or 'torchvision'")
    d, from_arg = resolve_data_dir(data_dir), bool(data_dir)
    if source in ("auto", "image-folder"):
        folder = find_image_folder(d)
        if folder is not None:
            ds = load_image_folder(folder, cache_dir=cache_dir, use_cache=use_cache, workers=workers,
                                   progress=progress)
            if ds.classes != list(CIFAR10_CLASSES):
                raise ValueError(f"image folder {folder} has classes {ds.classes}; CIFAR-10 needs exactly "
                                 f"{list(CIFAR10_CLASSES)} (use load_image_folder for other datasets)")
            return ds
        if source == "image-folder":
            raise DataNotFoundError(_fix_message(d, from_arg, "source='image-folder' was requested."))
    have_batches = (d / TORCHVISION_FOLDER).is_dir()
    allow = download and not _offline()
    if not have_batches and not allow:
        reason = "download=False" if not download else f"CI={os.environ.get('CI')} in the environment"
        raise DataNotFoundError(_fix_message(d, from_arg, f"No download attempted ({reason})."))
    try:
        return _load_torchvision(d, allow, cache_dir, use_cache)
    except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found or corrupted", URLError, ...
        raise DataNotFoundError(_fix_message(d, from_arg, f"torchvision failed: {type(e).__name__}: {e}.")) from e


# ----------------------------------------------------------------------------------------------------
# preprocessing and calibration batches


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (3, 1, 1)
    return (torch.tensor(CIFAR10_MEAN, dtype=torch.float32, device=x.device).view(shape),
            torch.tensor(CIFAR10_STD, dtype=torch.float32, device=x.device).view(shape))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Inference-time preprocessing: ``uint8 [N, 3, H, W]`` (or ``[3, H, W]``) -> float32
    ``(x / 255 - CIFAR10_MEAN) / CIFAR10_STD`` per channel, on the input's device and in its memory
    format (channels_last stays channels_last)."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise TypeError(f"images must be a torch.uint8 tensor (0..255), got "
                        f"{images.dtype if isinstance(images, torch.Tensor) else type(images).__name__}")
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"images must have shape [N, 3, H, W] or [3, H, W], got {list(images.shape)}")
    mean, std = _channel_stats(images)
    return (images.to(torch.float32) / 255.0 - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize` without rounding: float ``[..., 3, H, W]`` on the 0..1 scale (for plots)."""
    mean, std = _channel_stats(x)
    return x.to(torch.float32) * std + mean


def calibration_batches(ds: ImageTensors, num_batches: int, batch_size: int, seed: int = 0, flip: bool = True,
                        with_labels: bool = False, device=None) -> list:
    """Calibration data: ``num_batches`` batches of ``batch_size`` training images.

    Images are drawn from the training split without replacement, given inference-time preprocessing
    (:func:`normalize`) and, with ``flip=True`` (default), each is mirrored left-right with probability
    1/2 (no other augmentation). The same ``seed`` always gives identical batches.

    Returns:
        a list of float32 ``[batch_size, 3, H, W]`` tensors on ``device`` (default: the dataset's
        device), or of ``(images, int64 labels)`` pairs when ``with_labels=True``.
    """
    if not isinstance(ds, ImageTensors):
        raise TypeError(f"ds must be an ImageTensors (from load_cifar10 / load_image_folder), got {type(ds).__name__}")
    num_batches = check_int("num_batches", num_batches, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    seed = check_int("seed", seed)
    n_train = len(ds.train_labels)
    if num_batches * batch_size > n_train:
        raise ValueError(f"num_batches={num_batches} x batch_size={batch_size} = {num_batches * batch_size} "
                         f"images is more than the {n_train} training images: lower num_batches or batch_size")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n_train, generator=g)[:num_batches * batch_size]
    mirror = torch.rand(len(idx), generator=g) < 0.5 if flip else torch.zeros(len(idx), dtype=torch.bool)
    device = ds.train_images.device if device is None else torch.device(device)
    out = []
    for b in range(num_batches):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        i = idx[sl].to(ds.train_images.device)
        x = ds.train_images[i].to(device)
        m = mirror[sl].to(device).view(-1, 1, 1, 1)
        x = normalize(torch.where(m, x.flip(-1), x))
        out.append((x, ds.train_labels[i].to(device)) if with_labels else x)
    return out

