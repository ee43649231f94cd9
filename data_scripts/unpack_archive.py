#!/usr/bin/env python
"""Unpack an offline dataset archive (offline counterpart of prepare_cifar10.py).

Verifies the archive's sha256 (default for cifar10-jpeg.tar.gz: its known hash), rejects unsafe members
(absolute paths, '..', links leaving DEST, devices) before writing anything, extracts into DEST and writes
a marker file, so a second run does nothing. Exit status 1 on a hash mismatch or an unsafe archive.

    python data_scripts/unpack_archive.py cifar10-jpeg.tar.gz --dest ~/.cache/calibkit/data
"""

import argparse
import sys
from pathlib import Path

try:
    import calibkit  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibkit.cifar.data import find_image_folder, resolve_data_dir, unpack_archive


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archive", help="the .tar / .tar.gz archive")
    p.add_argument("--dest", help="destination folder; default: $CALIBKIT_DATA_DIR or ~/.cache/calibkit/data")
    p.add_argument("--sha256", help="expected sha256 (hex); default: the known hash for known archive names")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a = p.parse_args(argv)
    dest = resolve_data_dir(a.dest)
    try:
        r = unpack_archive(a.archive, dest, sha256=a.sha256, progress=not a.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"sha256 {r.sha256} ({'verified' if r.verified else 'NOT verified: no expected hash known, pass --sha256'})")
    print(f"{'extracted' if r.extracted else 'already unpacked, nothing to do'}: {', '.join(r.entries)} in {r.dest}")
    folder = find_image_folder(r.dest)
    if folder is not None:
        print(f"image folder: {folder}\nuse it with: export CALIBKIT_DATA_DIR={folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
