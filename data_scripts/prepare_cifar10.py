#!/usr/bin/env python
"""Get CIFAR-10 ready (online): download it with torchvision into --data-dir unless it is already there,
then build the uint8 tensor cache. Idempotent: a second run only reads the cache.

    python data_scripts/prepare_cifar10.py --data-dir ~/.cache/calibkit/data

Offline machines: use data_scripts/unpack_archive.py with the cifar10-jpeg.tar.gz archive instead.
"""

import argparse
import sys
import time
from pathlib import Path

try:
    import calibkit  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibkit.cifar.data import DataNotFoundError, load_cifar10, resolve_cache_dir, resolve_data_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="where CIFAR-10 is (or is downloaded to); default: $CALIBKIT_DATA_DIR "
                                      "or ~/.cache/calibkit/data")
    p.add_argument("--cache-dir", help="tensor cache; default: $CALIBKIT_CACHE_DIR or ~/.cache/calibkit/tensors")
    p.add_argument("--source", choices=("auto", "image-folder", "torchvision"), default="auto",
                   help="which copy to use (default: auto = image folder, else torchvision batches, else download)")
    p.add_argument("--no-download", action="store_true", help="never download; fail if the data is missing")
    p.add_argument("--workers", type=int, default=None, help="image decoding processes (default: all cores, max 8)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    a = p.parse_args(argv)
    data_dir = resolve_data_dir(a.data_dir)
    print(f"data dir:  {data_dir}\ncache dir: {resolve_cache_dir(a.cache_dir)}")
    t = time.perf_counter()
    try:
        ds = load_cifar10(data_dir, source=a.source, download=not a.no_download, cache_dir=a.cache_dir,
                          workers=a.workers, progress=not a.no_progress)
    except DataNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"loaded {ds} in {time.perf_counter() - t:.1f} s")
    print(f"use it with: export CALIBKIT_DATA_DIR={data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
