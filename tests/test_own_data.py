"""calibkit.own.data: the transforms.v2 preprocessing, the ImageFolder split and their named errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from calibkit.errors import DataNotFoundError
from calibkit.own.data import Preprocessing, image_data, image_folder, parse_floats

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def make_folder(root, classes=("a", "b"), per_class=10, size=(40, 48), seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / c / f"{i:03d}.png")
    return root


def test_transform_matches_the_formula_on_a_constant_image():
    pre = Preprocessing(16, MEAN, STD)
    assert pre.resize_size == 18  # round(16 / 0.875)
    img = Image.new("RGB", (30, 20), (200, 100, 50))
    x = pre.transform()(img)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(x, expected[:, None, None].expand(3, 16, 16), atol=1e-6, rtol=0)


def test_center_crop_keeps_the_middle():
    pre = Preprocessing(8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), resize_size=8)
    a = np.zeros((8, 24, 3), dtype=np.uint8)  # resized to 8 x 24, then the middle 8 columns
    a[:, 8:16] = 255
    x = pre.transform()(Image.fromarray(a))
    assert torch.equal(x, torch.ones(3, 8, 8))


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=16, mean=(0.5, 0.5), std=STD), "mean=.*2 values: use one per channel"),
    (dict(image_size=16, mean=MEAN, std=(0.2, 0.2, 0.2, 0.2)), "std=.*4 values"),
    (dict(image_size=16, mean=MEAN, std=(0.2, 0.0, 0.2)), r"std\[1\]=0.0 is out of range"),
    (dict(image_size=16, mean=MEAN, std=(0.2, -1.0, 0.2)), r"std\[1\]=-1.0"),
    (dict(image_size=16, mean=(0.5, float("nan"), 0.5), std=STD), r"mean\[1\]=nan"),
    (dict(image_size=4, mean=MEAN, std=STD), "image_size=4 is out of range: use an integer in \\[8, 4096\\]"),
    (dict(image_size=10_000, mean=MEAN, std=STD), "image_size=10000 is out of range"),
    (dict(image_size=32, mean=MEAN, std=STD, resize_size=16), "resize_size=16 is out of range"),
])
def test_bad_preprocessing_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Preprocessing(**kwargs)


def test_parse_floats():
    assert parse_floats("mean", "0.5, 0.25,1") == (0.5, 0.25, 1.0)
    with pytest.raises(ValueError, match="mean='0.5,x' is not a list of numbers"):
        parse_floats("mean", "0.5,x")


def test_folder_without_images_is_named(tmp_path):
    pre = Preprocessing(16, MEAN, STD)
    with pytest.raises(DataNotFoundError, match="is not a folder"):
        image_folder(tmp_path / "missing", pre)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="holds no images"):
        image_folder(tmp_path / "empty", pre)
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.png")  # images but no class folder
    with pytest.raises(DataNotFoundError, match="holds no images"):
        image_folder(tmp_path / "flat", pre)


def _rows(batches):
    return {tuple(x.flatten()[:64].tolist()) for b in batches for x in b}


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=10)
    pre = Preprocessing(16, MEAN, STD)
    d = image_data(root, pre, calib_batches=2, batch_size=4, seed=3)
    assert d.classes == ["a", "b"] and d.calib_images == 8 and d.eval_images == 12
    assert [tuple(b.shape) for b in d.calib] == [(4, 3, 16, 16)] * 2
    evals = [x for x, _ in d.eval_loader]
    assert sum(len(x) for x in evals) == 12
    assert not _rows(d.calib) & _rows(evals), "an image both calibrates and evaluates"
    again = image_data(root, pre, calib_batches=2, batch_size=4, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(d.calib, again.calib))
    other = image_data(root, pre, calib_batches=2, batch_size=4, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(d.calib, other.calib))


def test_second_folder_is_evaluated_whole(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=4)
    val = make_folder(tmp_path / "val", per_class=3, seed=1)
    pre = Preprocessing(16, MEAN, STD)
    d = image_data(root, pre, calib_batches=1, batch_size=8, val_root=val)
    assert d.calib_images == 8 and d.eval_images == 6
    assert sorted(int(y) for _, ys in d.eval_loader for y in ys) == [0, 0, 0, 1, 1, 1]
    wrong = make_folder(tmp_path / "wrong", classes=("a", "c"), per_class=1)
    with pytest.raises(ValueError, match="same class folders"):
        image_data(root, pre, 1, 8, val_root=wrong)


def test_folder_too_small_for_the_calibration_set(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=4)
    with pytest.raises(ValueError, match="holds 8 images but calib_batches x batch_size = 8 plus at least one"):
        image_data(root, Preprocessing(16, MEAN, STD), calib_batches=2, batch_size=4)
    with pytest.raises(ValueError, match="calib_batches=0 is out of range"):
        image_data(root, Preprocessing(16, MEAN, STD), calib_batches=0, batch_size=4)
