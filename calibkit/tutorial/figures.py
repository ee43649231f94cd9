"""Figures for the calibration notebooks (02-04): histograms with clipping thresholds, curves, bars, the percentile
gallery. The figures of the experiments' rows (sweeps, method table, ranks, tuning path) are in
:mod:`calibkit.tutorial.experiment_figures`; tables are :class:`calibkit.tutorial.table.Table`.

Every plotting function draws with matplotlib and returns the ``Figure`` (pass ``ax=`` to draw
into an existing axes instead; the axes' figure is returned). Nothing is shown or saved here:
notebooks display the figure and save it with :func:`save_figure`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["plot_histogram_with_clips", "plot_curves", "plot_bars", "plot_grouped_bars", "plot_percentile_gallery",
           "save_figure", "METHOD_COLORS", "axes_of"]

#: Colour per calibration method, shared by all figures so a method looks the same everywhere.
METHOD_COLORS = {"min_max": "tab:gray", "percentile": "tab:blue", "mse": "tab:green", "kl": "tab:red",
                 "mix": "tab:purple", "slider": "black"}


def axes_of(ax, figsize):
    """``(figure, ax)``: ``ax`` and its figure, or a new figure with one axes of ``figsize``."""
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def _as_floats(values) -> list[float]:
    """``values`` (a tensor or a sequence) as a list of Python floats."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().tolist()
    return [float(v) for v in values]


def plot_histogram_with_clips(hist, clips: Mapping[str, float] | None = None, title: str = "", log: bool = True,
                              ax=None, xlabel: str = "|x|", figsize=(7, 3.5), colors: Mapping[str, str] | None = None):
    """Histogram of ``|x|`` with one vertical line per clipping threshold.

    Args:
        hist: ``(edges [B+1], counts [B])`` (tensors or sequences), e.g. ``ActivationStats.histogram(name)``.
        clips: ``{label: amax}``; each drawn as a vertical line labelled ``"label: amax"``.
        title: axes title.
        log: log-scale count axis (default True: the rare large values that decide the clip stay visible).
        ax: draw into this axes instead of a new figure.
        colors: ``{label: colour}`` (default :data:`METHOD_COLORS`, then the matplotlib cycle).
    Returns the matplotlib ``Figure``.
    """
    fig, ax = axes_of(ax, figsize)
    edges, counts = _as_floats(hist[0]), _as_floats(hist[1])
    if len(edges) != len(counts) + 1:
        raise ValueError(f"hist must be (edges [B+1], counts [B]); got {len(edges)} edges and {len(counts)} counts")
    ax.stairs(counts, edges, fill=True, color="tab:cyan", alpha=0.6, label="values")
    if log:
        ax.set_yscale("log")
        positive = [c for c in counts if c > 0]
        if positive:
            ax.set_ylim(bottom=0.5, top=max(positive) * 2)
    colors = {**METHOD_COLORS, **(colors or {})}
    styles = ["-", "--", "-.", ":"]
    for i, (label, amax) in enumerate((clips or {}).items()):
        color = colors.get(label, f"C{i % 10}")
        ax.axvline(float(amax), color=color, linestyle=styles[i % len(styles)], linewidth=1.6,
                   label=f"{label}: {float(amax):.4g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count" + (" (log)" if log else ""))
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_xlim(left=0)
    return fig


