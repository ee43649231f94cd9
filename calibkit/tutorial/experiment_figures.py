"""Figures of the experiments' rows: the ``min_max`` sweep and steps curve (notebook 02), accuracy per setting, the
method table, its ranks next to the documented ones and the percentile tuning path (notebook 04).

Accuracies in the rows are fractions and are drawn in %. Every function returns the matplotlib ``Figure``.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from calibkit.tutorial.comparison import SPEC_RANKS
from calibkit.tutorial.figures import METHOD_COLORS, axes_of

__all__ = ["plot_minmax_sweep", "plot_steps_curve", "plot_accuracy_by_setting", "plot_method_summary",
           "plot_rank_comparison", "plot_tuning_path"]


def _grid(n_rows: int, n_cols: int, figsize, sharey: bool = True):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(n_rows, n_cols, figsize=figsize, squeeze=False, sharey=sharey)
    return fig, axes


def plot_minmax_sweep(rows: Sequence[Mapping], x: str = "averaging_constant", figsize=None):
    """``min_max`` sweep (``calibkit.tutorial.workflow.sweep_min_max`` rows): validation accuracy (%) against
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
    """Accuracy (%) against the number of calibration steps (``calibkit.tutorial.workflow.steps_curve`` rows,
    log-2 axis), one line per (activation bits, seed); ``float_accuracy`` drawn as a dashed line."""
    fig, ax = axes_of(ax, figsize)
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
    seed-to-seed range as error bars (``calibkit.tutorial.comparison.compare_methods`` rows)."""
    fig, ax = axes_of(ax, figsize)
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
    """The method table as three bar panels (``calibkit.tutorial.comparison.method_summary``): calibration time
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

    spec = SPEC_RANKS if spec is None else spec
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
    """The percentile tuning path (``calibkit.tutorial.tuning.tune_percentile`` rows): top, accuracy (%) of
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
