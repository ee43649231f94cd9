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

import hashlib
import json
import multiprocessing
import os
import shlex
import tarfile
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from calibkit.errors import DataNotFoundError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: Per-channel (R, G, B) mean and standard deviation of the CIFAR-10 training images, on the 0..1 scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

DATA_DIR_ENV = "CALIBKIT_DATA_DIR"
CACHE_DIR_ENV = "CALIBKIT_CACHE_DIR"
DEFAULT_DATA_DIR = "~/.cache/calibkit/data"
DEFAULT_CACHE_DIR = "~/.cache/calibkit/tensors"
#: sha256 of archives whose name is known; used by :func:`unpack_archive` when no ``sha256`` is given.
KNOWN_ARCHIVES = {"cifar10-jpeg.tar.gz": "9a9541e8da6f9b0692f6aaca2fcd81892a923ca85f017d4c31b35e112a3abf65"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp", ".gif")
TORCHVISION_FOLDER = "cifar-10-batches-py"
CACHE_FORMAT = 1
_SAMPLE_FILES = 256
_SAMPLE_BYTES = 64 * 1024
_POOL_MIN_FILES = 2048  # below this, decoding in-process is faster than starting workers


# ----------------------------------------------------------------------------------------------------
# the dataset container


@dataclass(repr=False)
class ImageTensors:
    """An image-classification dataset held as tensors.

    Attributes:
        train_images, test_images: ``torch.uint8 [N, 3, H, W]`` RGB, values 0..255.
        train_labels, test_labels: ``torch.int64 [N]``, values in ``[0, len(classes))``.
        classes: class names; label ``i`` is ``classes[i]``.
        source: where the data came from, e.g. ``"image-folder:/data/cifar10-jpeg"`` or
            ``"torchvision:/data/cifar-10-batches-py"`` (a subset appends ``" subset(...)"``).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    source: str = ""

    def __post_init__(self):
        self.classes = list(self.classes)
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
                raise TypeError(f"{split}_images must be torch.uint8 [N, 3, H, W], got {x.dtype} {list(x.shape)}")
            if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
                raise TypeError(f"{split}_labels must be torch.int64 [{len(x)}], got {y.dtype} {list(y.shape)}")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
                raise ValueError(f"{split}_labels must lie in [0, {len(self.classes)}) (len(classes)), "
                                 f"got [{int(y.min())}, {int(y.max())}]")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(3, H, W)`` of every image."""
        return tuple(self.train_images.shape[1:])

    def __repr__(self):
        return (f"{type(self).__name__}(train={len(self.train_labels)}, test={len(self.test_labels)}, "
                f"image_shape={list(self.image_shape)}, classes={len(self.classes)}, source={self.source!r})")

    def to(self, device) -> "ImageTensors":
        """A copy with all tensors on ``device`` (tensors already there are shared, not copied)."""
        return ImageTensors(self.train_images.to(device), self.train_labels.to(device), self.test_images.to(device),
                            self.test_labels.to(device), list(self.classes), self.source)

    def subset(self, train: int | None = None, test: int | None = None, seed: int = 0,
               stratified: bool = True) -> "ImageTensors":
        """A smaller dataset for smoke runs: ``train`` / ``test`` images drawn without replacement.

        Args:
            train, test: number of images to keep per split (``None`` keeps the whole split).
            seed: random seed; the same seed always picks the same images.
            stratified: ``True`` (default) balances classes (per-class counts differ by at most one
                where the split allows it); ``False`` draws uniformly at random.

        Kept images stay in their original order.
        """
        _check_int("seed", seed)
        g = torch.Generator().manual_seed(seed)
        parts = {}
        for split, n in (("train", train), ("test", test)):
            x, y = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if n is None:
                parts[split] = (x, y)
                continue
            _check_int(split, n, lo=0)
            if n > len(y):
                raise ValueError(f"{split}={n} is out of range: the {split} split has {len(y)} images, "
                                 f"use a value in [0, {len(y)}]")
            idx = _stratified_pick(y.cpu(), n, g) if stratified else torch.randperm(len(y), generator=g)[:n]
            idx = idx.sort().values.to(y.device)
            parts[split] = (x[idx], y[idx])
        tag = f"subset(train={train}, test={test}, seed={seed}{'' if stratified else ', stratified=False'})"
        return ImageTensors(*parts["train"], *parts["test"], list(self.classes), f"{self.source} {tag}".strip())


CifarTensors = ImageTensors  # the name used by the CIFAR-10 API contract


def _stratified_pick(labels: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """Indices of ``n`` labels, classes taken round-robin in a random order (balanced counts)."""
    perm = torch.randperm(len(labels), generator=g)
    lab = labels[perm]
    # rank of each shuffled element within its class: 0 for the first of that class, 1 for the next, ...
    order = torch.argsort(lab, stable=True)
    sorted_lab = lab[order]
    starts = torch.searchsorted(sorted_lab, sorted_lab, right=False)
    rank = torch.empty_like(lab)
    rank[order] = torch.arange(len(lab)) - starts
    key = rank * len(lab) + torch.arange(len(lab))  # by rank, ties broken by shuffled position
    return perm[torch.argsort(key)[:n]]


def _check_int(name: str, value, lo: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}={value!r} must be an int")
    if lo is not None and value < lo:
        raise ValueError(f"{name}={value} is out of range: use an int >= {lo}")
    return int(value)


# ----------------------------------------------------------------------------------------------------
# directories and the tensor cache


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir``, else ``$CALIBKIT_DATA_DIR``, else ``~/.cache/calibkit/data``."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The tensor-cache directory: ``cache_dir``, else ``$CALIBKIT_CACHE_DIR``, else ``~/.cache/calibkit/tensors``."""
    return Path(cache_dir or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()


def content_key(root: str | os.PathLike, files: Sequence[str | os.PathLike], extra: str = "") -> str:
    """sha256 hex key of ``files`` (paths under ``root``): see the module docstring for what it covers."""
    prefix = str(root).rstrip(os.sep) + os.sep
    h = hashlib.sha256(f"calibkit-cache-v{CACHE_FORMAT}\0{extra}\0{len(files)}\n".encode())
    lines = []
    for f in map(str, files):
        if not f.startswith(prefix):
            raise ValueError(f"file {f} is not under root={str(root)!r}")
        st = os.stat(f)
        lines.append(f"{f[len(prefix):].replace(os.sep, '/')}\0{st.st_size}\0{st.st_mtime_ns}\n")
    h.update("".join(lines).encode())
    step = max(1, len(files) / _SAMPLE_FILES)
    for i in sorted({int(k * step) for k in range(min(len(files), _SAMPLE_FILES))}):
        with open(files[i], "rb") as fh:
            head = fh.read(_SAMPLE_BYTES)
            if len(head) == _SAMPLE_BYTES:
                fh.seek(-_SAMPLE_BYTES, os.SEEK_END)
                head += fh.read(_SAMPLE_BYTES)
        h.update(hashlib.sha256(head).digest())
    return h.hexdigest()


def _load_cache(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("key") != key or blob.get("format") != CACHE_FORMAT:
            raise ValueError("key or format mismatch")
        return blob
    except Exception as e:  # a corrupt or foreign file: rebuild it rather than fail
        warnings.warn(f"ignoring unreadable tensor cache {path} ({e}); rebuilding it", stacklevel=3)
        return None


def _save_cache(path: Path, blob: dict) -> bool:
    """Write ``blob`` atomically (temp file + ``os.replace``); warn and return False if impossible."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            os.chmod(tmp, 0o644)
            with os.fdopen(fd, "wb") as fh:
                torch.save(blob, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return True
    except OSError as e:
        warnings.warn(f"could not write tensor cache {path} ({e}); data will be decoded again next time",
                      stacklevel=3)
        return False


def _from_blob(blob: dict, source: str) -> ImageTensors:
    return ImageTensors(blob["train_images"], blob["train_labels"], blob["test_images"], blob["test_labels"],
                        list(blob["classes"]), source)


# ----------------------------------------------------------------------------------------------------
# image folders


def is_image_folder(path: str | os.PathLike) -> bool:
    """True if ``path`` holds ``train/`` and ``test/`` sub-folders."""
    p = Path(path)
    return (p / "train").is_dir() and (p / "test").is_dir()


def _subdirs(path: Path) -> list[Path]:
    return sorted((e for e in path.iterdir() if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)


def _list_split(root: Path, split: str) -> tuple[list[str], list[str], list[int]]:
    """(class names, image paths, labels) of ``root/split``; images sorted by name within a class."""
    classes, files, labels = [], [], []
    for label, cdir in enumerate(_subdirs(root / split)):
        imgs = sorted(e.path for e in os.scandir(cdir)
                      if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not imgs:
            raise DataNotFoundError(f"class folder {cdir} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        classes.append(cdir.name)
        files += imgs
        labels += [label] * len(imgs)
    if not classes:
        raise DataNotFoundError(f"{root / split} holds no class folders: expected {root / split}/<class>/<image>")
    return classes, files, labels


def _size_hw(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    hw = (image_size, image_size) if isinstance(image_size, int) and not isinstance(image_size, bool) else image_size
    if (not isinstance(hw, (tuple, list)) or len(hw) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in hw)):
        raise ValueError(f"image_size={image_size!r} is out of range: use None, an int >= 1 or (height, width)")
    return int(hw[0]), int(hw[1])


def _decode_chunk(args) -> np.ndarray:
    """Decode a list of image files to ``uint8 [n, 3, H, W]`` (runs in worker processes)."""
    from PIL import Image

    files, (h, w), resize = args
    out = np.empty((len(files), 3, h, w), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im.load()
                im = im if im.mode == "RGB" else im.convert("RGB")
        except Exception as e:
            raise ValueError(f"cannot decode image file {f}: {type(e).__name__}: {e}") from None
        if im.size != (w, h):
            if not resize:
                raise ValueError(f"image {f} is {im.size[1]}x{im.size[0]} (HxW) but the first image is {h}x{w}; "
                                 f"images are never resized silently: pass image_size={h} or image_size=(H, W) "
                                 f"to resize every image explicitly")
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        out[i] = np.asarray(im).transpose(2, 0, 1)
    return out


def _default_workers() -> int:
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:
        return max(1, min(8, os.cpu_count() or 1))


def decode_images(files: Sequence[str], image_size=None, workers: int | None = None, progress: bool = True,
                  desc: str = "decode") -> torch.Tensor:
    """Decode image files (PIL, converted to RGB) to ``uint8 [N, 3, H, W]``.

    Args:
        files: image paths, decoded in this order.
        image_size: ``None`` (default): every image must have the size of the first one, else a
            ``ValueError`` names the file; an int or ``(height, width)``: every image is resized to it
            (bilinear) where its size differs.
        workers: decoding processes (default: available cores, at most 8); ``1`` or ``0`` decodes
            in this process. Fewer than 2048 files are always decoded in this process.
        progress: show a tqdm progress bar.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    hw = _size_hw(image_size)
    if hw is None:
        if not files:
            raise ValueError("files is empty: nothing to decode")
        try:
            with Image.open(files[0]) as im:
                hw = (im.size[1], im.size[0])
        except Exception as e:
            raise ValueError(f"cannot decode image file {files[0]}: {type(e).__name__}: {e}") from None
    workers = _default_workers() if workers is None else _check_int("workers", workers, lo=0)
    chunk = 512
    jobs = [(list(files[i:i + chunk]), hw, image_size is not None) for i in range(0, len(files), chunk)]
    out = np.empty((len(files), 3, hw[0], hw[1]), dtype=np.uint8)
    with tqdm(total=len(files), desc=desc, unit="img", disable=not progress) as bar:
        def fill(results):
            pos = 0
            for arr in results:
                out[pos:pos + len(arr)] = arr
                pos += len(arr)
                bar.update(len(arr))

        if workers <= 1 or len(files) < _POOL_MIN_FILES:
            fill(map(_decode_chunk, jobs))
        else:
            with multiprocessing.get_context().Pool(min(workers, len(jobs))) as pool:
                fill(pool.imap(_decode_chunk, jobs))
    return torch.from_numpy(out)


def load_image_folder(root: str | os.PathLike, image_size=None, cache_dir: str | os.PathLike | None = None,
                      use_cache: bool = True, workers: int | None = None, progress: bool = True) -> ImageTensors:
    """Load ``<root>/train/<class>/*`` and ``<root>/test/<class>/*`` as an :class:`ImageTensors`.

    Classes are the sub-folder names of ``train/`` sorted by name; ``test/`` must have the same
    class folders. Files with an image extension (``IMAGE_EXTENSIONS``, case-insensitive) are read;
    hidden files and other files are ignored. The first load decodes every file (see
    :func:`decode_images` for ``image_size`` and ``workers``) and writes the tensors to the cache
    directory (see :func:`resolve_cache_dir`) under a content key (:func:`content_key`); later loads
    of unchanged files read that cache file. ``use_cache=False`` neither reads nor writes it.
    """
    root = Path(root).expanduser().resolve()
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataNotFoundError(f"image folder {root} has no {split}/ sub-folder: expected "
                                    f"{root}/train/<class>/<image> and {root}/test/<class>/<image>")
    hw = _size_hw(image_size)
    classes, train_files, train_labels = _list_split(root, "train")
    test_classes, test_files, test_labels = _list_split(root, "test")
    if test_classes != classes:
        raise DataNotFoundError(f"class folders differ between {root}/train and {root}/test: "
                                f"train only {sorted(set(classes) - set(test_classes))}, "
                                f"test only {sorted(set(test_classes) - set(classes))}")
    source = f"image-folder:{root}"
    key = content_key(root, train_files + test_files, extra=f"image-folder image_size={hw}")
    path = resolve_cache_dir(cache_dir) / f"imagefolder-{root.name}-{key[:32]}.pt"
    if use_cache and (blob := _load_cache(path, key)) is not None:
        return _from_blob(blob, source)
    blob = dict(format=CACHE_FORMAT, key=key, root=str(root), classes=classes,
                train_images=decode_images(train_files, image_size, workers, progress, "decode train"),
                train_labels=torch.tensor(train_labels, dtype=torch.int64),
                test_images=decode_images(test_files, image_size, workers, progress, "decode test"),
                test_labels=torch.tensor(test_labels, dtype=torch.int64))
    if hw is None and blob["test_images"].shape[2:] != blob["train_images"].shape[2:]:
        raise ValueError(f"test images are {tuple(blob['test_images'].shape[2:])} (HxW) but train images are "
                         f"{tuple(blob['train_images'].shape[2:])}; pass image_size to resize explicitly")
    if use_cache:
        _save_cache(path, blob)
    return _from_blob(blob, source)


# ----------------------------------------------------------------------------------------------------
# CIFAR-10


def _offline() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def find_image_folder(data_dir: str | os.PathLike) -> Path | None:
    """``data_dir`` if it is an image folder, else its ``cifar10-jpeg/`` or first such sub-folder, else None."""
    d = Path(data_dir)
    if is_image_folder(d):
        return d
    if not d.is_dir():
        return None
    subs = _subdirs(d)
    subs.sort(key=lambda p: p.name != "cifar10-jpeg")
    return next((s for s in subs if is_image_folder(s)), None)


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
        if (blob := _load_cache(path, key)) is not None:
            return _from_blob(blob, source)
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
        _save_cache(path, blob)
    return _from_blob(blob, source)


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
    num_batches = _check_int("num_batches", num_batches, lo=1)
    batch_size = _check_int("batch_size", batch_size, lo=1)
    seed = _check_int("seed", seed)
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


# ----------------------------------------------------------------------------------------------------
# offline archives


@dataclass
class UnpackResult:
    """What :func:`unpack_archive` did: ``dest``, archive ``sha256``, whether it was ``verified`` against an
    expected hash, whether files were ``extracted`` (False: already unpacked), top-level ``entries``."""

    dest: Path
    sha256: str
    verified: bool
    extracted: bool
    entries: list[str]


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def unpack_archive(archive: str | os.PathLike, dest: str | os.PathLike, sha256: str | None = None,
                   progress: bool = True) -> UnpackResult:
    """Verify and extract a tar archive (``.tar``, ``.tar.gz``, ...) into ``dest``, safely and idempotently.

    Args:
        archive: the archive file.
        dest: destination folder (created if missing).
        sha256: expected hex sha256 of the archive; default: the known hash when the archive's name is
            in ``KNOWN_ARCHIVES`` (``cifar10-jpeg.tar.gz``), else no check.
        progress: show a tqdm progress bar while extracting.

    Every member is checked with tarfile's ``"data"`` filter before anything is written (absolute paths,
    ``..`` escapes, links out of ``dest`` and device files raise ``ValueError`` and nothing is extracted). A marker file
    ``dest/.<archive name>.unpacked`` records the hash; a second call with the same archive extracts
    nothing while the marker and the top-level entries exist.

    Raises:
        FileNotFoundError: ``archive`` does not exist. ValueError: hash mismatch or unsafe member.
    """
    from tqdm.auto import tqdm

    archive, dest = Path(archive).expanduser(), Path(dest).expanduser()
    if not archive.is_file():
        raise FileNotFoundError(f"archive={str(archive)!r} does not exist or is not a file")
    if not hasattr(tarfile, "data_filter"):
        raise RuntimeError("safe extraction needs tarfile extraction filters (Python >= 3.11.4)")
    expected = (sha256 or KNOWN_ARCHIVES.get(archive.name) or "").strip().lower() or None
    digest = file_sha256(archive)
    if expected is not None and digest != expected:
        raise ValueError(f"sha256 mismatch for archive={str(archive)!r}: expected {expected}, got {digest}; "
                         f"the file is corrupt or not the expected archive (pass sha256= for another archive)")
    marker = dest / f".{archive.name}.unpacked"
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
            if info.get("sha256") == digest and all((dest / e).exists() for e in info.get("entries", [])):
                return UnpackResult(dest, digest, expected is not None, False, info["entries"])
        except (ValueError, OSError):
            pass  # unreadable marker: extract again
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            try:
                if os.path.isabs(m.name) or m.name.startswith(("/", "\\")):  # the filter would strip it; reject
                    raise tarfile.AbsolutePathError(m)
                tarfile.data_filter(m, str(dest))
            except tarfile.FilterError as e:
                raise ValueError(f"unsafe member {m.name!r} in archive={str(archive)!r}: {e}; nothing extracted") from e
        tar.extractall(dest, members=tqdm(members, desc=f"extract {archive.name}", unit="file", disable=not progress),
                       filter="data")
    entries = sorted({Path(m.name).parts[0] for m in members if Path(m.name).parts and Path(m.name).parts[0] != "."})
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({"sha256": digest, "archive": archive.name, "entries": entries,
                               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    os.replace(tmp, marker)
    return UnpackResult(dest, digest, expected is not None, True, entries)
