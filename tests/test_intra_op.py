"""Observers do their per-batch work on one intra-op thread and restore the caller's setting
(docs/methods.md#calibration-speed)."""

import pytest
import torch

from calibkit.quant.intra_op import single_threaded
from calibkit.quant.observers import MinMaxObserver


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_observer_work_runs_on_one_thread_and_the_setting_is_restored(two_threads, monkeypatch):
    seen = []
    original = MinMaxObserver._observe
    monkeypatch.setattr(MinMaxObserver, "_observe",
                        lambda self, x: (seen.append(torch.get_num_threads()), original(self, x)))
    ob = MinMaxObserver()
    ob(torch.randn(1000))
    assert seen == [1] and torch.get_num_threads() == 2
    with pytest.raises(Exception):
        ob(torch.tensor([float("nan")]))  # an error inside restores the setting too
    assert torch.get_num_threads() == 2


def test_single_threaded_leaves_other_devices_and_one_thread_alone(two_threads):
    with single_threaded(torch.empty(0, device="meta")):
        assert torch.get_num_threads() == 2
    with single_threaded():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_scales_do_not_depend_on_the_callers_thread_count(two_threads):
    from calibkit.quant.observers import get_observer_class
    x = torch.randn(16, 64, 24, 24, generator=torch.Generator().manual_seed(0)).relu()
    for name in ["percentile", "mse", "kl", "mix"]:
        a = get_observer_class(name)()
        a(x)
        torch.set_num_threads(1)
        b = get_observer_class(name)()
        b(x)
        torch.set_num_threads(2)
        assert torch.equal(a.calculate_qparams(), b.calculate_qparams()), name
