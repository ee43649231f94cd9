"""Tests of calibkit.cifar.data: image-folder decoding, tensor cache, CIFAR-10 discovery, preprocessing,
calibration batches, subsets and archive unpacking. Synthetic data only, except one test that needs
the real mirror via $CALIBKIT_DATA_DIR."""

import importlib.util
import io
import os
import shlex
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calibkit.cifar import data as D
from calibkit.cifar import folders
from calibkit.errors import DataNotFoundError

ROOT = Path(__file__).resolve().parents[1]
H, W = 6, 8  # non-square, so that a transposed decode cannot pass


def _write_png(path: Path, arr: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_folder(root: Path, classes=("b_dog", "a_cat", "c_eel"), n_train=4, n_test=2, size=(H, W), seed=0):
    """Image folder of random RGB PNGs; returns {split: (uint8 [N,3,H,W] in expected order, labels)}."""
    rng = np.random.default_rng(seed)
    expected = {}
    for split, n in (("train", n_train), ("test", n_test)):
        imgs, labels = [], []
        for label, c in enumerate(sorted(classes)):
            for i in range(n):
                arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                _write_png(root / split / c / f"{i:03d}.png", arr)
                imgs.append(arr.transpose(2, 0, 1))
                labels.append(label)
        expected[split] = (torch.from_numpy(np.stack(imgs)), torch.tensor(labels))
    return expected


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("CALIBKIT_CACHE_DIR", str(d))
    return d


def synthetic_ds(n_train=64, n_test=16, classes=4, seed=0, size=(8, 8)):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: torch.randint(0, 256, (n, 3, *size), generator=g, dtype=torch.uint8)
    return D.ImageTensors(mk(n_train), torch.arange(n_train) % classes, mk(n_test), torch.arange(n_test) % classes,
                          [f"c{i}" for i in range(classes)], "synthetic")


# ---------------------------------------------------------------------------------------------- image folders


def test_decode_round_trip_and_labels(tmp_path, cache):
    exp = make_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "train" / "a_cat" / "notes.txt").write_text("not an image")  # ignored
    (tmp_path / "imgs" / "train" / "a_cat" / ".hidden.png").write_bytes(b"junk")     # ignored
    ds = D.load_image_folder(tmp_path / "imgs", progress=False)
    assert ds.classes == ["a_cat", "b_dog", "c_eel"]
    assert ds.train_images.dtype == torch.uint8 and ds.train_images.shape == (12, 3, H, W)
    assert ds.train_images.is_contiguous() and ds.train_labels.dtype == torch.int64
    for split in ("train", "test"):
        assert torch.equal(getattr(ds, f"{split}_images"), exp[split][0])
        assert torch.equal(getattr(ds, f"{split}_labels"), exp[split][1])
    assert ds.source == f"image-folder:{(tmp_path / 'imgs').resolve()}"
    assert "train=12" in repr(ds) and ds.image_shape == (3, H, W) and D.CifarTensors is D.ImageTensors


def test_grayscale_converted_to_rgb(tmp_path, cache):
    make_folder(tmp_path / "imgs")
    gray = np.arange(H * W, dtype=np.uint8).reshape(H, W)
    Image.fromarray(gray, mode="L").save(tmp_path / "imgs" / "test" / "a_cat" / "000.png")
    ds = D.load_image_folder(tmp_path / "imgs", progress=False)
    assert torch.equal(ds.test_images[0], torch.from_numpy(gray).expand(3, H, W))


def test_cache_hit_is_fast_and_skips_decoding(tmp_path, cache, monkeypatch):
    make_folder(tmp_path / "imgs")
    first = D.load_image_folder(tmp_path / "imgs", progress=False)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # atomic write left no temp file behind

    def no_decode(*a, **k):
        raise AssertionError("cache miss: images were decoded again")

    monkeypatch.setattr(folders, "decode_images", no_decode)
    t = time.perf_counter()
    second = D.load_image_folder(tmp_path / "imgs", progress=False)
    assert time.perf_counter() - t < 1.0
    assert torch.equal(first.train_images, second.train_images) and first.classes == second.classes


