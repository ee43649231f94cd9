"""Execute every tutorial notebook through papermill with its smoke parameters and check its metrics.

Notebooks are run in order into one shared output root, so later notebooks reuse the checkpoint
that notebook 01 trained. New notebooks in ``notebooks/`` are picked up automatically; notebooks
with a known number get extra checks below, every notebook must write a ``metrics.json``.
"""

import math
import os
from pathlib import Path

import pytest

from calibkit.runner import list_notebooks, run_notebook

pytestmark = pytest.mark.notebooks
CELL_TIMEOUT = int(os.environ.get("CALIBKIT_CELL_TIMEOUT", "900"))


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory):
    root = os.environ.get("CALIBKIT_SMOKE_OUTPUT")
    return Path(root) if root else tmp_path_factory.mktemp("smoke_outputs")


def _finite_numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, float):
        assert math.isfinite(obj), "metrics.json holds a non-finite number"
    elif isinstance(obj, dict):
        for v in obj.values():
            _finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            _finite_numbers(v)


def check_01(m, out):
    assert m["profile"] == "smoke"
    assert m["test_accuracy"] > 0.40, "smoke model must beat chance (0.10) by a clear margin"
    assert len(m["per_class_accuracy"]) == 10
    assert Path(m["checkpoint"]).exists()
    assert list(out.glob("*.png")), "notebook 01 saves its figures"


CHECKS = {"01": check_01}


@pytest.mark.parametrize("nb_path", list_notebooks(), ids=lambda p: p.stem)
def test_notebook_smoke(nb_path, smoke_root):
    result = run_notebook(nb_path, "smoke", smoke_root, cell_timeout=CELL_TIMEOUT)
    metrics = result["metrics"]
    assert metrics, "metrics.json is empty"
    _finite_numbers(metrics)
    check = CHECKS.get(nb_path.name[:2])
    if check:
        check(metrics, smoke_root / nb_path.stem)
