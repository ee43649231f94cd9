"""Notebook 03's guide checks (calibkit.tutorial.method_knobs): shared calibration passes give exactly the clips of
separate calibrations, clip models the same scales, the records' verdicts follow the numbers; and kl's warning
when batches after the last search are left out of the threshold (docs/methods.md#kl)."""

import warnings

import pytest
import torch

from calibkit.analysis.activation_stats import activation_quantizers
from calibkit.cifar.models import cifar_resnet
from calibkit.errors import CalibrationError
from calibkit.quant.calibrate import calibrate
from calibkit.quant.fake_quantize import FakeQuantState, named_quantizers, set_fake_quantize
from calibkit.quant.observers import KLObserver
from calibkit.quant.observers.kl import LeftOutBatchesWarning
from calibkit.quant.prepare import prepare
from calibkit.quant.qconfig import get_default_qconfig
from calibkit.tutorial import method_knobs as mk

pytestmark = pytest.mark.usefixtures("one_thread")
C = 0.3  # an averaging constant other than the default, so that it must reach every observer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = cifar_resnet(width=(8, 8, 8), stem_width=8).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 16, 16, generator=g) * 1.5 for _ in range(4)]
    return model, batches


def separate(model, batches, cfg, base=None):
    """The clips of an ordinary calibration with ``cfg`` (per-op override by name when it names a layer)."""
    spec = cfg.spec(C)
    if cfg.layer:
        q = prepare(model, get_default_qconfig(base.method, activation_kwargs={"averaging_constant": C, **dict(base.params)},
                                               activation_bits=base.bits), (batches[0][:2],), overrides={cfg.layer: spec})
    else:
        q = prepare(model, get_default_qconfig(cfg.method, activation_kwargs=spec.kwargs, activation_bits=cfg.bits),
                    (batches[0][:2],))
    calibrate(q, batches, progress=False)
    return q, {n: float(fq.observer.get_amax()) for n, fq in activation_quantizers(q).items()}


def test_shared_passes_equal_separate_calibrations(tiny):
    model, batches = tiny
    layer = list(activation_quantizers(prepare(model, get_default_qconfig(), (batches[0][:2],))))[1]
    configs = (mk.long_tail_configs(layer, [6], [99.9]) + mk.stride_configs([1, 5], 4)
               + mk.interval_configs([2, None], len(batches), 4))
    passes = mk.calibration_passes(model, {0: batches}, configs, C, repeats=2)
    assert len(passes.seconds[configs[0]]) == 2 and all(s > 0 for s in passes.base_seconds)
    default = configs[0]
    for cfg in configs:
        q, want = separate(model, batches, cfg, base=default)
        got = {**passes.clips[0][default], **passes.clips[0][cfg]} if cfg.layer else passes.clips[0][cfg]
        assert got == want, cfg.label                                   # bit for bit
        clipped = mk.clip_model(passes.models[0], got, cfg.bits)        # the same scales, so the same outputs
        set_fake_quantize(q, FakeQuantState.VALIDATION)
        for n, fq in named_quantizers(q).items():
            assert torch.equal(named_quantizers(clipped)[n].scale, fq.scale), n
        with torch.no_grad():
            assert torch.equal(clipped(batches[0]), q(batches[0]))


def test_layer_input_is_the_float_tensor(tiny):
    model, batches = tiny
    passes = mk.calibration_passes(model, {0: batches}, mk.stride_configs([1], 8), C)
    name = "input"
    assert torch.equal(mk.layer_input(passes.models[0], name, batches[0]), batches[0])


def rows_long_tail(acc_low):
    return [{"bits": b, "variant": v, "layer": "x", "layer_sqnr_db": 20.0, "accuracies": [a, a],
             "accuracy": a} for b, accs in ((8, (0.9, 0.9, 0.9)), (4, acc_low))
            for v, a in zip(("percentile 99.9", "percentile 99.99", "mse (default)"), accs)]