def test_modified_file_changes_key_and_data(tmp_path, cache):
    make_folder(tmp_path / "imgs")
    root = tmp_path / "imgs"
    first = D.load_image_folder(root, progress=False)
    new = np.full((H, W, 3), 7, np.uint8)
    _write_png(root / "train" / "b_dog" / "001.png", new)
    second = D.load_image_folder(root, progress=False)
    idx = 4 + 1  # a_cat has 4 images, then b_dog/001
    assert torch.equal(second.train_images[idx], torch.from_numpy(new).permute(2, 0, 1))
    assert not torch.equal(first.train_images, second.train_images)
    assert len(list(cache.glob("*.pt"))) == 2


def test_content_key_covers_bytes_names_and_files(tmp_path):
    make_folder(tmp_path / "imgs")
    root = tmp_path / "imgs"
    files = lambda: sorted(str(p) for p in root.rglob("*.png"))
    k0 = D.content_key(root, files())
    assert D.content_key(root, files()) == k0
    assert D.content_key(root, files(), extra="image_size=(4, 4)") != k0
    # same size, same mtime, different bytes: caught by the byte sample
    f = root / "test" / "c_eel" / "000.png"
    st = f.stat()
    raw = bytearray(f.read_bytes())
    raw[-20] ^= 0xFF
    f.write_bytes(bytes(raw))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    k1 = D.content_key(root, files())
    assert k1 != k0
    f.rename(f.with_name("zzz.png"))  # rename
    assert D.content_key(root, files()) != k1
    with pytest.raises(ValueError, match="not under root"):
        D.content_key(root / "train", files())


def test_corrupt_cache_file_is_rebuilt(tmp_path, cache):
    make_folder(tmp_path / "imgs")
    first = D.load_image_folder(tmp_path / "imgs", progress=False)
    (path,) = cache.glob("*.pt")
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable tensor cache"):
        second = D.load_image_folder(tmp_path / "imgs", progress=False)
    assert torch.equal(first.train_images, second.train_images)
    assert torch.load(path, weights_only=True)["train_images"].shape == (12, 3, H, W)


def test_size_mismatch_is_an_error_unless_image_size_given(tmp_path, cache):
    make_folder(tmp_path / "imgs")
    odd = tmp_path / "imgs" / "train" / "c_eel" / "002.png"
    _write_png(odd, np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match=r"002\.png is 10x10 .*image_size"):
        D.load_image_folder(tmp_path / "imgs", progress=False)
    ds = D.load_image_folder(tmp_path / "imgs", image_size=(H, W), progress=False)
    assert ds.train_images.shape == (12, 3, H, W)
    assert ds.train_images[4 * 2 + 2].sum() == 0  # the resized black image stays black
    assert D.load_image_folder(tmp_path / "imgs", image_size=4, progress=False).test_images.shape == (6, 3, 4, 4)
    with pytest.raises(ValueError, match="image_size=0"):
        D.load_image_folder(tmp_path / "imgs", image_size=0)


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_image_names_the_file(tmp_path, cache, monkeypatch, workers):
    monkeypatch.setattr(folders, "_POOL_MIN_FILES", 0)  # workers=2 really uses the process pool
    make_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "train" / "b_dog" / "002.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match=r"cannot decode image file .*b_dog/002\.png"):
        D.load_image_folder(tmp_path / "imgs", progress=False, workers=workers)
    assert not list(cache.glob("*.pt"))


def test_process_pool_gives_same_tensors(tmp_path, cache, monkeypatch):
    exp = make_folder(tmp_path / "imgs", n_train=6)
    monkeypatch.setattr(folders, "_POOL_MIN_FILES", 0)
    files = sorted(str(p) for p in (tmp_path / "imgs" / "train").rglob("*.png"))
    x = D.decode_images(files, workers=2, progress=False)
    assert torch.equal(x, exp["train"][0])


def test_bad_layouts(tmp_path, cache):
    make_folder(tmp_path / "a")
    (tmp_path / "a" / "test" / "zz_extra").mkdir()
    _write_png(tmp_path / "a" / "test" / "zz_extra" / "0.png", np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DataNotFoundError, match=r"class folders differ.*test only \['zz_extra'\]"):
        D.load_image_folder(tmp_path / "a")
    (tmp_path / "b" / "train").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="no test/ sub-folder"):
        D.load_image_folder(tmp_path / "b")
    (tmp_path / "b" / "test" / "x").mkdir(parents=True)
    (tmp_path / "b" / "train" / "x").mkdir()
    with pytest.raises(DataNotFoundError, match="holds no image files"):
        D.load_image_folder(tmp_path / "b")


