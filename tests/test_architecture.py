"""The four floors' import direction (pyproject.toml's import-linter contracts), checked on every test run.

A wrong-way import -- the quantization core reaching into the CIFAR example, plotting in the analysis, anything
importing the tutorial floor -- fails here with import-linter's report of the offending line.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    assert lint.exists(), "import-linter is a dev dependency: `pip install -e '.[dev]'`"
    run = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_wrong_way_import_is_caught(tmp_path):
    """The contracts are not vacuous: a copy of the package with one quant module importing the CIFAR data
    fails them."""
    import shutil

    pkg = tmp_path / "calibkit"
    shutil.copytree(ROOT / "calibkit", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = pkg / "quant" / "numerics.py"
    target.write_text(target.read_text() + "\nfrom calibkit.cifar.data import normalize  # wrong way\n")
    lint = Path(sys.executable).with_name("lint-imports")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert run.returncode != 0
    assert "calibkit.quant.numerics -> calibkit.cifar.data" in run.stdout, run.stdout