@pytest.mark.parametrize("acc_low, verdict", [((0.8, 0.6, 0.7), "agrees"), ((0.8, 0.6, 0.9), "disagrees"),
                                              ((0.8, 0.799, 0.6), "inconclusive")])
def test_long_tail_verdict_follows_the_numbers(acc_low, verdict):
    record = mk.long_tail_check(rows_long_tail(acc_low), num_images=10_000)
    assert record["id"] == "long_tail_99_9" and record["verdict"] == verdict
    assert "4-bit: 99.9 80.00 %" in record["measured"]


def time_rows(key, seconds, accs):
    """Two settings timed in three passes; their paired differences spread over 0.04 s."""
    return [{key: k, "bits": 4, "searches": 1, "calib_seconds": 3 + s, "calib_seconds_spread": 0.5,
             "observer_seconds": s, "observer_seconds_all": [s + d * sign for d in (0, 0.01, -0.01)], "passes": 3,
             "accuracies": [a], "accuracy": a} for k, s, a, sign in zip((1, 10), seconds, accs, (1, -1))]


@pytest.mark.parametrize("seconds, accs, verdict", [((2.0, 1.0), (0.8, 0.8), "agrees"),
                                                    ((1.0, 1.005), (0.8, 0.8), "inconclusive"),
                                                    ((1.0, 2.0), (0.8, 0.8), "disagrees"),
                                                    ((2.0, 1.0), (0.8, 0.5), "disagrees")])
def test_stride_verdict_combines_time_and_accuracy(seconds, accs, verdict):
    record = mk.stride_check(time_rows("stride", seconds, accs), num_images=10_000)
    assert record["verdict"] == verdict and "noise = spread over 3 passes: 0.0400 s" in record["note"]


def test_interval_verdict_needs_the_error():
    rows = time_rows("update_interval", (2.0, 1.0), (0.8, 0.8))
    msg = "update_interval=5 is larger than the 4 calibration steps run"
    assert mk.interval_check(rows, 10_000, msg)["verdict"] == "agrees"
    assert mk.interval_check(rows, 10_000, None)["verdict"] == "disagrees"


# -- kl: batches after the last search ----------------------------------------------------------------------------
def fed(n, **kw):
    g = torch.Generator().manual_seed(3)
    ob = KLObserver(averaging_constant=C, **kw).eval()
    for _ in range(n):
        ob(torch.randn(4000, generator=g))
    return ob


def test_kl_warns_once_when_batches_are_left_out_and_the_scale_is_unchanged():
    ob = fed(3, update_interval=2)
    with pytest.warns(LeftOutBatchesWarning) as caught:
        scale = ob.calculate_qparams()
    assert len(caught) == 1
    assert str(caught[0].message) == (
        "kl observer: update_interval=2 leaves the last 1 of 3 calibration batches out of the threshold (it was "
        "searched after batch 2); use an update_interval that divides the number of calibration batches, or a "
        "multiple of 2 batches")
    assert ob.left_out() == 1 and int(ob.searches) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(ob.calculate_qparams(), scale)               # once per step count
        assert torch.equal(fed(3, update_interval=2).train().calculate_qparams(), scale)  # train mode: silent
        assert torch.equal(fed(2, update_interval=2).calculate_qparams(), scale)   # the same search, no batch left
        fed(4, update_interval=2).calculate_qparams()                   # nothing left out: silent
        fed(3, update_interval=1).get_amax()
    with pytest.raises(CalibrationError, match="update_interval=5 is larger than the 3"):
        fed(3, update_interval=5).get_amax()                            # no search at all: still the error


def test_calibrate_warns_and_qat_does_not(tiny):
    model, batches = tiny
    q = prepare(model, get_default_qconfig("kl", activation_kwargs={"update_interval": 2}), (batches[0][:2],))
    with pytest.warns(LeftOutBatchesWarning, match="update_interval=2 leaves the last 1 of 3"):
        calibrate(q, batches[:3], progress=False)
    set_fake_quantize(q.train(), FakeQuantState.QAT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LeftOutBatchesWarning)
        for x in batches:
            q(x)                                                        # QAT reads every step, between searches
