"""Tests for calibkit.quant.native: the compiled |x| histogram kernel gives exactly the torch-ops counts, reports
out-of-range and NaN/Inf values, and calibkit falls back to torch ops (same results) when it cannot be built."""

import os
import shutil

import pytest
import torch

from calibkit.quant import accumulating_histogram
from calibkit.quant import histogram as H
from calibkit.quant import native
from calibkit.errors import CalibrationError
from calibkit.quant.observers import get_observer_class

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_CC = shutil.which(os.environ.get("CC", "cc").split()[0]) is not None


@pytest.fixture
def torch_path(monkeypatch):
    """Run the body with the kernel switched off (the torch-ops path)."""
    def use(on: bool):
        monkeypatch.setenv("CALIBKIT_NATIVE", "1" if on else "0")
    return use


def _torch_counts(x: torch.Tensor, mult: float, length: int) -> torch.Tensor:
    with native.switched(False):
        return H.binned_counts(x.reshape(1, -1), torch.tensor([mult]), 0.0, length, absolute=True)[0]


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on PATH")
def test_kernel_builds_where_a_compiler_exists():
    assert native.available()
    assert native.library_path().exists()
    assert native.usable(torch.zeros(3)) and not native.usable(torch.zeros(3, dtype=torch.float64))


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on PATH")
def test_kernel_builds_from_source_into_an_empty_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("CALIBKIT_NATIVE_DIR", str(tmp_path))
    native.reset()
    try:
        assert native.available()  # compiled now: the folder was empty
        built = list(tmp_path.iterdir())
        assert built == [native.library_path()] and built[0].stat().st_size > 0
        counts, over, nonfinite, maxabs, _ = native.abs_counts(torch.tensor([0.5, -2.5, 3.0]), 1.0, 4)
        assert counts.tolist() == [1, 0, 1, 1] and (over, nonfinite, maxabs) == (0, 0, 3.0)
    finally:
        native.reset()


def _cases():
    g = torch.Generator().manual_seed(11)
    relu = torch.relu(torch.randn(300_001, generator=g))
    relu[:20_000] = 0.0  # a long run of one bin (the lanes' case)
    signed = torch.randn(99_999, generator=g) * 3
    w = 2.0 ** -6
    edges = torch.arange(-4000, 4000, dtype=torch.float32) * w  # exact bin edges, both signs, -0.0 too
    edges[0] = -0.0
    tiny = torch.tensor([1e-45, 1e-40, 1.1754944e-38, 0.0, -1e-44])  # subnormals
    return [("relu", relu, 2048 / float(relu.max()), 2049), ("signed", signed, 2048 / float(signed.abs().max()), 2049),
            ("edges", edges, 1 / w, 4001), ("tiny", tiny, 2.0 ** 126, 16),
            ("wide", signed, 300_000 / float(signed.abs().max()), 300_001)]  # histogram larger than the caches


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on PATH")
@pytest.mark.parametrize("case", range(5))
def test_abs_counts_equal_the_torch_ops_path(case):
    name, x, mult, length = _cases()[case]
    mult = float(torch.tensor(mult, dtype=torch.float32))  # what the callers pass: a float32 value
    counts, over, nonfinite, maxabs, _ = native.abs_counts(x, mult, length)
    assert (over, nonfinite) == (0, 0), name
    assert torch.equal(counts, _torch_counts(x, mult, length)), name
    assert int(counts.sum()) == x.numel()
    assert maxabs == float(x.abs().max())


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on PATH")
def test_abs_counts_reports_out_of_range_and_nonfinite_values():
    x = torch.tensor([0.5, -1.5, 2.5, 7.0, -9.0, float("nan"), float("inf"), float("-inf"), 3.99, 4.0] * 3
                     + [0.25])  # 31 values: the 4-wide loop and its tail both see every kind
    counts, over, nonfinite, maxabs, _ = native.abs_counts(x, 1.0, 4)
    assert counts.tolist() == [4, 3, 3, 3]     # |x| in [0,1), [1,2), [2,3), [3,4)
    assert (over, nonfinite) == (9, 9)         # 7, 9, 4 three times; NaN, +Inf, -Inf three times
    assert maxabs == 9.0                       # the largest finite |x| (NaN/Inf ignored)
    kept = native.abs_counts(x, 1.0, 4, keep_over=9)[4]
    assert sorted(kept.tolist()) == [4.0] * 3 + [7.0] * 3 + [9.0] * 3
    assert native.abs_counts(x, 1.0, 4, keep_over=8)[4] is None  # more than asked for: none returned
    with pytest.raises(ValueError, match="length=0 is out of range"):
        native.abs_counts(x, 1.0, 0)
    with pytest.raises(ValueError, match="mult=-1.0 is out of range"):
        native.abs_counts(x, -1.0, 4)
    with pytest.raises(ValueError, match="CPU float32"):
        native.abs_counts(x.double(), 1.0, 4)