# ---------------------------------------------------------------------------------------------- CIFAR-10 discovery


def make_cifar_folder(root: Path):
    return make_folder(root, classes=D.CIFAR10_CLASSES, n_train=2, n_test=1, size=(32, 32))


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("CALIBKIT_DATA_DIR", raising=False)
    assert D.resolve_data_dir() == Path("~/.cache/calibkit/data").expanduser()
    monkeypatch.setenv("CALIBKIT_DATA_DIR", str(tmp_path / "env"))
    assert D.resolve_data_dir() == tmp_path / "env"
    assert D.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.setenv("CALIBKIT_CACHE_DIR", str(tmp_path / "c"))
    assert D.resolve_cache_dir() == tmp_path / "c" and D.resolve_cache_dir("x") == Path("x")


def test_auto_finds_image_folder_one_level_down(tmp_path, cache, monkeypatch):
    exp = make_cifar_folder(tmp_path / "data" / "cifar10-jpeg")
    monkeypatch.setenv("CALIBKIT_DATA_DIR", str(tmp_path / "data"))
    ds = D.load_cifar10(download=False, progress=False)
    assert ds.classes == list(D.CIFAR10_CLASSES) and ds.source.endswith("cifar10-jpeg")
    assert torch.equal(ds.test_images, exp["test"][0]) and torch.equal(ds.train_labels, exp["train"][1])
    direct = D.load_cifar10(tmp_path / "data" / "cifar10-jpeg", source="image-folder", progress=False)
    assert direct.classes == ds.classes


def test_image_folder_with_other_classes_is_not_cifar(tmp_path, cache):
    make_folder(tmp_path / "imgs")
    with pytest.raises(ValueError, match="CIFAR-10 needs exactly"):
        D.load_cifar10(tmp_path / "imgs", download=False)


class FakeCIFAR10:
    """Stand-in for torchvision.datasets.CIFAR10 (NHWC uint8 numpy data, list targets)."""

    calls = []

    def __init__(self, root, train=True, download=False):
        FakeCIFAR10.calls.append((root, train, download))
        folder = Path(root) / D.TORCHVISION_FOLDER
        if download:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "data_batch_1").write_bytes(b"fake batch")
        if not folder.is_dir():
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        rng = np.random.default_rng(1 if train else 2)
        n = 20 if train else 10
        self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 10 for i in range(n)]
        self.classes = list(D.CIFAR10_CLASSES)


@pytest.fixture
def fake_tv(monkeypatch):
    import torchvision

    FakeCIFAR10.calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    monkeypatch.delenv("CI", raising=False)
    return FakeCIFAR10


def test_torchvision_source_converts_and_caches(tmp_path, cache, fake_tv):
    ds = D.load_cifar10(tmp_path, download=True, progress=False)
    assert [c[2] for c in fake_tv.calls] == [True, False]  # downloads once, with the train split
    ref = FakeCIFAR10(tmp_path, train=True)
    assert ds.train_images.shape == (20, 3, 32, 32) and ds.test_images.shape == (10, 3, 32, 32)
    assert torch.equal(ds.train_images, torch.from_numpy(ref.data).permute(0, 3, 1, 2))
    assert ds.train_labels.dtype == torch.int64 and ds.source.startswith("torchvision:")
    fake_tv.calls = []
    again = D.load_cifar10(tmp_path, download=False, progress=False)  # batches present: cache, no torchvision
    assert fake_tv.calls == [] and torch.equal(again.test_images, ds.test_images)


@pytest.mark.parametrize("how", ["download=False", "CI"])
def test_missing_data_error_names_dir_and_fix_commands(tmp_path, fake_tv, monkeypatch, how):
    missing = tmp_path / "nothing here"
    if how == "CI":
        monkeypatch.setenv("CI", "true")
    with pytest.raises(DataNotFoundError) as e:
        D.load_cifar10(missing, download=how != "download=False")
    msg = str(e.value)
    assert fake_tv.calls == []  # no network attempt
    q = shlex.quote(str(missing))  # the folder name has a space: commands must stay copy-pasteable
    assert f"python data_scripts/prepare_cifar10.py --data-dir {q}" in msg
    assert f"python data_scripts/unpack_archive.py ARCHIVE --dest {q}" in msg
    assert "CALIBKIT_DATA_DIR" in msg and "cifar-10-batches-py" in msg
    assert ("CI=true in the environment" if how == "CI" else "download=False") in msg


