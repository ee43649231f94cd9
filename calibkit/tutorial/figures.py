"""Figures and small tables for the calibration notebooks (02-04).

Every plotting function draws with matplotlib and returns the ``Figure`` (pass ``ax=`` to draw
into an existing axes instead; the axes' figure is returned). Nothing is shown or saved here:
notebooks display the figure and save it with :func:`save_figure`.

Tables are lists of row dicts (``[{"method": "mse", "accuracy": 0.91}, ...]``): :func:`format_table`
gives aligned text, :func:`html_table` an HTML string (for ``IPython.display.HTML``), and
:func:`write_csv` a CSV file -- no pandas needed.

Each function is self-contained (other modules may append their own functions to this file).
"""

from __future__ import annotations

import csv
import html
import math
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["plot_histogram_with_clips", "plot_curves", "plot_bars", "plot_grouped_bars", "plot_percentile_gallery",
           "format_table",
           "html_table", "write_csv", "save_figure", "METHOD_COLORS"]

#: Colour per calibration method, shared by all figures so a method looks the same everywhere.
METHOD_COLORS = {"min_max": "tab:gray", "percentile": "tab:blue", "mse": "tab:green", "kl": "tab:red",
                 "mix": "tab:purple", "slider": "black"}


def _axes(ax, figsize):
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def _as_list(values) -> list[float]:
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
    fig, ax = _axes(ax, figsize)
    edges, counts = _as_list(hist[0]), _as_list(hist[1])
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
    fig, ax = _axes(ax, figsize)
    xs = _as_list(x)
    for i, (label, ys) in enumerate(series.items()):
        ys = _as_list(ys)
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
    fig, ax = _axes(ax, figsize)
    labels, vals = [str(v) for v in labels], _as_list(values)
    if len(labels) != len(vals):
        raise ValueError(f"{len(labels)} labels for {len(vals)} values")
    colors = [METHOD_COLORS.get(lab, f"C{i % 10}") for i, lab in enumerate(labels)]
    bars = ax.bar(labels, vals, color=colors, yerr=None if errors is None else _as_list(errors), capsize=3)
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
    fig, ax = _axes(ax, figsize)
    labels = [str(v) for v in labels]
    n = max(1, len(groups))
    width = 0.8 / n
    allv = []
    for g, (name, values) in enumerate(groups.items()):
        vals = _as_list(values)
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
        ps, th = list(res["percentiles"]), _as_list(res["thresholds"])
        shown = {f"p={p:g}": th[ps.index(p)] for p in show_percentiles if p in ps}
        plot_histogram_with_clips(res["hist"], shown, title=res.get("title", name), ax=axes[r, 0],
                                  colors={k: f"C{i + 1}" for i, k in enumerate(shown)})
        xs, labels = _nines_positions(ps)
        ax = axes[r, 1]
        for i, (bits, cur) in enumerate(res["by_bits"].items()):
            ax.plot(xs, _as_list(cur["sqnr_db"]), marker="o", markersize=3, color=f"C{i}", label=f"{bits}-bit, all")
            ax.plot(xs, _as_list(cur["bulk_sqnr_db"]), linestyle="--", color=f"C{i}", label=f"{bits}-bit, bulk")
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


# -- tables -------------------------------------------------------------------------------------------
def _columns(rows: Sequence[Mapping], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def _cell(v, floatfmt: str) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else floatfmt.format(v)
    return "" if v is None else str(v)


def format_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, floatfmt: str = "{:.4g}") -> str:
    """Aligned plain-text table of ``rows`` (numbers right-aligned); missing cells are empty."""
    cols = _columns(rows, columns)
    cells = [[_cell(r.get(c), floatfmt) for c in cols] for r in rows]
    width = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    numeric = [all(is_number(r.get(c)) for r in rows if r.get(c) is not None) for c in cols]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, width, numeric)).rstrip()

    return "\n".join([line(cols), line(["-" * w for w in width])] + [line(row) for row in cells])


def html_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, floatfmt: str = "{:.4g}",
               caption: str = "") -> str:
    """HTML ``<table>`` of ``rows`` (escape-safe), for ``IPython.display.HTML``."""
    cols = _columns(rows, columns)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c), floatfmt))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f'<table class="calibkit-table">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def write_csv(path: str | Path, rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as CSV (header = columns; floats at full precision); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = _columns(rows, columns)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r.get(c) is None else repr(r[c]) if isinstance(r.get(c), float) else r[c] for c in cols])
    return path


# -- notebooks 02 and 04: min_max sweep, steps curve, method table, ranks, tuning path ----------------
# (rows / summaries from calibkit.tutorial.experiments; accuracies are fractions and are drawn in %)
def _grid(n_rows: int, n_cols: int, figsize, sharey: bool = True):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(n_rows, n_cols, figsize=figsize, squeeze=False, sharey=sharey)
    return fig, axes


