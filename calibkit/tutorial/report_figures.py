"""Figures of notebook 05: the worst quantizers' SQNR as bars, the float distribution one quantizer sees with its
clipping threshold, and accuracy against the number of ops overridden. The numbers come from
:mod:`calibkit.analysis`; this module only draws them."""

from __future__ import annotations

from calibkit.analysis.report import DebugReport
from calibkit.checks import check_int

__all__ = ["plot_report", "plot_op_histogram", "plot_overrides_sweep"]

#: Exact (``inf`` dB) rows are drawn at this SQNR.
SQNR_CAP_DB = 80.0


def plot_report(report: DebugReport, top: int = 15, sort_by: str | None = None, ax=None):
    """Horizontal bar chart of accumulated and isolated SQNR (dB) for the ``top`` worst quantizers."""
    import matplotlib.pyplot as plt

    rows = report.sorted(sort_by)[:check_int("top", top, 1)]
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    y = list(range(len(rows)))
    acc = [min(o.accumulated_sqnr_db, SQNR_CAP_DB) for o in rows]
    iso = [min(o.isolated_sqnr_db, SQNR_CAP_DB) for o in rows]
    ax.barh([v - 0.2 for v in y], acc, height=0.4, label="accumulated (whole model quantized)", color="tab:red")
    ax.barh([v + 0.2 for v in y], iso, height=0.4, label="isolated (this quantizer only)", color="tab:blue")
    ax.set_yticks(y)
    ax.set_yticklabels([o.name for o in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR (dB, higher is better)")
    ax.set_title(f"worst {len(rows)} quantizers by {sort_by or report.sort_by}")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return ax


def plot_op_histogram(hist: dict, ax=None, log: bool = True):
    """Draw the output of :func:`calibkit.analysis.report.op_histogram` with the clipping threshold(s) marked."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    e = hist["edges"]
    ax.stairs(hist["counts"].double().clamp_min(0.5 if log else 0).numpy(), e.numpy(), fill=True, alpha=0.6)
    for c in (hist["clip"], -hist["clip"]):
        if e[0] <= c <= e[-1]:
            ax.axvline(c, color="tab:red", ls="--", lw=1)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("value")
    ax.set_ylabel("count")
    ax.set_title(f"{hist['name']}: {hist['numel']} values, clip ±{hist['clip']:.4g} ({hist['bits']} bits)", fontsize=9)
    return ax


def plot_overrides_sweep(sweep, float_accuracy: float, global_accuracy: float, global_label: str, ax=None):
    """Accuracy (%) against the number of worst ops overridden, ``sweep`` = ``[(ops, accuracy), ...]`` with
    accuracies in [0, 1], next to the float model and to the same override given to every activation."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    ks = [k for k, _ in sweep]
    ax.plot(ks, [100 * a for _, a in sweep], "o-", label="worst k ops overridden")
    ax.axhline(100 * float_accuracy, color="k", ls=":", label="float")
    ax.axhline(100 * global_accuracy, color="tab:green", ls="--", label=global_label)
    ax.set_xticks(ks)
    ax.set_xlabel("ops overridden (worst first)")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax
