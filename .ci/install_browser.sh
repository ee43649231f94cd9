#!/usr/bin/env bash
# Install what the browser test (tests/test_browser.py, marker `browser`) needs: Debian's `chromium`
# and Playwright for Python (the PyPI wheel ships its driver; no browser download: Playwright is
# pointed at /usr/bin/chromium). Idempotent: each part is skipped when already present, and
# `apt-get update` runs only when the package cannot be installed from the current lists.
# Usage: .ci/install_browser.sh [PYTHON]   (default PYTHON: .venv/bin/python of the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PY:-.venv/bin/python}}"
CHROMIUM="${CALIBKIT_CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ]; then
    echo "[browser] chromium present: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
else
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || { echo "[browser] need root (or sudo) to apt-get install chromium" >&2; exit 1; }
        SUDO="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    echo "[browser] installing Debian's chromium ..."
    if ! $SUDO apt-get install -y -q chromium; then
        $SUDO apt-get update -q
        $SUDO apt-get install -y -q chromium
    fi
    test -x "$CHROMIUM" || { echo "[browser] chromium installed but $CHROMIUM is missing" >&2; exit 1; }
fi

if "$PY" -c "import playwright.sync_api" 2>/dev/null; then
    echo "[browser] playwright present: $("$PY" -m pip show playwright 2>/dev/null | sed -n 's/^Version: //p')"
else
    echo "[browser] installing playwright (PyPI wheel; never 'playwright install') ..."
    "$PY" -m pip install -q playwright
fi
