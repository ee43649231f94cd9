"""Figures of notebook 02's guide experiments (:mod:`calibkit.tutorial.data_rules` rows): accuracy against the
averaging constant per step count, accuracy per calibration set, and the relative scale differences of the
fake-quant comparison. Accuracies (fractions in the rows) are drawn in %; every function returns the ``Figure``."""

from __future__ import annotations

from typing import Mapping, Sequence

from calibkit.tutorial.figures import axes_of, plot_bars
from calibkit.tutorial.settings import mean

__all__ = ["plot_constant_vs_steps", "plot_calibration_sets", "plot_scale_differences"]


def _seed_means(rows: Sequence[Mapping], key) -> dict:
    """``{key(row): [accuracy per seed, averaged over bit widths]}``."""
    by: dict = {}
    for r in rows:
        by.setdefault(key(r), {}).setdefault(r["seed"], []).append(r["accuracy"])
    return {k: [mean(v) for v in seeds.values()] for k, seeds in by.items()}


def plot_constant_vs_steps(rows: Sequence[Mapping], ax=None, figsize=(6, 3.5)):
    """Accuracy (%) against the averaging constant (log axis), one line per number of steps; points are means over
    seeds and bit widths, bars the seed range (``data_rules.averaging_constant_rows``)."""
    fig, ax = axes_of(ax, figsize)
    acc = _seed_means(rows, lambda r: (r["steps"], r["averaging_constant"]))
    for i, st in enumerate(sorted({k[0] for k in acc})):
        cs = sorted(c for s, c in acc if s == st)
        ys = [100 * mean(acc[(st, c)]) for c in cs]
        lo = [y - 100 * min(acc[(st, c)]) for y, c in zip(ys, cs)]
        hi = [100 * max(acc[(st, c)]) - y for y, c in zip(ys, cs)]
        ax.errorbar(cs, ys, yerr=[lo, hi], marker="o", markersize=4, capsize=3, color=f"C{i}", label=f"{st} steps")
    cs = sorted({k[1] for k in acc})
    ax.set(xscale="log", xticks=cs, xlabel="averaging constant c", ylabel="accuracy (%)")
    ax.set_xticklabels([f"{c:g}" for c in cs])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_calibration_sets(rows: Sequence[Mapping], title: str = "", ax=None, figsize=(7, 3.2)):
    """One bar per calibration set (and batch size, when there are several): mean accuracy (%) over seeds and bit
    widths, the seed range as error bars (``data_rules.calibration_set_rows``)."""
    several = len({r["batch_size"] for r in rows}) > 1
    acc = _seed_means(rows, lambda r: (r["set"], r["batch_size"]))
    labels = [f"{s}\nbatch {b}" if several else s for s, b in acc]
    values = [100 * mean(v) for v in acc.values()]
    errors = [50 * (max(v) - min(v)) for v in acc.values()]
    fig = plot_bars(labels, values, ylabel="accuracy (%)", title=title, ax=ax, figsize=figsize, annotate="{:.1f}",
                    errors=errors)
    return fig


def plot_scale_differences(rows: Sequence[Mapping], tolerance: float, ax=None, figsize=(8, 3.2)):
    """Relative scale difference per quantizer (execution order, log axis) between calibrating with and without
    fake quantization applied while observing (``data_rules.fake_quant_rows``); differences below ``tolerance``
    are drawn at ``tolerance / 10``, and ``tolerance`` as a dotted line."""
    fig, ax = axes_of(ax, figsize)
    floor = tolerance / 10
    for kind, color in (("activation", "C0"), ("weight", "C1")):
        pts = [(i, max(r["rel_applied"], floor)) for i, r in enumerate(rows) if (r["kind"] == "weight") == (kind == "weight")]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color=color, label=f"{kind} quantizers")
    ax.axhline(tolerance, color="black", linestyle=":", linewidth=1.2, label=f"tolerance {tolerance:g}")
    ax.set_yscale("log")
    ax.set_xlabel("quantizer (execution order)")
    ax.set_ylabel("relative scale difference")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
