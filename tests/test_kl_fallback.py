"""The kl observer's fallback rule (docs/methods.md#kl): histograms with too little spread, too few values, or an
entropy clip that collapses keep the max; everything else is an entropy search, as before."""

import json
import pathlib

import pytest
import torch

from calibkit.quant.kl_search import abs_histogram_l2
from calibkit.quant.observers import KLObserver

pytestmark = pytest.mark.usefixtures("one_thread")


def observed(*batches, **kw) -> KLObserver:
    ob = KLObserver(**kw)
    for x in batches:
        ob(x)
    return ob


def test_the_rule_is_stated_in_extra_repr_and_the_thresholds_follow_the_bits():
    ob = KLObserver()
    assert (ob.min_used_bins(), ob.min_values()) == (128, 512)
    assert "fallback to max below 128 used bins or 512 values" in repr(ob)
    assert (KLObserver(bits=4, bins=64).min_used_bins(), KLObserver(bits=4, bins=64).min_values()) == (8, 32)
    assert ob.fallback is None and ob.fallbacks == 0


@pytest.mark.parametrize("x", [torch.full((10_000,), 0.7), -torch.full((3, 50), 2.5)], ids=["constant", "negative"])
def test_a_constant_tensor_keeps_its_max(x):
    ob = observed(x)
    assert ob.fallback.startswith("too little spread: 1 non-empty bins < 128")
    assert float(ob.get_amax()) == float(x.abs().max())
    assert "last search: too little spread" in repr(ob) and "fallbacks=1" in repr(ob)


def test_a_two_valued_tensor_keeps_its_max():
    x = torch.cat([torch.full((5000,), 0.1), torch.full((50,), 5.0)])
    x = x[torch.randperm(5050, generator=torch.Generator().manual_seed(0))]
    ob = observed(x)
    assert ob.fallback.startswith("too little spread: 2 non-empty bins")
    assert float(ob.get_amax()) == 5.0


def test_a_tiny_tensor_keeps_its_max():
    x = torch.randn(40, generator=torch.Generator().manual_seed(1))
    ob = observed(x)
    assert ob.fallback.startswith("too little spread")
    assert float(ob.get_amax()) == float(x.abs().max())


def test_few_values_spread_over_many_bins_keep_the_max():
    x = torch.linspace(0.01, 1.0, 300)  # every value in its own bin: 300 used bins, but only 300 values < 512
    ob = observed(x)
    assert ob.fallback == "too few values: 300 < 512; kept the max"
    assert float(ob.get_amax()) == pytest.approx(1.0)


def test_a_one_sided_tensor_is_searched_like_its_mirror_image():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1 << 16, generator=g).abs()
    neg, pos = observed(-x), observed(x)
    assert neg.fallback is None and neg.fallbacks == 0
    assert float(neg.get_amax()) == float(pos.get_amax())
    assert float(neg.get_amax()) < float(x.max())  # an entropy search clips the Gaussian tail


def recorded_collapse() -> torch.Tensor:
    """The values of a recorded histogram (efficientnet_b0, features.7.0.block.3.0.out, one benchmark batch), each
    at its bin centre: one channel (176 values) sits at the max, 30 % above the rest."""
    rec = json.loads((pathlib.Path(__file__).parent / "data" / "kl_collapse_histogram.json").read_text())
    centres = (torch.tensor(rec["bins"], dtype=torch.float64) + 0.5) * rec["width"]
    return centres.float().repeat_interleave(torch.tensor(rec["counts"]))


def test_a_population_at_the_max_is_not_clipped_away():
    """The entropy search clips just below the channel at the max, with ~36 x the L2 error of keeping the max
    (under 1 dB of the logits SQNR on the model); the rule keeps the max."""
    x = recorded_collapse()
    ob = observed(x)
    assert ob.fallback is not None and ob.fallback.startswith("collapse: the entropy clip")
    assert "cuts 176 values" in ob.fallback
    assert float(ob.get_amax()) == float(x.max())
    ratio = KLObserver.COLLAPSE_RATIO
    KLObserver.COLLAPSE_RATIO = float("inf")
    try:  # without the rule the search clips below the population
        assert float(observed(x).get_amax()) < 0.8 * float(x.max())
    finally:
        KLObserver.COLLAPSE_RATIO = ratio


def test_rare_outliers_are_still_clipped():
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(100_000, generator=g).clamp(-4, 4), torch.full((5,), 12.0)])  # 5 < MIN_CLIPPED
    ob = observed(x)
    assert ob.fallback is None
    assert float(ob.get_amax()) < 6.0


def test_the_rule_applies_per_search_and_reset_forgets_it():
    ob = observed(torch.full((100,), 1.0), torch.randn(1 << 16, generator=torch.Generator().manual_seed(5)))
    assert ob.fallbacks == 1 and ob.fallback is None  # the first search fell back, the second searched
    ob.reset()
    assert (ob.fallback, ob.fallbacks) == (None, 0)


def test_abs_histogram_l2_matches_its_formula():
    counts = torch.tensor([7, 2, 0, 1])  # bin 0 ignored; centres 1.5, 2.5 (empty), 3.5 at width 1
    clip = 3.0
    s = clip / 127.5
    top = 127 * s
    want_clip = 2 * min(1.5 ** 2, s * s / 12) + (3.5 - top) ** 2
    want_max = 2 * min(1.5 ** 2, (4.0 / 127.5) ** 2 / 12) + min(3.5 ** 2, (4.0 / 127.5) ** 2 / 12)
    got = abs_histogram_l2(counts, 1.0, [clip, 4.0], 8)
    assert got.tolist() == pytest.approx([want_clip, want_max], rel=1e-12)


def test_the_debug_report_label_counts_fallbacks():
    from calibkit.analysis.overrides import observer_label
    from calibkit.quant.fake_quantize import FakeQuantize

    fq = FakeQuantize("kl")
    assert "fallbacks" not in observer_label(fq)
    fq.observer(torch.full((64,), 0.3))
    fq.observer(torch.full((64,), 0.3))
    assert observer_label(fq).endswith("fallbacks=2)")
