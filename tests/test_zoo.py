"""The torchvision classification zoo works end to end: prepare -> calibrate -> VALIDATION -> convert on random
seeded weights and tiny random data (tests/zoo_models.py), with the logits SQNR of the fake-quantized model against
the float model above a floor per model and method, the converted model reproducing VALIDATION, and the ops with no
integer kernel (LayerNorm, attention, GELU, ...) kept in float and listed.

Floors: the values measured with ``python benchmarks/zoo.py`` (1 thread), less 3 dB (2 dB for the ViT, whose
numbers are low because 8 calibration images of a random 2-layer ViT leave its head clipping on held-out images).
Measured (dB): resnet18 21.2 / 21.7 / 21.5 / 21.5 / 21.7 (min_max / percentile / mse / kl / mix), mobilenet_v3_small
31.8 min_max, 33.8 mse; efficientnet_b0 36.7 min_max, 38.4 percentile; convnext_tiny 28.2 min_max, 28.6 mix;
vit_tiny 12.4 / 12.4 / 12.8 / 12.3 / 12.4.
"""

import functools

import pytest

from zoo_models import float_model, zoo_case

pytestmark = pytest.mark.usefixtures("one_thread")

FLOORS = {
    ("resnet18", "min_max"): 18.0, ("resnet18", "percentile"): 18.5, ("resnet18", "mse"): 18.5,
    ("resnet18", "kl"): 18.5, ("resnet18", "mix"): 18.5,
    ("mobilenet_v3_small", "min_max"): 28.5, ("mobilenet_v3_small", "mse"): 30.5,
    ("efficientnet_b0", "min_max"): 33.5, ("efficientnet_b0", "percentile"): 35.0,
    ("convnext_tiny", "min_max"): 25.0, ("convnext_tiny", "mix"): 25.5,
    ("vit_tiny", "min_max"): 10.3, ("vit_tiny", "percentile"): 10.4, ("vit_tiny", "mse"): 10.7,
    ("vit_tiny", "kl"): 10.2, ("vit_tiny", "mix"): 10.3,
}

#: What convert keeps in float, per model (at least these kinds of op).
FLOAT_KINDS = {
    "resnet18": {"AdaptiveAvgPool2d"},
    "mobilenet_v3_small": {"Hardswish", "Hardsigmoid"},
    "efficientnet_b0": {"SiLU", "Sigmoid"},
    "convnext_tiny": {"LayerNorm", "GELU"},
    "vit_tiny": {"LayerNorm", "GELU", "MultiheadAttention[0]"},
}


@functools.lru_cache(maxsize=None)
def _model(name):
    return float_model(name)


@pytest.mark.parametrize("name, method", list(FLOORS))
def test_zoo_model_quantizes_above_its_floor(name, method):
    r = zoo_case(name, method, _model(name))
    assert FLOORS[name, method] < r["sqnr_db"] < 60, f"{name} {method}: {r['sqnr_db']:.2f} dB"  # < 60: quantized
    assert r["max_int_diff"] <= 1e-4 * r["logit_range"]  # the converted model reproduces VALIDATION
    assert FLOAT_KINDS[name] <= set(r["float_ops"].values())