def plot_minmax_sweep(rows: Sequence[Mapping], x: str = "averaging_constant", figsize=None):
    """``min_max`` sweep (``calibkit.tutorial.experiments.sweep_min_max`` rows): validation accuracy (%) against
    ``x`` (``"averaging_constant"`` or ``"batch_size"``, log axis), one panel per (activation bits,
    steps), one line per value of the other parameter. Returns the ``Figure``."""
    if x not in ("averaging_constant", "batch_size"):
        raise ValueError(f"x={x!r} is unknown: use 'averaging_constant' or 'batch_size'")
    if not rows:
        raise ValueError("rows is empty: nothing to plot")
    other = "batch_size" if x == "averaging_constant" else "averaging_constant"
    bits = sorted({r["activation_bits"] for r in rows}, reverse=True)
    steps = sorted({r["steps"] for r in rows})
    fig, axes = _grid(len(bits), len(steps), figsize or (3.4 * len(steps), 2.7 * len(bits)), sharey=False)
    for i, b in enumerate(bits):
        for j, s in enumerate(steps):
            ax = axes[i][j]
            sel = [r for r in rows if r["activation_bits"] == b and r["steps"] == s]
            for k, v in enumerate(sorted({r[other] for r in sel})):
                line = sorted((r[x], 100 * r["accuracy"]) for r in sel if r[other] == v)
                ax.plot([p[0] for p in line], [p[1] for p in line], marker="o", markersize=4, color=f"C{k}",
                        label=f"{'batch' if other == 'batch_size' else 'c'}={v:g}")
            ax.set_xscale("log")
            xs = sorted({r[x] for r in sel})
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{v:g}" for v in xs], fontsize=8)
            ax.minorticks_off()
            ax.set_title(f"{b}-bit activations, {s} steps", fontsize=9)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("accuracy (%)")
            if i == len(bits) - 1:
                ax.set_xlabel("averaging constant c" if x == "averaging_constant" else "batch size")
            if i == 0 and j == len(steps) - 1:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_steps_curve(rows: Sequence[Mapping], float_accuracy: float | None = None, ax=None, figsize=(6.5, 3.5)):
    """Accuracy (%) against the number of calibration steps (``calibkit.tutorial.experiments.steps_curve`` rows,
    log-2 axis), one line per (activation bits, seed); ``float_accuracy`` drawn as a dashed line."""
    fig, ax = _axes(ax, figsize)
    keys = sorted({(r["activation_bits"], r["seed"]) for r in rows}, key=lambda k: (-k[0], k[1]))
    for i, (b, seed) in enumerate(keys):
        line = sorted((r["steps"], 100 * r["accuracy"]) for r in rows if (r["activation_bits"], r["seed"]) == (b, seed))
        ax.plot([p[0] for p in line], [p[1] for p in line], marker="o", markersize=4, color=f"C{i}",
                label=f"{b}-bit act., seed {seed}")
    if float_accuracy is not None:
        ax.axhline(100 * float_accuracy, color="black", linestyle="--", linewidth=1, label="float")
    steps = sorted({r["steps"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps)
    ax.set_xticklabels([str(s) for s in steps])
    ax.minorticks_off()
    ax.set_xlabel("calibration steps (batches)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_accuracy_by_setting(rows: Sequence[Mapping], ax=None, figsize=(8, 3.5)):
    """Grouped bars: mean accuracy (%) over seeds per setting (groups) and method (bars), with the
    seed-to-seed range as error bars (``calibkit.tutorial.experiments.compare_methods`` rows)."""
    fig, ax = _axes(ax, figsize)
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        means, errs = [], [[], []]
        for s in settings:
            acc = [100 * r["accuracy"] for r in rows if r["method"] == m and r["setting"] == s]
            mu = sum(acc) / len(acc)
            means.append(mu)
            errs[0].append(mu - min(acc))
            errs[1].append(max(acc) - mu)
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(settings))]
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=m, color=METHOD_COLORS.get(m, f"C{k}"))
    lo = min(100 * r["accuracy"] for r in rows)
    hi = max(100 * r["accuracy"] for r in rows)
    ax.set_ylim(max(0.0, lo - 0.15 * (hi - lo) - 1), min(100.0, hi + 0.1 * (hi - lo) + 1))
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels(settings)
    ax.set_ylabel("accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(methods))
    return fig


def plot_method_summary(summary: Mapping[str, Mapping], figsize=(11, 3.2)):
    """The method table as three bar panels (``calibkit.tutorial.experiments.method_summary``): calibration time
    (s), mean accuracy (%) and ease-of-use range (accuracy points), each with its noise as an error bar
    and the kit's rank written on the bar."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=figsize)
    methods = list(summary)
    panels = [("speed_seconds", "speed_noise", "rank_speed", 1, "calibration time (s)", "speed: lower is better"),
              ("accuracy", "accuracy_noise", "rank_accuracy", 100, "accuracy (%)", "accuracy: higher is better"),
              ("ease_range", "ease_noise", "rank_ease", 100, "max - min accuracy (points)", "ease: lower is better")]
    for ax, (key, noise, rk, mult, ylabel, title) in zip(axes, panels):
        vals = [mult * summary[m][key] for m in methods]
        errs = [mult * summary[m][noise] for m in methods]
        bars = ax.bar(methods, vals, yerr=errs, capsize=3,
                      color=[METHOD_COLORS.get(m, f"C{i}") for i, m in enumerate(methods)])
        for b, m, v in zip(bars, methods, vals):
            ax.annotate(f"#{summary[m][rk]:g}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        if key == "accuracy":
            lo, hi = min(vals), max(vals)
            ax.set_ylim(max(0.0, lo - 0.5 * (hi - lo) - 1), min(100.0, hi + 0.3 * (hi - lo) + 0.5))
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_rank_comparison(summary: Mapping[str, Mapping], spec: Mapping[str, Mapping[str, int]] | None = None,
                         spearman: Mapping[str, float | None] | None = None, figsize=(11, 3.2)):
    """Kit ranks next to the spec's, one panel per column (speed, accuracy, ease): a filled marker for the
    kit, an open one for the spec, joined by a line when they differ; rank 1 at the top. ``spearman``
    (column -> rho) goes into the panel titles."""
    import matplotlib.pyplot as plt

    if spec is None:
        from calibkit.tutorial.experiments import SPEC_RANKS as spec
    fig, axes = plt.subplots(1, 3, figsize=figsize, sharey=True)
    methods = list(summary)
    for ax, col in zip(axes, ("speed", "accuracy", "ease")):
        for i, m in enumerate(methods):
            kit, ref = summary[m][f"rank_{col}"], spec[col].get(m)
            color = METHOD_COLORS.get(m, f"C{i}")
            if ref is not None:
                ax.plot([i, i], [kit, ref], color=color, linewidth=1, alpha=0.6)
                ax.scatter([i], [ref], s=70, facecolors="none", edgecolors=color, linewidths=1.5)
            ax.scatter([i], [kit], s=40, color=color)
        rho = (spearman or {}).get(col)
        ax.set_title(f"{col}" + (f" (Spearman {rho:+.2f})" if rho is not None else ""), fontsize=9)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, fontsize=8)
        ax.set_xlim(-0.5, len(methods) - 0.5)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(len(methods) + 0.5, 0.5)
    axes[0].set_ylabel("rank (1 = best)")
    axes[0].scatter([], [], s=40, color="black", label="kit (measured)")
    axes[0].scatter([], [], s=70, facecolors="none", edgecolors="black", linewidths=1.5, label="spec")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def plot_tuning_path(rows: Sequence[Mapping], figsize=(8, 4.8)):
    """The percentile tuning path (``calibkit.tutorial.experiments.tune_percentile`` rows): top, accuracy (%) of
    every evaluated point (accepted: filled, rejected: crosses) with the running best; bottom, the
    percentile tried (as number of nines, left axis) and the bins (right axis, log 2)."""
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("rows is empty: nothing to plot")
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=figsize, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    steps = [r["step"] for r in rows]
    ax.plot(steps, [100 * r["best_accuracy"] for r in rows], color="tab:green", drawstyle="steps-post",
            linewidth=1.5, label="best so far")
    acc = [r for r in rows if r["accepted"]]
    rej = [r for r in rows if not r["accepted"]]
    ax.scatter([r["step"] for r in acc], [100 * r["accuracy"] for r in acc], color="tab:green", zorder=3, label="accepted")
    ax.scatter([r["step"] for r in rej], [100 * r["accuracy"] for r in rej], color="tab:gray", marker="x", zorder=3,
               label="rejected")
    for r in acc:
        ax.annotate(f"{r['percentile']:.6g}\n{r['bins']}", (r["step"], 100 * r["accuracy"]), fontsize=6,
                    textcoords="offset points", xytext=(0, 5), ha="center")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.2 * (hi - lo))  # room for the labels of the top points
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    nines = [-math.log10(1 - r["percentile"] / 100) if r["percentile"] < 100 else math.nan for r in rows]
    finite = [n for n in nines if math.isfinite(n)]
    top = (max(finite) if finite else 4.0) + 0.5  # percentile 100 (the max) drawn above every finite value
    ax2.plot(steps, [n if math.isfinite(n) else top for n in nines], marker="o", markersize=3, color="tab:blue")
    for s_, n in zip(steps, nines):
        if not math.isfinite(n):
            ax2.annotate("100", (s_, top), fontsize=7, textcoords="offset points", xytext=(0, 4), ha="center")
    ax2.set_ylabel("percentile (nines)", color="tab:blue")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    twin = ax2.twinx()
    twin.plot(steps, [r["bins"] for r in rows], drawstyle="steps-mid", color="tab:orange")
    twin.set_yscale("log", base=2)
    twin.set_ylabel("bins", color="tab:orange")
    fig.tight_layout()
    return fig


__all__ += ["plot_minmax_sweep", "plot_steps_curve", "plot_accuracy_by_setting", "plot_method_summary",
            "plot_rank_comparison", "plot_tuning_path"]
