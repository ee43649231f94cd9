"""``python -m calibkit compare|calibrate`` as a user runs it: a subprocess on a small real image folder (CIFAR-10
JPEGs from the mirror at $CALIBKIT_DATA_DIR) with a torchvision model's random weights saved as a state_dict."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import calibkit as ck
from calibkit.own.compare import METHODS, method_qconfig
from calibkit.own.spec import load_model
from calibkit.errors import DataNotFoundError
from calibkit.tutorial.own_model import make_image_folder

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CLASSES = ("airplane", "automobile", "frog")
PER_CLASS = 24
MODEL = ["--model", "torchvision.models:mobilenet_v3_small", "--model-kwargs", '{"num_classes": 3}']
PRE = ["--image-size", "32", "--mean", "0.49,0.48,0.45", "--std", "0.25,0.24,0.26"]


class Branchy(nn.Module):
    """A model torch.fx cannot trace: its forward branches on a tensor's value."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.conv(x)
        if x.mean() > 0:  # data-dependent control flow
            x = -x
        return self.fc(x.mean((2, 3)))


def run_cli(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "calibkit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=900)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    images = make_image_folder(root / "images", CLASSES, PER_CLASS, split="test", seed=0)
    val = make_image_folder(root / "val", CLASSES, 5, split="train", seed=1)
    torch.manual_seed(0)
    weights = root / "w.pt"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=3).state_dict(), weights)
    return root, images, val, weights


@pytest.fixture(scope="module")
def report(inputs):
    root, images, _, weights = inputs
    out = root / "report"
    r = run_cli("compare", *MODEL, "--weights", weights, "--data", images, *PRE, "--calib-batches", 2,
                "--batch-size", 8, "--methods", "all", "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text()), r


def test_compare_report_shape_and_numbers(report):
    out, rep, run = report
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.json", "report.md", "accuracy.png",
                                                            "worst_ops.png"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".report")], "temporary folders left behind"
    assert list(rep["methods"]) == list(METHODS)
    assert rep["calib_images"] == 16 and rep["eval_images"] == 3 * PER_CLASS - 16
    assert 0.0 <= rep["float"]["top1"] <= 1.0 and rep["float"]["top5"] == 1.0  # 3 classes: top-5 always hits
    for m, r in rep["methods"].items():
        assert 0.0 <= r["top1"] <= 1.0 and r["top5"] == 1.0, m
        # counts of 56 images: accuracies are multiples of 1/56
        assert abs(r["top1"] * rep["eval_images"] - round(r["top1"] * rep["eval_images"])) < 1e-6
        assert r["drop_points"] == pytest.approx(100 * (rep["float"]["top1"] - r["top1"]), abs=1e-9)
        assert r["calibration_seconds"] > 0
        worst = r["worst_ops"]
        assert len(worst) == 5 and len({w["name"] for w in worst}) == 5
        sqnr = [w["isolated_sqnr_db"] for w in worst if w["isolated_sqnr_db"] is not None]
        assert sqnr == sorted(sqnr), f"{m}: worst ops are not sorted worst first"
        assert all(-10 < s < 80 for s in sqnr), f"{m}: int8 isolated SQNR out of a sane range: {sqnr}"
    assert rep["meta"]["preprocessing"] == {"image_size": 32, "resize_size": 37, "mean": [0.49, 0.48, 0.45],
                                            "std": [0.25, 0.24, 0.26]}
    assert rep["meta"]["classes"] == sorted(CLASSES)
    md = (out / "report.md").read_text()
    assert all(f"Worst ops of {m}" in md for m in METHODS) and "| float |" in md
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mse" in run.stdout and "report:" in run.stdout


def test_compare_val_data_and_existing_out(inputs):
    root, images, val, weights = inputs
    out = root / "report_val"
    r = run_cli("compare", *MODEL, "--weights", weights, "--data", images, "--val-data", val, *PRE,
                "--calib-batches", 1, "--batch-size", 8, "--methods", "min_max", "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["eval_images"] == 15 and list(rep["methods"]) == ["min_max"]
    again = run_cli("compare", *MODEL, "--weights", weights, "--data", images, *PRE, "--methods", "min_max",
                    "--out", out)
    assert again.returncode == 2 and "not empty" in again.stderr
    assert json.loads((out / "report.json").read_text()) == rep, "a refused run must leave the old report alone"


def test_calibrate_saves_a_loadable_prepared_model(inputs):
    root, images, _, weights = inputs
    path = root / "calibrated.pt"
    r = run_cli("calibrate", *MODEL, "--weights", weights, "--data", images, *PRE, "--calib-batches", 1,
                "--batch-size", 8, "--method", "percentile", "--out", path, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    model = load_model("torchvision.models:mobilenet_v3_small", {"num_classes": 3}, weights)
    prepared = ck.prepare(model, method_qconfig("percentile"), torch.zeros(1, 3, 32, 32))
    meta = ck.load_prepared(path, prepared)
    assert meta["method"] == "percentile" and meta["preprocessing"]["image_size"] == 32
    ck.set_fake_quantize(prepared, ck.FakeQuantState.VALIDATION)  # every quantizer has its calibrated scale
    x = torch.randn(2, 3, 32, 32)
    assert torch.isfinite(prepared(x)).all()
    assert ck.sqnr_db(model(x), prepared(x)) > 5


def _bad_inputs(root, images, weights):
    empty = root / "empty"
    (empty / "cls").mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), root / "resnet.pt")
    return {
        "weights that do not fit": ([*MODEL, "--weights", root / "resnet.pt", "--data", images, *PRE],
                                    "do not fit"),
        "folder without images": ([*MODEL, "--weights", weights, "--data", empty, *PRE], "holds no images"),
        "mean of the wrong length": ([*MODEL, "--weights", weights, "--data", images, "--image-size", "32",
                                      "--mean", "0.5,0.5", "--std", "0.25,0.24,0.26"], "one per channel"),
        "untraceable model": (["--model", "test_cli:Branchy", "--data", images, *PRE], "Branchy"),
    }


@pytest.mark.parametrize("case", ["weights that do not fit", "folder without images", "mean of the wrong length",
                                  "untraceable model"])
def test_bad_input_exits_with_one_line_and_no_report(inputs, case):
    root, images, _, weights = inputs
    args, expected = _bad_inputs(root, images, weights)[case]
    out = root / f"bad_{case.replace(' ', '_')}"
    r = run_cli("compare", *args, "--calib-batches", 1, "--batch-size", 8, "--out", out, "--no-progress")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("calibkit: error:"), r.stderr
    assert expected in lines[0] and "Traceback" not in r.stderr
    assert not out.exists() and not [p for p in root.iterdir() if p.name.startswith(f".{out.name}")]


def test_make_image_folder_finds_the_mirror_where_make_data_unpacks_it(tmp_path):
    # `make data` unpacks the mirror into <data dir>/cifar10-jpeg/, as load_cifar10 expects
    from PIL import Image
    for split in ("train", "test"):
        (tmp_path / "data" / "cifar10-jpeg" / split / "airplane").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32), (i, 0, 0)).save(tmp_path / "data" / "cifar10-jpeg" / "train" / "airplane" / f"{i}.jpg")
    out = make_image_folder(tmp_path / "out", ["airplane"], 2, data_dir=tmp_path / "data")
    assert len(list((out / "airplane").glob("*.jpg"))) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="no CIFAR-10 JPEG mirror .* in .*empty or one level down"):
        make_image_folder(tmp_path / "out2", ["airplane"], 2, data_dir=tmp_path / "empty")
