"""Where data lives and how image folders become tensors: the data and cache directories, ``train/<class>/*`` and
``test/<class>/*`` folders decoded once with PIL (in worker processes for large folders), and the content-keyed
tensor cache (see :func:`content_key`)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from calibkit.checks import check_int

from calibkit.errors import DataNotFoundError
from calibkit.cifar.images import ImageTensors
from calibkit.files import atomic_torch_save

DATA_DIR_ENV = "CALIBKIT_DATA_DIR"
CACHE_DIR_ENV = "CALIBKIT_CACHE_DIR"
DEFAULT_DATA_DIR = "~/.cache/calibkit/data"
DEFAULT_CACHE_DIR = "~/.cache/calibkit/tensors"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp", ".gif")
#: Part of every cache key: raised whenever decoding changes, so no cache decoded the old way is reused
#: (2: 16-bit images are scaled to 8 bits instead of clipped at 255).
CACHE_FORMAT = 2
_SAMPLE_FILES = 256
_SAMPLE_BYTES = 64 * 1024
_POOL_MIN_FILES = 2048  # below this, decoding in-process is faster than starting workers


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


def load_cache(path: Path, key: str) -> dict | None:
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


def save_cache(path: Path, blob: dict) -> bool:
    """Write ``blob`` atomically (:func:`calibkit.files.atomic_torch_save`); warn and return False if impossible."""
    try:
        atomic_torch_save(blob, path)
        return True
    except OSError as e:
        warnings.warn(f"could not write tensor cache {path} ({e}); data will be decoded again next time",
                      stacklevel=3)
        return False


def tensors_from_blob(blob: dict, source: str) -> ImageTensors:
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


def _image_files(cdir: Path) -> list[str]:
    """Paths of the image files in ``cdir`` (not hidden, extension in ``IMAGE_EXTENSIONS``). A name that cannot be
    resolved (a symlink loop or a dangling link) raises ``DataNotFoundError`` naming it, instead of a raw OSError."""
    out = []
    with os.scandir(cdir) as it:
        for e in it:
            if e.name.startswith(".") or not e.name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            try:
                if e.is_symlink():
                    os.stat(e.path)  # ELOOP / ENOENT for a loop or a dangling link
                if e.is_file():
                    out.append(e.path)
            except OSError as err:
                raise DataNotFoundError(f"image file {e.path} cannot be read ({err.strerror or err}): a symlink loop or "
                                        "a dangling link; remove it or point it at an image") from None
    return out


def _list_split(root: Path, split: str) -> tuple[list[str], list[str], list[int]]:
    """(class names, image paths, labels) of ``root/split``; images sorted by name within a class."""
    classes, files, labels = [], [], []
    for label, cdir in enumerate(_subdirs(root / split)):
        imgs = sorted(_image_files(cdir))
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
                im = _to_rgb8(im, f)
        except UnsupportedImageError:
            raise
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


class UnsupportedImageError(ValueError):
    """An image file that decodes but holds a pixel format calibkit does not read (32-bit integer or float)."""


def _to_rgb8(im, f):
    """``im`` as 8-bit RGB. 16-bit grey images (PIL modes ``I;16*``, and ``I`` holding values up to 65535) are scaled
    to 8 bits, ``round(v * 255 / 65535)``, never clipped; 32-bit integer or float images raise
    :class:`UnsupportedImageError` (a ``ValueError``)."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im)
        if im.mode == "F" or (im.mode == "I" and arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535)):
            raise UnsupportedImageError(f"image file {f} has PIL mode {im.mode!r} with values outside 0..65535: "
                                        "only 8- and 16-bit images are read (convert it to 8-bit RGB)")
        grey = np.round(arr.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return im.convert("RGB")


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
    workers = _default_workers() if workers is None else check_int("workers", workers, 0)
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
    if use_cache and (blob := load_cache(path, key)) is not None:
        return tensors_from_blob(blob, source)
    blob = dict(format=CACHE_FORMAT, key=key, root=str(root), classes=classes,
                train_images=decode_images(train_files, image_size, workers, progress, "decode train"),
                train_labels=torch.tensor(train_labels, dtype=torch.int64),
                test_images=decode_images(test_files, image_size, workers, progress, "decode test"),
                test_labels=torch.tensor(test_labels, dtype=torch.int64))
    if hw is None and blob["test_images"].shape[2:] != blob["train_images"].shape[2:]:
        raise ValueError(f"test images are {tuple(blob['test_images'].shape[2:])} (HxW) but train images are "
                         f"{tuple(blob['train_images'].shape[2:])}; pass image_size to resize explicitly")
    if use_cache:
        save_cache(path, blob)
    return tensors_from_blob(blob, source)


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