def test_failed_download_raises_data_not_found(tmp_path, monkeypatch):
    import torchvision

    def offline(root, train=True, download=False):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("CALIBKIT_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(DataNotFoundError, match=r"(?s)Name or service not known.*unpack_archive\.py ARCHIVE --dest"):
        D.load_cifar10()
    with pytest.raises(DataNotFoundError, match="source='image-folder' was requested"):
        D.load_cifar10(source="image-folder")
    with pytest.raises(ValueError, match="source='pickle'"):
        D.load_cifar10(source="pickle")


# ---------------------------------------------------------------------------------------------- preprocessing


def test_normalize_values_device_and_memory_format():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 5).contiguous()
    y = D.normalize(x)
    assert y.dtype == torch.float32 and y.shape == x.shape and y.device == x.device
    for c, v in enumerate((0, 128, 255)):
        expected = (v / 255 - D.CIFAR10_MEAN[c]) / D.CIFAR10_STD[c]
        assert torch.allclose(y[:, c], torch.full_like(y[:, c], expected), atol=1e-6)
    cl = D.normalize(x.to(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.allclose(cl, y)
    assert torch.allclose(D.normalize(x[0]), y[0])
    assert torch.allclose(D.denormalize(y), x.float() / 255, atol=1e-6)
    with pytest.raises(TypeError, match="torch.uint8"):
        D.normalize(x.float())
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        D.normalize(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))


def test_calibration_batches_deterministic_and_seeded():
    ds = synthetic_ds()
    a = D.calibration_batches(ds, num_batches=3, batch_size=8, seed=5)
    b = D.calibration_batches(ds, num_batches=3, batch_size=8, seed=5)
    c = D.calibration_batches(ds, num_batches=3, batch_size=8, seed=6)
    assert len(a) == 3 and all(x.shape == (8, 3, 8, 8) and x.dtype == torch.float32 for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    pairs = D.calibration_batches(ds, 3, 8, seed=5, with_labels=True)
    assert all(torch.equal(x, p[0]) and p[1].dtype == torch.int64 for x, p in zip(a, pairs))


@pytest.mark.parametrize("flip", [True, False])
def test_calibration_batches_only_flip_and_draw_without_replacement(flip):
    ds = synthetic_ds()
    plain, mirrored = D.normalize(ds.train_images), D.normalize(ds.train_images.flip(-1))
    src, flips = [], []
    for x, y in D.calibration_batches(ds, num_batches=6, batch_size=8, seed=1, flip=flip, with_labels=True):
        for img, label in zip(x, y):
            hit = [(j, False) for j in range(len(plain)) if torch.equal(img, plain[j])]
            hit += [(j, True) for j in range(len(plain)) if torch.equal(img, mirrored[j])]
            assert len(hit) == 1, "output is neither a normalized training image nor its mirror"
            src.append(hit[0][0])
            flips.append(hit[0][1])
            assert ds.train_labels[hit[0][0]] == label
    assert len(set(src)) == 48  # no image drawn twice
    assert (0 < sum(flips) < 48) if flip else sum(flips) == 0


def test_calibration_batches_validation():
    ds = synthetic_ds(n_train=64)
    with pytest.raises(ValueError, match=r"num_batches=0 is out of range"):
        D.calibration_batches(ds, 0, 8)
    with pytest.raises(ValueError, match=r"batch_size=-1 is out of range"):
        D.calibration_batches(ds, 1, -1)
    with pytest.raises(ValueError, match=r"num_batches=9 x batch_size=8 = 72 .*64 training images"):
        D.calibration_batches(ds, 9, 8)
    with pytest.raises(ValueError, match="num_batches=2.0 is out of range: use an integer >= 1"):
        D.calibration_batches(ds, 2.0, 8)
    with pytest.raises(ValueError, match="batch_size=True is out of range: use an integer >= 1"):
        D.calibration_batches(ds, 2, True)
    with pytest.raises(TypeError, match="ds must be an ImageTensors"):
        D.calibration_batches([ds.train_images], 1, 1)
    assert len(D.calibration_batches(ds, 8, 8)) == 8  # exactly the whole split is allowed


def test_subset_stratified_and_random():
    ds = synthetic_ds(n_train=100, n_test=40, classes=4)
    s = ds.subset(train=10, test=8, seed=3)
    assert len(s.train_labels) == 10 and len(s.test_labels) == 8 and "subset(train=10" in s.source
    counts = torch.bincount(s.train_labels, minlength=4)
    assert counts.max() - counts.min() <= 1 and torch.bincount(s.test_labels).tolist() == [2, 2, 2, 2]
    # subset rows are rows of the original, in original order
    rows = [next(i for i in range(100) if torch.equal(ds.train_images[i], x)) for x in s.train_images]
    assert rows == sorted(rows) and all(ds.train_labels[r] == l for r, l in zip(rows, s.train_labels))
    again = ds.subset(train=10, test=8, seed=3)
    assert torch.equal(again.train_images, s.train_images)
    assert not torch.equal(ds.subset(train=10, seed=4).train_images, s.train_images)
    r = ds.subset(train=50, seed=0, stratified=False)
    assert len(r.train_labels) == 50 and len(r.test_labels) == 40
    with pytest.raises(ValueError, match=r"train=101 is out of range: the train split has 100 images"):
        ds.subset(train=101)
    with pytest.raises(ValueError, match=r"test=-1 is out of range"):
        ds.subset(test=-1)


def test_balanced_subset_takes_every_class_of_a_class_sorted_split():
    from calibkit.cifar.images import balanced_subset
    labels = torch.arange(5).repeat_interleave(20)          # sorted by class, as an image folder is read
    images = torch.arange(100, dtype=torch.float32)[:, None] * 10
    x, y = balanced_subset(images, labels, 15, seed=1)
    assert torch.bincount(y, minlength=5).tolist() == [3] * 5   # labels[:15] would be class 0 only
    assert torch.equal(x[:, 0] / 10, torch.sort(x[:, 0] / 10).values)  # original order kept
    assert torch.equal(labels[(x[:, 0] / 10).long()], y)      # image and label stay paired
    assert torch.equal(balanced_subset(images, labels, 15, seed=1)[0], x)
    assert not torch.equal(balanced_subset(images, labels, 15, seed=2)[0], x)
    assert balanced_subset(images, labels, None)[0] is images
    assert torch.equal(balanced_subset(images, labels, 100)[0], images)
    with pytest.raises(ValueError, match=r"n=101 is out of range: there are 100 images, use a value in \[0, 100\]"):
        balanced_subset(images, labels, 101)
    with pytest.raises(ValueError, match="images has 100 entries and labels 99"):
        balanced_subset(images, labels[:99], 5)

def test_image_tensors_validates_fields():
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(TypeError, match="train_images must be torch.uint8"):
        D.ImageTensors(x.float(), torch.zeros(2, dtype=torch.int64), x, torch.zeros(2, dtype=torch.int64), ["a"])
    with pytest.raises(ValueError, match=r"test_labels must lie in \[0, 1\)"):
        D.ImageTensors(x, torch.zeros(2, dtype=torch.int64), x, torch.ones(2, dtype=torch.int64), ["a"])


# ---------------------------------------------------------------------------------------------- archives


def make_tar(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return D.file_sha256(path)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "data_scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_unpack_archive_verifies_and_is_idempotent(tmp_path):
    arc = tmp_path / "small.tar.gz"
    sha = make_tar(arc, {"ds/train/a/0.txt": b"hello", "ds/test/a/0.txt": b"world"})
    dest = tmp_path / "dest"
    r = D.unpack_archive(arc, dest, sha256=sha.upper(), progress=False)
    assert r.extracted and r.verified and r.entries == ["ds"] and r.sha256 == sha
    assert (dest / "ds" / "train" / "a" / "0.txt").read_bytes() == b"hello"
    marker = dest / ".small.tar.gz.unpacked"
    mtime = marker.stat().st_mtime_ns
    r2 = D.unpack_archive(arc, dest, sha256=sha, progress=False)
    assert not r2.extracted and marker.stat().st_mtime_ns == mtime
    (dest / "ds" / "train" / "a" / "0.txt").unlink()
    import shutil
    shutil.rmtree(dest / "ds")  # extracted files gone: unpack again
    assert D.unpack_archive(arc, dest, progress=False).extracted and (dest / "ds" / "test" / "a" / "0.txt").exists()
    assert not D.unpack_archive(arc, dest, progress=False).verified  # unknown name, no sha256 given


def test_unpack_archive_wrong_hash(tmp_path):
    arc = tmp_path / "small.tar.gz"
    make_tar(arc, {"x/1.txt": b"1"})
    with pytest.raises(ValueError, match="sha256 mismatch .*expected 00ff"):
        D.unpack_archive(arc, tmp_path / "dest", sha256="00ff", progress=False)
    assert not (tmp_path / "dest").exists()
    known = tmp_path / "cifar10-jpeg.tar.gz"  # the known name implies the known hash
    make_tar(known, {"cifar10-jpeg/train/a/0.jpg": b"not the real archive"})
    with pytest.raises(ValueError, match=f"expected {D.KNOWN_ARCHIVES['cifar10-jpeg.tar.gz']}"):
        D.unpack_archive(known, tmp_path / "dest", progress=False)
    with pytest.raises(FileNotFoundError, match="archive="):
        D.unpack_archive(tmp_path / "missing.tar.gz", tmp_path / "dest")


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/calibkit-evil-abs.txt", "ok/../../evil.txt"])
def test_unpack_archive_rejects_path_traversal(tmp_path, name):
    arc = tmp_path / "bad.tar.gz"
    make_tar(arc, {"good/0.txt": b"fine", name: b"evil"})
    dest = tmp_path / "sub" / "dest"
    with pytest.raises(ValueError, match="unsafe member"):
        D.unpack_archive(arc, dest, progress=False)
    assert not (tmp_path / "sub" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not (dest / "good").exists() and not (dest / "tmp").exists()  # nothing extracted at all
    assert not Path("/tmp/calibkit-evil-abs.txt").exists()


def test_unpack_archive_rejects_link_out_of_dest(tmp_path):
    arc = tmp_path / "link.tar.gz"
    with tarfile.open(arc, "w:gz") as tar:
        info = tarfile.TarInfo("ds/escape")
        info.type, info.linkname = tarfile.SYMTYPE, "../../outside"
        tar.addfile(info)
    with pytest.raises(ValueError, match="unsafe member 'ds/escape'"):
        D.unpack_archive(arc, tmp_path / "dest", progress=False)
    assert not (tmp_path / "dest" / "ds").exists()


def test_unpack_script_exit_codes_and_output(tmp_path, capsys):
    mod = load_script("unpack_archive")
    arc = tmp_path / "small.tar.gz"
    sha = make_tar(arc, {"ds/train/a/0.txt": b"x"})
    assert mod.main([str(arc), "--dest", str(tmp_path / "d"), "--sha256", "ab" * 32, "--no-progress"]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err
    assert mod.main([str(arc), "--dest", str(tmp_path / "d"), "--sha256", sha, "--no-progress"]) == 0
    assert "verified" in capsys.readouterr().out
    assert mod.main([str(arc), "--dest", str(tmp_path / "d"), "--no-progress"]) == 0
    assert "already unpacked" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0 and "--sha256" in capsys.readouterr().out


def test_prepare_script_reports_missing_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CALIBKIT_CACHE_DIR", str(tmp_path / "cache"))
    mod = load_script("prepare_cifar10")
    assert mod.main(["--data-dir", str(tmp_path / "none"), "--no-download"]) == 1
    assert "unpack_archive.py ARCHIVE --dest" in capsys.readouterr().err
    make_cifar_folder(tmp_path / "data")
    assert mod.main(["--data-dir", str(tmp_path / "data"), "--no-progress"]) == 0
    assert "train=20, test=10" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- the real mirror


@pytest.mark.skipif(not os.environ.get("CALIBKIT_DATA_DIR"), reason="CALIBKIT_DATA_DIR not set (real CIFAR-10)")
def test_real_cifar10():
    ds = D.load_cifar10(download=False, progress=False)
    assert ds.train_images.shape == (50000, 3, 32, 32) and ds.test_images.shape == (10000, 3, 32, 32)
    assert torch.bincount(ds.train_labels).tolist() == [5000] * 10
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10
    mean = ds.train_images[::10].float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor(D.CIFAR10_MEAN), atol=0.01)  # JPEG mirror is close to the original