def _kl_run(batches, **kw):
    obs = get_observer_class("kl")(bits=6, averaging_constant=0.3, update_interval=2, bins=64, **kw)
    for x in batches:
        obs(x)
    return obs


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on PATH")
@pytest.mark.parametrize("over_keep", [1 << 16, 10])  # growth: the values beyond the range binned alone / all again
def test_kl_observer_gives_the_same_histogram_and_clip_with_and_without_the_kernel(over_keep, torch_path, monkeypatch):
    monkeypatch.setattr(accumulating_histogram, "OVER_KEEP", over_keep)
    g = torch.Generator().manual_seed(5)
    # growing ranges force extensions and pair merges (max_length = 8 * bins); a non-contiguous and a bf16 batch
    batches = [torch.relu(torch.randn(40_000, generator=g)) * s for s in (1.0, 1.2, 5.0, 60.0, 61.0, 2.0)]
    batches.append(torch.randn(300, 200, generator=g).t())
    batches.append((torch.randn(5000, generator=g) * 30).bfloat16())
    results = []
    for on in (True, False):
        torch_path(on)
        obs = _kl_run(batches)
        results.append((obs.histogram.counts.clone(), obs.histogram.width, obs.histogram.max_value,
                        obs.histogram.total, float(obs.get_amax())))
    (c1, *rest1), (c0, *rest0) = results
    assert torch.equal(c1, c0) and rest1 == rest0
    assert results[0][1] > 2.0 ** -10  # merges happened


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on PATH")
def test_kl_observer_nonfinite_batch_in_the_kernel_path_raises_and_changes_nothing(torch_path):
    torch_path(True)
    obs = _kl_run([torch.randn(1000), torch.randn(1000)])
    assert obs.histogram.native_ready(torch.zeros(1))
    before = (obs.histogram.counts.clone(), obs.histogram.total, obs.histogram.max_value, int(obs.steps), float(obs.amax))
    bad = torch.randn(1000) * 100
    bad[[3, 500]] = float("nan")
    bad[7] = float("-inf")
    with pytest.raises(CalibrationError, match=r"KLObserver: input contains 2 NaN and 1 Inf values \(shape \(1000,\)\)"):
        obs(bad)
    after = (obs.histogram.counts, obs.histogram.total, obs.histogram.max_value, int(obs.steps), float(obs.amax))
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:]


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on PATH")
@pytest.mark.parametrize("name", ["percentile", "mse", "mix"])
def test_histogram_observers_agree_with_and_without_the_kernel(name, torch_path):
    g = torch.Generator().manual_seed(9)
    batches = [torch.relu(torch.randn(2, 64, 30, 30, generator=g)) * (1 + i) for i in range(3)]
    batches.append(torch.randn(2, 64, 30, 30, generator=g))  # signed
    amax = []
    for on in (True, False):
        torch_path(on)
        obs = get_observer_class(name)(averaging_constant=0.5)
        for x in batches:
            obs(x)
        amax.append(float(obs.get_amax()))
    assert amax[0] == amax[1]


def test_a_failed_build_falls_back_to_torch_ops_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("CALIBKIT_NATIVE_DIR", str(tmp_path / "lib"))
    native.reset()
    try:
        with pytest.warns(RuntimeWarning, match="compiled histogram kernel is unavailable.*no-such-compiler"):
            assert not native.available()
        assert not native.usable(torch.zeros(3))
        with pytest.raises(RuntimeError, match="unavailable"):
            native.abs_counts(torch.zeros(3), 1.0, 4)
        obs = _kl_run([torch.randn(500), torch.randn(500) * 3])  # still calibrates, through torch ops
        assert float(obs.get_amax()) > 0
    finally:
        native.reset()  # the next use loads the real kernel again


def test_calibkit_native_0_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("CALIBKIT_NATIVE", "0")
    assert not native.available() and not native.usable(torch.zeros(3))
    obs = _kl_run([torch.randn(500), torch.randn(500)])
    assert not obs.histogram.native_ready(torch.zeros(3))


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on PATH")
def test_parallel_parts_give_the_same_result(monkeypatch):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(100_003, generator=g) * 5
    x[[10, 70_000]] = float("nan")
    x[99_999] = 1e30
    mult = float(torch.tensor(100.0 / 20.0))
    one = native.abs_counts(x, mult, 101)
    monkeypatch.setattr(native, "PARALLEL_MIN_ELEMS", 10_000)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        three = native.abs_counts(x, mult, 101)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], three[0]) and one[1:] == three[1:]
    assert one[2] == 2 and one[3] == float(torch.tensor(1e30)) and one[1] == int(((x.abs() * mult >= 101) & x.isfinite()).sum())


def test_switched_sets_and_restores_the_switch(monkeypatch):
    monkeypatch.setenv("CALIBKIT_NATIVE", "off")
    with native.switched(True):
        assert os.environ["CALIBKIT_NATIVE"] == "1"
        with native.switched(False):
            assert not native.usable(torch.zeros(3))
        assert os.environ["CALIBKIT_NATIVE"] == "1"
    assert os.environ["CALIBKIT_NATIVE"] == "off"
    monkeypatch.delenv("CALIBKIT_NATIVE")
    with pytest.raises(KeyError), native.switched(False):
        raise KeyError("inside")  # restored (removed) on error too
    assert "CALIBKIT_NATIVE" not in os.environ
