"""How the ``percentile`` method behaves on the three activation shapes of docs/methods.md#percentile-tuning (notebook 03).

Synthetic, seeded distributions (values are signed; the percentile works on ``|x|``):

* ``ultra_long_tail``: a Laplace bulk (scale 1) plus a few (0.005 %) values spread log-uniformly up to
  200, i.e. far beyond the bulk: the maximum sits ~30x above the 99.9th percentile.
* ``wide_range``: magnitudes spread log-uniformly over six decades (1e-4 .. 1e2): no tail to clip, the
  range itself is too wide for a uniform grid.
* ``dense_spikes``: a unit-normal bulk plus 0.2 % of the values packed tightly around +-20 (a few outlier
  channels that are large on every input, as after a layer norm).

:func:`percentile_curve` sweeps the percentile on one tensor: the threshold is what
``PercentileObserver(percentile, bins)`` computes on it (one batch), and the quantization error is
measured with :func:`calibkit.quant.numerics.quantize_dequantize` at each bit width, as

* ``sqnr_db``: signal-to-quantization-noise ratio over all values (dominated by the largest ones),
* ``bulk_sqnr_db``: the same over the *bulk*, the values up to the 99th percentile of ``|x|`` (where
  most of the information of an activation lies),
* ``zero_fraction``: share of non-zero values rounded to 0 (lost entirely).

:func:`percentile_gallery` runs it on all three distributions and adds the histogram for plotting
(:func:`calibkit.tutorial.figures.plot_percentile_gallery`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from calibkit.quant.observers import PercentileObserver, check_int_range, check_percentile
from calibkit.quant.numerics import check_bits, quantize_dequantize, scale_from_amax

__all__ = ["GALLERY_PERCENTILES", "GalleryDistribution", "gallery_distributions", "percentile_curve",
           "percentile_gallery", "gallery_summary"]

#: Percentiles swept by default (99 % .. 100 %, denser in the tail).
GALLERY_PERCENTILES = (99.0, 99.5, 99.9, 99.95, 99.99, 99.995, 99.999, 99.9995, 99.9999, 100.0)
#: Bulk = values up to this percentile of |x| (for ``bulk_sqnr_db``).
BULK_PERCENTILE = 99.0


@dataclass
class GalleryDistribution:
    """One synthetic activation: ``values`` (float32 ``[n]``), a ``title`` and the ``advice`` for it."""

    name: str
    title: str
    values: torch.Tensor
    advice: str


def _signs(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)


def gallery_distributions(n: int = 200_000, seed: int = 0) -> dict[str, GalleryDistribution]:
    """The three distributions of the module docstring, ``n`` values each (same seed, same values)."""
    n = check_int_range("n", n, 20_000)
    g = torch.Generator().manual_seed(int(seed))
    # ultra-long tail: Laplace bulk + 0.005 % log-uniform outliers in [10, 200]
    x = -torch.log1p(-torch.rand(n, generator=g)) * _signs(n, g)
    k = max(1, n // 20_000)
    idx = torch.randperm(n, generator=g)[:k]
    x[idx] = torch.exp(torch.empty(k).uniform_(math.log(10.0), math.log(200.0), generator=g)) * _signs(k, g)
    tail = x
    # wide range: log-uniform magnitudes over six decades
    wide = 10.0 ** (torch.rand(n, generator=g) * 6.0 - 4.0) * _signs(n, g)
    # dense spikes: N(0, 1) bulk + 0.2 % of values at +-20 (+-0.1)
    spikes = torch.randn(n, generator=g)
    k = n // 500
    idx = torch.randperm(n, generator=g)[:k]
    spikes[idx] = (20.0 + 0.1 * torch.randn(k, generator=g)) * _signs(k, g)
    return {
        "ultra_long_tail": GalleryDistribution(
            "ultra_long_tail", "ultra-long tail: Laplace bulk + 0.005 % outliers up to 200", tail.float(),
            "clip the rare far values: a lower percentile (99.9-99.99) keeps the bulk's resolution; the fewer "
            "the bits, the more it pays"),
        "wide_range": GalleryDistribution(
            "wide_range", "very wide range: |x| log-uniform over six decades", wide.float(),
            "no percentile helps (the curve is flat and most small values round to zero at any clip): "
            "shrink the range in float training (weight decay, activation regularization) or use more bits"),
        "dense_spikes": GalleryDistribution(
            "dense_spikes", "layer-norm-like: N(0,1) bulk + 0.2 % dense spikes at +-20", spikes.float(),
            "small percentile moves do nothing while the clip sits inside a spike; only a large move (below "
            "100 % minus the spike share) changes it, and then it clips the spikes: handle such ops "
            "separately (their own observer or bit width) instead of tuning the global percentile; this departs "
            "from the guide, which says to move the percentile in larger steps (notebook 05 measures both on a "
            "real LayerNorm output)"),
    }


def _db(signal: float, noise: float) -> float:
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


def percentile_curve(x: torch.Tensor, percentiles: Sequence[float] = GALLERY_PERCENTILES,
                     bits: Sequence[int] = (4, 6, 8), bins: int = 2048) -> dict:
    """Threshold and quantization error of the ``percentile`` method for each percentile.

    Args:
        x: values of one activation (any shape, finite).
        percentiles: each in (0, 100].
        bits: bit widths to measure the error at (2..16 each).
        bins: histogram bins of the percentile observer.
    Returns ``{"percentiles": [P], "thresholds": [P], "bulk_limit": float, "by_bits": {bits: {"sqnr_db": [P],
    "bulk_sqnr_db": [P], "zero_fraction": [P], "best_percentile": p (highest sqnr_db)}}}``.
    Thresholds do not depend on the bit width (the percentile observer ignores it).
    """
    ps = [check_percentile(p) for p in percentiles]
    if not ps:
        raise ValueError("percentiles is empty: give at least one value in (0, 100]")
    bits = [check_bits(b) for b in bits]
    x = x.detach().reshape(-1).float()
    thresholds = []
    for p in ps:
        obs = PercentileObserver(percentile=p, bins=bins)
        obs(x)
        thresholds.append(float(obs.get_amax()))
    ax = x.abs()
    bulk_limit = float(torch.quantile(ax[: 1 << 24].double(), BULK_PERCENTILE / 100.0))
    bulk = (ax <= bulk_limit).float()
    nonzero = x != 0
    n_nonzero = max(1, int(nonzero.sum()))
    x64 = x.double()
    signal, signal_bulk = float(torch.dot(x64, x64)), float(torch.dot(x64 * bulk, x64))
    by_bits = {}
    for b in bits:
        sq, bulk_sq, zeros = [], [], []
        for t in thresholds:
            xq = quantize_dequantize(x, scale_from_amax(t, b), b)
            d = (x - xq).double()
            sq.append(_db(signal, float(torch.dot(d, d))))
            bulk_sq.append(_db(signal_bulk, float(torch.dot(d * bulk, d))))
            zeros.append(int(((xq == 0) & nonzero).sum()) / n_nonzero)
        by_bits[b] = {"sqnr_db": sq, "bulk_sqnr_db": bulk_sq, "zero_fraction": zeros,
                      "best_percentile": ps[max(range(len(ps)), key=lambda i: sq[i])]}
    return {"percentiles": ps, "thresholds": thresholds, "bulk_limit": bulk_limit, "by_bits": by_bits}


def percentile_gallery(n: int = 200_000, seed: int = 0, percentiles: Sequence[float] = GALLERY_PERCENTILES,
                       bits: Sequence[int] = (4, 6, 8), bins: int = 2048, hist_bins: int = 400) -> dict[str, dict]:
    """:func:`percentile_curve` on every :func:`gallery_distributions` entry, plus ``title``, ``advice``
    and ``hist`` (``(edges, counts)`` of ``|x|`` with ``hist_bins`` bins over ``[0, max|x|]``)."""
    out = {}
    for name, d in gallery_distributions(n, seed).items():
        res = percentile_curve(d.values, percentiles, bits, bins)
        ax = d.values.abs()
        top = float(ax.max())
        counts = torch.histc(ax, bins=hist_bins, min=0.0, max=top).to(torch.int64)
        res.update(title=d.title, advice=d.advice, hist=(torch.linspace(0.0, top, hist_bins + 1), counts))
        out[name] = res
    return out


def gallery_summary(gallery: dict[str, dict]) -> dict[str, dict]:
    """JSON-ready digest of :func:`percentile_gallery`: per distribution the thresholds at 99.9 / 99.99 / 100
    (where swept), and per bit width the best percentiles and the SQNR range over the sweep."""
    out = {}
    for name, res in gallery.items():
        ps, th = res["percentiles"], res["thresholds"]
        entry = {"thresholds": {f"{p:g}": th[ps.index(p)] for p in (99.9, 99.99, 100.0) if p in ps},
                 "advice": res["advice"]}
        for b, cur in res["by_bits"].items():
            entry[f"bits_{b}"] = {"best_percentile": cur["best_percentile"],
                                  "sqnr_db_min": min(cur["sqnr_db"]), "sqnr_db_max": max(cur["sqnr_db"]),
                                  "zero_fraction_min": min(cur["zero_fraction"])}
        out[name] = entry
    return out
