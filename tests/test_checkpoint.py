import pytest
import torch

from calibkit import __version__
from calibkit.cifar.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from calibkit.errors import CheckpointError
from calibkit.cifar.models import cifar_resnet


def _trained_like(width=(8, 16, 16)):
    torch.manual_seed(0)
    model = cifar_resnet(width)
    with torch.no_grad():  # non-default BN statistics and weights, as after training
        model.train()(torch.randn(16, 3, 32, 32))
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def _tmp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def saved(tmp_path):
    model = _trained_like()
    meta = {"data_source": "image-folder:/x", "test_accuracy": 0.875, "seed": 3, "profile": "smoke",
            "per_class": [0.5, 1.0], "nested": {"a": None}}
    path = save_checkpoint(tmp_path / "sub" / "model.pt", model, meta)
    return model, meta, path


def test_round_trip_outputs_and_meta(saved):
    model, meta, path = saved
    loaded, got = load_checkpoint(path)
    assert not loaded.training
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    for k, v in meta.items():
        assert got[k] == v
    assert got["arch"] == "cifar_resnet" and got["arch_kwargs"] == model.config
    assert got["calibkit_version"] == __version__ and got["torch_version"] == str(torch.__version__)
    assert got["created"].endswith("+00:00")
    assert read_checkpoint_meta(path)["test_accuracy"] == 0.875
    assert _tmp_files(path.parent) == []


def test_channels_last_model_round_trips(tmp_path):
    model = _trained_like().to(memory_format=torch.channels_last)
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model, {}), arch="cifar_resnet")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file(saved, damage):
    _, _, path = saved
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint at all" * 10, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)


def test_not_a_calibkit_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(cifar_resnet((8, 8, 8)).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a calibkit checkpoint"):
        load_checkpoint(path)


def test_arch_mismatch(saved, tmp_path):
    _, _, path = saved
    with pytest.raises(CheckpointError, match="expected arch='resnet18'"):
        load_checkpoint(path, arch="resnet18")
    payload = torch.load(path, weights_only=True)
    payload["arch"] = "resnet18"
    torch.save(payload, tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match="unknown arch"):
        load_checkpoint(tmp_path / "unknown.pt")


def test_weights_do_not_fit_arch_kwargs(saved, tmp_path):
    _, _, path = saved
    payload = torch.load(path, weights_only=True)
    payload["arch_kwargs"]["width"] = [8, 16, 32]
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "bad.pt")
    payload["arch_kwargs"] = {"width": [8, 16]}
    torch.save(payload, tmp_path / "bad2.pt")
    with pytest.raises(CheckpointError, match="cannot build"):
        load_checkpoint(tmp_path / "bad2.pt")


def test_failed_write_keeps_old_file_and_leaves_no_temp(saved, monkeypatch):
    model, _, path = saved
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, {"x": 1})
    assert path.read_bytes() == before
    assert _tmp_files(path.parent) == []


def test_bad_meta_and_bad_model(tmp_path):
    with pytest.raises(TypeError, match=r"meta\['t'\]"):
        save_checkpoint(tmp_path / "m.pt", cifar_resnet((8, 8, 8)), {"t": torch.zeros(1)})
    with pytest.raises(TypeError, match="calibkit.cifar.models"):
        save_checkpoint(tmp_path / "m.pt", torch.nn.Linear(2, 2), {})
    assert list(tmp_path.iterdir()) == []


def test_reusable_checkpoint_matches_only_identical_settings(tmp_path):
    from calibkit.cifar.checkpoint import reusable_checkpoint
    from calibkit.cifar.train import profile_config

    cfg = profile_config("smoke")
    path = save_checkpoint(tmp_path / "m.pt", cifar_resnet((8, 8, 8)), {"profile": "smoke", "seed": 0, "train_config": cfg})
    meta, why = reusable_checkpoint(path, profile="smoke", seed=0, train_config=profile_config("smoke"))
    assert meta is not None and meta["train_config"] == cfg and "matches" in why
    meta, why = reusable_checkpoint(path, profile="smoke", seed=0, train_config=profile_config("smoke", lr=0.1))
    assert meta is None and "train_config" in why and "other settings" in why
    meta, why = reusable_checkpoint(path, profile="smoke", seed=1)
    assert meta is None and "seed: 0 -> 1" in why
    meta, why = reusable_checkpoint(path, data_source="x")        # a key the checkpoint does not have
    assert meta is None and "<absent>" in why
    meta, why = reusable_checkpoint(tmp_path / "missing.pt", profile="smoke")
    assert meta is None and "does not exist" in why
