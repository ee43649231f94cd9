"""float64 activations and the float32 range (issue 16): every observer either computes the scales of the same
values in float32 or raises a CalibrationError naming the value -- never an infinite scale, NaN or a raw error."""

import math
import re

import pytest
import torch

from calibkit.errors import CalibrationError
from calibkit.quant.observers import get_observer_class

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = [("min_max", None), ("min_max", 0), ("percentile", None), ("percentile", 0), ("mse", None), ("mse", 0),
            ("kl", None), ("mix", None), ("mix", 0), ("moving_average_min_max", None),
            ("moving_average_per_channel_min_max", 0), ("fixed_scale", None)]


def make(name, ch_axis):
    kw = {"amax": 1.0} if name == "fixed_scale" else {}
    return get_observer_class(name)(ch_axis=ch_axis, **kw)


@pytest.mark.parametrize("name,ch_axis", SETTINGS)
@pytest.mark.parametrize("big", [1e300, -5e38])
def test_float64_beyond_float32_is_refused_naming_the_value(name, ch_axis, big):
    x = torch.randn(4, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[2, 7] = big
    ob = make(name, ch_axis)
    expected = re.escape(f"magnitude {abs(big):.6g} (torch.float64") + ".*beyond the float32 range"
    with pytest.raises(CalibrationError, match=expected):
        ob(x)
    if name != "fixed_scale":
        assert int(ob.steps) == 0  # nothing recorded


@pytest.mark.parametrize("name,ch_axis", SETTINGS)
def test_float64_inside_float32_gives_the_float32_scales(name, ch_axis):
    x = torch.randn(4, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1e37
    x[1, 3] = 3e38  # large, but a float32 number
    a, b = make(name, ch_axis), make(name, ch_axis)
    a(x)
    b(x.float())
    sa, sb = a.calculate_qparams(), b.calculate_qparams()
    assert torch.isfinite(sa).all() and bool((sa > 0).all())
    assert torch.equal(sa, sb)
    assert math.isfinite(float(sa.max()))
