#!/usr/bin/env python
"""Make sure CIFAR-10 is available where calibkit looks for it (run by `make data`).

Order: data already in $CALIBKIT_DATA_DIR / ~/.cache/calibkit/data -> nothing to do; else the
offline archive ($CALIBKIT_ARCHIVE, or ../shared/data/cifar10-jpeg.tar.gz beside the repository)
is verified and unpacked there; else CIFAR-10 is downloaded through torchvision. Then the decoded
tensor cache is built, so notebooks start fast. Idempotent.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibkit.cifar.data import TORCHVISION_FOLDER, find_image_folder, load_cifar10, resolve_data_dir, unpack_archive  # noqa: E402


def main() -> int:
    data_dir = resolve_data_dir()
    have = find_image_folder(data_dir) is not None or (data_dir / TORCHVISION_FOLDER).is_dir()
    if not have:
        archive = Path(os.environ.get("CALIBKIT_ARCHIVE", ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
        if archive.is_file():
            print(f"[data] unpacking offline archive {archive} into {data_dir}")
            unpack_archive(archive, data_dir)
        else:
            print(f"[data] no data in {data_dir} and no offline archive at {archive}: downloading with torchvision")
    ds = load_cifar10(data_dir)  # downloads when needed and allowed; raises DataNotFoundError with the fix otherwise
    print(f"[data] CIFAR-10 ready: {len(ds.train_labels)} train / {len(ds.test_labels)} test images from {ds.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
