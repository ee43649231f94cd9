"""Offline dataset archives: verified against a known sha256 and unpacked safely (no absolute paths, no ``..``,
no links leaving the destination), once."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path



#: sha256 of archives whose name is known; used by :func:`unpack_archive` when no ``sha256`` is given.
KNOWN_ARCHIVES = {"cifar10-jpeg.tar.gz": "9a9541e8da6f9b0692f6aaca2fcd81892a923ca85f017d4c31b35e112a3abf65"}


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