def plot_curves(x: Sequence[float], series: Mapping[str, Sequence[float]], xlabel: str = "", ylabel: str = "",
                title: str = "", logx: bool = False, ax=None, figsize=(6, 3.5), markers: bool = True,
                xticklabels: Sequence[str] | None = None):
    """Line plot of several series against a shared ``x`` (e.g. accuracy vs averaging constant).

    ``series``: ``{label: ys}`` with ``len(ys) == len(x)``; NaN values leave gaps. Method names get
    their :data:`METHOD_COLORS`. ``xticklabels``: labels for the ``x`` positions (e.g. percentiles
    plotted at "nines"). Returns the ``Figure``.
    """
    fig, ax = axes_of(ax, figsize)
    xs = _as_floats(x)
    for i, (label, ys) in enumerate(series.items()):
        ys = _as_floats(ys)
        if len(ys) != len(xs):
            raise ValueError(f"series {label!r} has {len(ys)} values for {len(xs)} x positions")
        ax.plot(xs, ys, marker="o" if markers else None, markersize=4, label=str(label),
                color=METHOD_COLORS.get(label, f"C{i % 10}"))
    if logx:
        ax.set_xscale("log")
    if xticklabels is not None:
        ax.set_xticks(xs)
        ax.set_xticklabels(list(xticklabels), rotation=45, ha="right", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def plot_bars(labels: Sequence[str], values: Sequence[float], ylabel: str = "", title: str = "", ax=None,
              figsize=(6, 3.2), annotate: str | None = "{:.3g}", errors: Sequence[float] | None = None):
    """Bar chart of one value per label (e.g. calibration seconds per method).

    ``annotate``: format for the value written above each bar (``None``: no labels); ``errors``:
    optional error-bar half-widths. Method names get their :data:`METHOD_COLORS`. Returns the ``Figure``.
    """
    fig, ax = axes_of(ax, figsize)
    labels, vals = [str(v) for v in labels], _as_floats(values)
    if len(labels) != len(vals):
        raise ValueError(f"{len(labels)} labels for {len(vals)} values")
    colors = [METHOD_COLORS.get(lab, f"C{i % 10}") for i, lab in enumerate(labels)]
    bars = ax.bar(labels, vals, color=colors, yerr=None if errors is None else _as_floats(errors), capsize=3)
    if annotate:
        for b, v in zip(bars, vals):
            if math.isfinite(v):
                ax.annotate(annotate.format(v), (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_grouped_bars(labels: Sequence[str], groups: Mapping[str, Sequence[float]], ylabel: str = "", title: str = "",
                      ax=None, figsize=(7, 3.2), annotate: str | None = "{:.1f}", ylim_from_data: bool = True,
                      reference: tuple[str, float] | None = None):
    """Bars of several groups per label (e.g. accuracy per method at 8 and 6 bits).

    ``groups``: ``{group name: values}`` with one value per label. ``ylim_from_data`` zooms the value axis
    onto the data (bars of close accuracies stay distinguishable); ``reference``: ``(label, value)`` drawn
    as a dotted horizontal line (e.g. the float accuracy). Returns the ``Figure``.
    """
    fig, ax = axes_of(ax, figsize)
    labels = [str(v) for v in labels]
    n = max(1, len(groups))
    width = 0.8 / n
    allv = []
    for g, (name, values) in enumerate(groups.items()):
        vals = _as_floats(values)
        if len(vals) != len(labels):
            raise ValueError(f"group {name!r} has {len(vals)} values for {len(labels)} labels")
        xs = [i - 0.4 + width * (g + 0.5) for i in range(len(labels))]
        bars = ax.bar(xs, vals, width=width * 0.95, label=str(name), color=f"C{g}")
        allv += [v for v in vals if math.isfinite(v)]
        if annotate:
            for b, v in zip(bars, vals):
                if math.isfinite(v):
                    ax.annotate(annotate.format(v), (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom",
                                fontsize=7)
    if reference is not None:
        ax.axhline(float(reference[1]), color="black", linestyle=":", linewidth=1.2, label=reference[0])
        allv.append(float(reference[1]))
    if ylim_from_data and allv:
        lo, hi = min(allv), max(allv)
        pad = max(0.5, 0.15 * (hi - lo))
        ax.set_ylim(lo - 3 * pad, hi + pad)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _nines_positions(percentiles: Sequence[float]) -> tuple[list[float], list[str]]:
    """x positions ("nines": 99.9 -> 3) and tick labels for percentiles; 100 goes half a step past the rest."""
    finite = [2.0 - math.log10(100.0 - p) for p in percentiles if p < 100]
    end = (max(finite) if finite else 2.0) + 0.5
    xs = [2.0 - math.log10(100.0 - p) if p < 100 else end for p in percentiles]
    return xs, [f"{p:g}" if p < 100 else "100 (max)" for p in percentiles]


def plot_percentile_gallery(gallery: Mapping[str, Mapping],
                            show_percentiles: Sequence[float] = (99.0, 99.9, 99.99, 100.0),
                            figsize_per_row=(12, 3.0)):
    """One row per distribution of :func:`calibkit.tutorial.gallery.percentile_gallery`.

    Left: histogram of ``|x|`` with the thresholds of ``show_percentiles``. Right: SQNR vs percentile
    for every bit width (solid: all values; dashed: the bulk up to the 99th percentile of ``|x|``).
    Returns the ``Figure``.
    """
    import matplotlib.pyplot as plt

    rows = len(gallery)
    fig, axes = plt.subplots(rows, 2, figsize=(figsize_per_row[0], figsize_per_row[1] * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1.2, 1]})
    for r, (name, res) in enumerate(gallery.items()):
        ps, th = list(res["percentiles"]), _as_floats(res["thresholds"])
        shown = {f"p={p:g}": th[ps.index(p)] for p in show_percentiles if p in ps}
        plot_histogram_with_clips(res["hist"], shown, title=res.get("title", name), ax=axes[r, 0],
                                  colors={k: f"C{i + 1}" for i, k in enumerate(shown)})
        xs, labels = _nines_positions(ps)
        ax = axes[r, 1]
        for i, (bits, cur) in enumerate(res["by_bits"].items()):
            ax.plot(xs, _as_floats(cur["sqnr_db"]), marker="o", markersize=3, color=f"C{i}", label=f"{bits}-bit, all")
            ax.plot(xs, _as_floats(cur["bulk_sqnr_db"]), linestyle="--", color=f"C{i}", label=f"{bits}-bit, bulk")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.set_xlabel("percentile (%)")
        ax.set_ylabel("SQNR (dB)")
        ax.grid(alpha=0.3)
        ax.set_title(f"{name}: SQNR vs percentile", fontsize=10)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
