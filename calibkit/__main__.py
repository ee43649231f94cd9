"""``python -m calibkit compare|calibrate ...``: see :mod:`calibkit.own.cli`."""

import sys

from calibkit.own.cli import main

if __name__ == "__main__":
    sys.exit(main())
