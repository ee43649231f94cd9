"""Same seed, same scales: every method's scales on a fixed model and fixed real images, against the numbers
recorded before the four-floors move (tests/data/scale_fingerprints.json, written by the same procedure as
``fingerprint`` below)."""

import math

import pytest
import torch

import calibkit as ck

from regression import SCALE_RTOL, load, tolerance

pytestmark = pytest.mark.usefixtures("one_thread")


def fingerprint(images: torch.Tensor, method: str, bits: int) -> dict:
    """The scales of every quantizer and the logit sum after calibrating a seeded smoke-width model on
    4 batches of 64 normalized test images, with ``method`` on the activations at ``bits`` bits."""
    batches = list(ck.normalize(images[:256]).split(64))
    torch.manual_seed(0)
    model = ck.cifar_resnet(width=(16, 32, 32)).eval()
    qc = ck.get_default_qconfig(activation_observer=method, weight_observer="min_max", activation_bits=bits)
    m = ck.prepare(model, qc, (batches[0][:2],))
    ck.calibrate(m, batches, progress=False)
    ck.set_fake_quantize(m, ck.FakeQuantState.VALIDATION)
    with torch.no_grad():
        logits = m(batches[0])
    return {"scales": {n: fq.scale.flatten().tolist() for n, fq in ck.named_quantizers(m).items()},
            "logit_sum": float(logits.double().abs().sum())}


RECORDED = load("scale_fingerprints.json")


@pytest.mark.parametrize("config", sorted(RECORDED["configs"]))
def test_scales_match_the_recording(cifar, config):
    method, bits = config.split("/a")
    kind, rtol = tolerance(RECORDED["machine"], SCALE_RTOL)
    want = RECORDED["configs"][config]
    got = fingerprint(cifar.test_images, method, int(bits))
    assert list(got["scales"]) == list(want["scales"]), "the quantizer sites changed"
    for name, scales in want["scales"].items():
        assert got["scales"][name] == pytest.approx(scales, rel=rtol), f"{config}: scale of {name} ({kind} machine)"
    assert math.isclose(got["logit_sum"], want["logit_sum"], rel_tol=10 * rtol), f"{config}: outputs ({kind} machine)"


def test_smoke_recordings_are_exact_on_a_recorded_machine_and_a_range_elsewhere():
    from regression import recorded_problems
    recs = [{"machine": "A", "notebooks": {"02": {"acc": 0.578, "q.well": 0.381}}},
            {"machine": "B", "notebooks": {"02": {"acc": 0.598, "q.well": 0.337}}}]
    table = {"same": 1e-9, "other": 0.02}
    assert recorded_problems(recs, "B", "02", {"acc": 0.598, "q": {"well": 0.337}}, table) == []
    assert recorded_problems(recs, "A", "02", {"acc": 0.598, "q": {"well": 0.381}}, table) == [
        "02: acc = 0.598, recorded [0.578] (same machine, tolerance 1e-09)"]
    # another machine: within 0.02 of the range [0.337, 0.381]; a difference of exactly 0.02 passes
    assert recorded_problems(recs, "C", "02", {"acc": 0.558, "q": {"well": 0.40}}, table) == []
    assert recorded_problems(recs, "C", "02", {"acc": 0.618, "q": {"well": 0.316}}, table) == [
        "02: q.well = 0.316, recorded [0.381, 0.337] (other machine, tolerance 0.02)"]
    assert recorded_problems(recs, "C", "03", {}, table) == []   # nothing recorded for that notebook
    assert all(r["machine"] and r["notebooks"] for r in load("smoke_baseline.json")["recordings"])
