"""Tests for calibkit.quant.observers: properties of every observer (hypothesis) and behaviour on bad input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calibkit.quant import histogram as H
from calibkit.quant import observers as O
from calibkit.quant.kl_search import kl_threshold_bins
from calibkit.quant.observers import mse as mse_module
from calibkit.errors import CalibrationError
from calibkit.quant.numerics import MIN_SCALE, qrange, quantize_dequantize, scale_from_amax

PER_TENSOR = ["min_max", "percentile", "mse", "kl", "mix", "moving_average_min_max"]
PER_CHANNEL = ["min_max", "percentile", "mse", "mix", "moving_average_per_channel_min_max"]
ABS_BASED = ["min_max", "percentile", "kl", "moving_average_min_max"]  # depend on |x| only
pytestmark = pytest.mark.usefixtures("one_thread")


PROPS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make(name, **kw):
    return O.get_observer_class(name)(**kw)


def prop_make(name, **kw):
    """Observers for the property tests: kl with 512 bins keeps the many searches fast."""
    if name == "kl":
        kw.setdefault("bins", 512)
    return make(name, **kw)


def l2(x, scale, bits, ch_axis=None):
    return float(((quantize_dequantize(x, scale, bits, ch_axis) - x).double() ** 2).sum())


# ---------------------------------------------------------------- strategies
@st.composite
def batches(draw, max_batches=3):
    """1-3 batches of float32 data with varied magnitudes, outliers and zeros."""
    n = draw(st.integers(1, max_batches))
    size = draw(st.integers(1, 300))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    out = []
    for _ in range(n):
        vals = draw(st.lists(st.floats(-1000, 1000, allow_nan=False, width=32), min_size=size, max_size=size))
        out.append(torch.tensor(vals, dtype=torch.float32) * magnitude)
    return out


bits_st = st.integers(2, 16)
kl_bits_st = st.integers(2, 9)  # kl needs bins > 2**(bits-1); the property tests use 512 bins


def _bits_for(name, draw_bits, draw_kl_bits):
    return draw_kl_bits if name == "kl" else draw_bits


# ---------------------------------------------------------------- properties, every observer
@pytest.mark.parametrize("name", PER_TENSOR)
@PROPS
@given(data=batches(), bits=bits_st, kl_bits=kl_bits_st, c=st.sampled_from([0.0, 0.01, 0.5, 1.0]))
def test_scale_positive_finite_and_clip_within_observed_range(name, data, bits, kl_bits, c):
    bits = _bits_for(name, bits, kl_bits)
    obs = prop_make(name, bits=bits, averaging_constant=c)
    for x in data:
        assert obs(x) is x  # forward records and returns its input
    scale, amax = obs.calculate_qparams(), obs.get_amax()
    assert scale.shape == () and scale.dtype == torch.float32
    assert bool(torch.isfinite(scale)) and float(scale) > 0
    assert torch.equal(scale, scale_from_amax(amax, bits))
    observed = max(float(x.abs().max()) for x in data)
    assert 0.0 <= float(amax) <= observed * (1 + 1e-6)


@pytest.mark.parametrize("name", PER_TENSOR)
@PROPS
@given(data=batches(max_batches=1), bits=bits_st, kl_bits=kl_bits_st)
def test_symmetric_range_and_half_step_error_inside_range(name, data, bits, kl_bits):
    bits = _bits_for(name, bits, kl_bits)
    qmin, qmax = qrange(bits)
    obs = prop_make(name, bits=bits)
    x = data[0]
    obs(x)
    scale, amax = obs.calculate_qparams(), obs.get_amax()
    # zero point 0: +amax and -amax are both reached within half a step
    # float32 rounding: allow a few ulps of the magnitudes involved
    slack = 4 * torch.finfo(torch.float32).eps * max(float(amax), float(x.abs().max()))
    ends = torch.stack([amax, -amax])
    assert float((quantize_dequantize(ends, scale, bits) - ends).abs().max()) <= float(scale) / 2 + slack
    inside = x[(x >= qmin * scale) & (x <= qmax * scale)]
    if inside.numel():
        err = (quantize_dequantize(inside, scale, bits) - inside).abs().max()
        assert float(err) <= float(scale) / 2 + slack
    if name in ABS_BASED:  # observers of |x| give the same range for -x
        mirrored = prop_make(name, bits=bits)
        mirrored(-x)
        assert torch.equal(mirrored.get_amax(), amax)


@pytest.mark.parametrize("name", PER_TENSOR)
@PROPS
@given(data=batches(), bits=bits_st, kl_bits=kl_bits_st)
def test_identical_inputs_give_identical_results(name, data, bits, kl_bits):
    bits = _bits_for(name, bits, kl_bits)
    a, b = prop_make(name, bits=bits, averaging_constant=0.3), prop_make(name, bits=bits, averaging_constant=0.3)
    for x in data:
        a(x)
        b(x.clone())
    assert torch.equal(a.get_amax(), b.get_amax())


@PROPS
@given(data=batches(max_batches=1), bits=bits_st, stride=st.sampled_from([1, 2, 5, 95]))
def test_mse_never_worse_than_min_max_on_its_batch(data, bits, stride):
    x = data[0]
    mse, mm = make("mse", bits=bits, stride=stride), make("min_max", bits=bits)
    mse(x)
    mm(x)
    e_mse, e_mm = l2(x, mse.calculate_qparams(), bits), l2(x, mm.calculate_qparams(), bits)
    assert e_mse <= e_mm * (1 + 1e-6) + 1e-30


@pytest.mark.parametrize("name", PER_CHANNEL)
@PROPS
@given(channels=st.integers(1, 6), per=st.integers(1, 60), ch_axis=st.sampled_from([0, 1, -1]),
       bits=bits_st, seed=st.integers(0, 2**31 - 1), heavy=st.booleans())
def test_per_channel_equals_per_tensor_channel_by_channel(name, channels, per, ch_axis, bits, seed, heavy):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(channels, per, 3, generator=g) * torch.rand(channels, 1, 1, generator=g) * 10
    if heavy:
        x = x ** 3
    x = x.movedim(0, ch_axis)
    per_ch = prop_make(name, bits=bits, ch_axis=ch_axis)
    per_ch(x)
    got = per_ch.get_amax()
    assert got.shape == (channels,)
    tensor_name = "min_max" if name == "moving_average_per_channel_min_max" else name
    for c in range(channels):
        alone = make(tensor_name, bits=bits)
        alone(x.select(ch_axis, c))
        assert float(got[c]) == float(alone.get_amax()), f"channel {c}"
    scale = per_ch.calculate_qparams()
    assert scale.shape == (channels,) and bool((scale > 0).all())


# ---------------------------------------------------------------- behaviour
@pytest.mark.parametrize("name", ["min_max", "percentile", "mse", "mix", "kl"])
def test_moving_average_semantics(name):
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(4000, generator=g), 3 * torch.randn(4000, generator=g)

    def run(c, xs):
        obs = make(name, averaging_constant=c)
        for x in xs:
            obs(x)
        return float(obs.get_amax())

    first, second_alone = run(0.01, [x1]), run(0.01, [x2])
    assert run(0.0, [x1, x2]) == first  # c = 0 freezes after the first batch
    if name == "kl":  # kl averages search results; each search sees every batch so far
        latest = run(1.0, [x1, x2])
        obs = make("kl")
        obs(x1)
        obs(x2)
        counts = obs.histogram.counts.clone()
        counts[0] = counts[1]
        assert obs.histogram.total == 8000
        assert latest == min(kl_threshold_bins(counts, 128) * obs.histogram.width, obs.histogram.max_value)
        assert latest != first
        assert math.isclose(run(0.25, [x1, x2]), first + 0.25 * (latest - first), rel_tol=1e-6)
    else:
        assert run(1.0, [x1, x2]) == second_alone  # c = 1 keeps the latest batch
        assert math.isclose(run(0.25, [x1, x2]), first + 0.25 * (second_alone - first), rel_tol=1e-6)


def test_mix_keeps_rare_spikes_that_carry_most_of_the_error():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200_000, generator=g).relu()
    x[torch.randperm(x.numel(), generator=g)[:10]] = 1000.0  # 0.005 % huge spikes: above the 99.99 % point
    mix, pct = make("mix"), make("percentile", percentile=99.99)
    mix(x)
    pct(x)
    assert float(mix.get_amax()) >= 0.9 * 1000.0
    assert float(pct.get_amax()) < 0.1 * 1000.0
    assert l2(x, mix.calculate_qparams(), 8) < 0.1 * l2(x, pct.calculate_qparams(), 8)


def test_mse_clips_heavy_tails_and_beats_min_max():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 300_000, generator=g)
    x = z[0] / (z[1:] ** 2).mean(0).sqrt()  # Student-t with 3 degrees of freedom
    mse, mm = make("mse"), make("min_max")
    mse(x)
    mm(x)
    assert float(mse.get_amax()) < 0.8 * float(mm.get_amax())  # the extreme tail is clipped
    assert l2(x, mse.calculate_qparams(), 8) < 0.7 * l2(x, mm.calculate_qparams(), 8)
    coarse = make("mse", stride=5)
    coarse(x)
    assert l2(x, coarse.calculate_qparams(), 8) <= 1.05 * l2(x, mse.calculate_qparams(), 8)


def test_mix_and_mse_large_tensor_paths():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 32, 16, 16, generator=g)  # > 2**18 elements: several chunks
    for name in ("mse", "mix", "percentile"):
        obs = make(name)
        obs(x)
        amax = float(obs.get_amax())
        assert 2.5 < amax <= float(x.abs().max())


def test_kl_update_interval_and_searches():
    g = torch.Generator().manual_seed(4)
    obs = make("kl", update_interval=2)
    xs = [torch.randn(3000, generator=g) for _ in range(5)]
    for x in xs:
        obs(x)
    assert int(obs.searches) == 2 and int(obs.steps) == 5
    single = make("kl", averaging_constant=1.0)
    single(torch.cat(xs[:4]))
    ref = make("kl", averaging_constant=1.0, update_interval=2)
    for x in xs[:4]:
        ref(x)
    assert float(ref.get_amax()) == float(single.get_amax())  # search 2 saw batches 1-4


def test_kl_handles_relu_zeros():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(100_000, generator=g).relu()
    obs = make("kl")
    obs(x)
    assert 1.5 < float(obs.get_amax()) <= float(x.max())  # the spike at 0 does not pull the clip down


@pytest.mark.parametrize("name", ["min_max", "percentile", "mse", "kl", "mix", "moving_average_min_max"])
def test_constant_and_zero_tensors_give_tiny_positive_scale(name):
    obs = make(name)
    obs(torch.zeros(2, 3))
    scale = obs.calculate_qparams()
    assert float(scale) == MIN_SCALE and MIN_SCALE > 0
    obs = make(name)
    obs(torch.full((100,), -3.0))
    scale = float(obs.calculate_qparams())
    assert 0 < scale <= 3.0 / 127.5 * (1 + 1e-6) and math.isfinite(scale)


@pytest.mark.parametrize("name", ["percentile", "mse", "mix", "kl"])
@pytest.mark.parametrize("power", [-80, 80])
def test_power_of_two_rescaling_is_exact(name, power):
    # float32 squared errors of ~1e-25 or ~1e+25 values would underflow/overflow; the observers must
    # give exactly the rescaled clip (scaling by a power of two is exact in floating point)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(20_000, generator=g) ** 3
    ref, scaled = make(name), make(name)
    ref(x)
    scaled(x * 2.0 ** power)
    assert float(scaled.get_amax()) == float(ref.get_amax()) * 2.0 ** power


@pytest.mark.parametrize("name", ["min_max", "percentile", "mse", "kl", "mix"])
def test_subnormal_values_give_min_scale(name):
    obs = make(name)
    obs(torch.tensor([1e-44, -3e-45, 0.0, 2e-45]))  # bins / amax overflows float32 here
    assert 0 < float(obs.get_amax()) <= 1e-44
    assert float(obs.calculate_qparams()) == MIN_SCALE


@pytest.mark.parametrize("name", ["min_max", "percentile", "mse", "kl", "mix", "moving_average_per_channel_min_max"])
def test_state_dict_round_trip(name):
    g = torch.Generator().manual_seed(6)
    kw = {"ch_axis": 0} if name in ("moving_average_per_channel_min_max", "mse", "mix") else {}
    obs = make(name, **kw)
    for _ in range(3):
        obs(torch.randn(8, 50, generator=g))
    state = obs.state_dict()
    assert "amax" in state and "steps" in state
    fresh = make(name, **kw)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.get_amax(), obs.get_amax())
    assert torch.equal(fresh.calculate_qparams(), obs.calculate_qparams())
    assert int(fresh.steps) == 3


def test_reset_forgets_data():
    obs = make("kl")
    obs(torch.randn(100))
    obs.reset()
    with pytest.raises(CalibrationError, match="has not observed any data"):
        obs.calculate_qparams()
    obs(torch.randn(100))
    assert float(obs.get_amax()) > 0


def test_half_precision_input():
    x = torch.randn(1000).half()
    for name in ("min_max", "percentile", "mse", "kl", "mix"):
        obs = make(name)
        assert obs(x) is x
        assert obs.calculate_qparams().dtype == torch.float32


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", PER_TENSOR)
def test_nan_inf_empty_and_no_data(name):
    obs = make(name)
    with pytest.raises(CalibrationError, match="has not observed any data"):
        obs.calculate_qparams()
    with pytest.raises(CalibrationError, match="1 NaN and 0 Inf"):
        obs(torch.tensor([1.0, float("nan")]))
    with pytest.raises(CalibrationError, match="0 NaN and 1 Inf"):
        obs(torch.tensor([1.0, float("-inf")]))
    with pytest.raises(CalibrationError, match="empty tensor"):
        obs(torch.empty(0, 3))
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        obs([1.0, 2.0])


@pytest.mark.parametrize("value", [0, 0.0, -1, 100.5, float("nan"), True, "99"])
def test_bad_percentile(value):
    with pytest.raises(ValueError, match=r"percentile=.* is out of range: use a number in \(0, 100\]"):
        make("percentile", percentile=value)


@pytest.mark.parametrize("name,kw,pattern", [
    ("percentile", {"bins": 1}, r"bins=1 is out of range: use an integer in \[2, 1048576\]"),
    ("percentile", {"bins": 2.5}, r"bins=2.5 is out of range"),
    ("kl", {"bins": 128}, r"bins=128 is out of range for the kl observer at bits=8 .*128 quantization levels.*"
                          r"use an integer in \[129, 1048576\]"),
    ("kl", {"bins": 2048, "bits": 12}, r"bins=2048 is out of range for the kl observer at bits=12"),
    ("mse", {"stride": 0}, r"stride=0 is out of range: use an integer in \[1, 95\]"),
    ("mse", {"stride": 96}, r"stride=96 is out of range: use an integer in \[1, 95\]"),
    ("kl", {"update_interval": 0}, r"update_interval=0 is out of range: use an integer >= 1"),
    ("mse", {"bits": 1}, r"bits=1 is not supported: use an integer bit width in \[2, 16\]"),
    ("mix", {"bits": 17}, r"bits=17 is not supported"),
    ("min_max", {"averaging_constant": 1.5}, r"averaging_constant=1.5 is out of range: use a number in \[0, 1\]"),
    ("kl", {"ch_axis": 0}, r"ch_axis=0: the kl observer is per-tensor only; use ch_axis=None"),
])
def test_bad_parameters(name, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        make(name, **kw)


def test_update_interval_larger_than_steps_is_an_error():
    obs = make("kl", update_interval=5)
    for _ in range(3):
        obs(torch.randn(100))
    msg = ("update_interval=5 is larger than the 3 calibration steps run: "
           "use update_interval <= number of calibration steps")
    with pytest.raises(CalibrationError, match=msg):
        obs.calculate_qparams()
    with pytest.raises(CalibrationError, match="update_interval=5"):
        obs.get_amax()
    for _ in range(2):
        obs(torch.randn(100))
    assert float(obs.calculate_qparams()) > 0


def test_unknown_observer_name_and_aliases():
    with pytest.raises(ValueError, match=r"observer='foo' is unknown: use one of \[.*'kl'.*'mix'.*'mse'.*'percentile'"):
        O.get_observer_class("foo")
    assert O.get_observer_class("MovingAverageMinMax") is O.MovingAverageMinMaxObserver
    assert O.get_observer_class("MovingAveragePerChannelMinMax") is O.MovingAveragePerChannelMinMaxObserver
    assert {"min_max", "percentile", "mse", "kl", "mix", "fixed_scale"} <= set(O.observer_names())


def test_ch_axis_out_of_range():
    obs = make("mse", ch_axis=2)
    with pytest.raises(ValueError, match="ch_axis=2 is out of range for a 2-d tensor"):
        obs(torch.randn(3, 4))


def test_defaults_match_spec():
    assert make("percentile").percentile == 99.99 and make("percentile").bins == 2048
    assert make("mse").stride == 1
    kl = make("kl")
    assert kl.bins == 2048 and kl.update_interval == 1
    for name in ("min_max", "percentile", "mse", "kl", "mix"):
        assert make(name).averaging_constant == 0.01 and make(name).bits == 8
    assert np.isclose(make("mse").shrinks[-1], 0.05) and len(make("mse", stride=5).shrinks) == 20


def test_fixed_scale_observer():
    obs = make("fixed_scale", amax=2.0)
    assert float(obs.calculate_qparams()) == pytest.approx(2.0 / 127.5)  # known range: no data needed
    x = torch.randn(10) * 100
    assert obs(x) is x
    assert float(obs.get_amax()) == 2.0
    assert float(make("fixed_scale", scale=0.5).get_amax()) == pytest.approx(0.5 * 127.5)
    with pytest.raises(ValueError, match="exactly one of amax=... or scale=..."):
        make("fixed_scale")
    with pytest.raises(ValueError, match=r"amax=-1.0 is out of range: use a number in \(0, inf\)"):
        make("fixed_scale", amax=-1.0)
    with pytest.raises(ValueError, match=r"scale=inf is out of range: use a number in \(0, inf\)"):
        make("fixed_scale", scale=float("inf"))


@pytest.mark.parametrize("case", ["proven_by_bounds", "proven_by_fine_bins", "measured"])
def test_mse_large_tensor_decision_equals_exact_comparison(monkeypatch, case):
    # The k = 0 vs best decision may be settled by histogram bounds: it must be exactly the decision two
    # exact measurements give, and the bounds must spare passes when they can.
    g = torch.Generator().manual_seed(11)
    n, bits = 600_000, 8
    if case == "proven_by_bounds":      # Student-t(3): clipping the extreme tail is a large, clear gain
        z = torch.randn(4, n, generator=g)
        x = z[0] / (z[1:] ** 2).mean(0).sqrt()
    elif case == "proven_by_fine_bins":  # Gaussian: a smaller gain, provable only with the finer bound bins
        x = torch.randn(n, generator=g)
    else:                               # uniform at 4 bits: the best candidate (k = 1) gains almost nothing
        x, bits = torch.rand(n, generator=g) * 2 - 1, 4
    passes = []
    real = mse_module.squared_errors
    monkeypatch.setattr(mse_module, "squared_errors", lambda *a: passes.append(a[1].shape) or real(*a))
    obs = make("mse", bits=bits)
    obs(x)
    amax = float(x.abs().max())
    clip = float(obs.get_amax())
    e_clip = l2(x, scale_from_amax(torch.tensor(clip), bits), bits)
    e0 = l2(x, scale_from_amax(torch.tensor(amax), bits), bits)
    if case == "proven_by_bounds":
        assert passes == [] and clip < 0.8 * amax and e_clip < 0.7 * e0
    elif case == "proven_by_fine_bins":
        assert passes == [] and clip < amax and e_clip < e0
        monkeypatch.setattr(O.MSEObserver, "BOUND_REFINE", 1)  # bounds from the scoring bins: too loose here
        coarse = make("mse", bits=bits)
        coarse(x)
        assert len(passes) >= 1 and float(coarse.get_amax()) == clip
    else:
        assert len(passes) >= 1 and (clip == amax or e_clip < e0)


def test_signed_histogram_with_finer_bins_sums_back_exactly():
    # MSEObserver scores a fine histogram summed back to SCORE_BINS: the nested bin edges make that sum
    # exactly the coarse histogram, also for values on bin edges and for the nonnegative path
    g = torch.Generator().manual_seed(12)
    B = 64
    for x, nonneg in ((torch.randn(3, 50_000, generator=g), False), (torch.randn(2, 50_000, generator=g).relu(), True),
                      (torch.randint(-B, B + 1, (1, 40_000), generator=g) / B * 3.0, False)):
        amax = x.abs().amax(1)
        coarse = H.signed_histogram(x, amax, B, nonnegative=nonneg)
        for refine in (2, 4):
            fine = H.signed_histogram(x, amax, B * refine, nonnegative=nonneg)
            assert torch.equal(fine.view(len(x), 2 * B, refine).sum(2), coarse)
