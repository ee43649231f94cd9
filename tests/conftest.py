"""Shared test settings and fixtures. Data and tensor caches are found as in the library
(CALIBKIT_DATA_DIR / CALIBKIT_CACHE_DIR or their defaults), so `make data` prepares them once."""

import os

import pytest
import torch


def pytest_configure(config):
    os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def cifar():
    """The real CIFAR-10 tensors (skips when no data is available, e.g. outside `make test`)."""
    from calibkit.cifar.data import load_cifar10
    from calibkit.errors import DataNotFoundError

    try:
        return load_cifar10(download=False, progress=False)
    except DataNotFoundError as e:
        pytest.skip(f"CIFAR-10 not available: {e}")


def pytest_collection_modifyitems(config, items):
    """Run browser tests last (stable sort), so they reuse the smoke checkpoint the notebook tests made."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules that work on small tensors: threads only add synchronization there,
    and stall badly on a machine shared with other jobs. Opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_classifier():
    """``make(num_images) -> (model, images, labels)``: a seeded tiny CIFAR ResNet (eval mode) and random 16 x 16
    images labelled with its own predictions, so the float model is 100 % "accurate" on them."""
    from calibkit.cifar.models import cifar_resnet

    def make(num_images: int):
        torch.manual_seed(0)
        model = cifar_resnet(width=(8, 8, 8), stem_width=8).eval()
        images = torch.randn(num_images, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            labels = model(images).argmax(1)
        return model, images, labels
    return make
