"""Figures of notebook 03's guide checks (:mod:`calibkit.tutorial.method_knobs`)."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt

from calibkit.tutorial.figures import plot_bars, plot_curves, plot_grouped_bars

__all__ = ["plot_long_tail", "plot_knob"]


def plot_long_tail(rows: Sequence[Mapping], float_accuracy: float | None = None):
    """Accuracy (left) and the layer's SQNR (right) per variant, one bar group per bit width."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    bits = sorted({r["bits"] for r in rows}, reverse=True)
    by = {(r["bits"], r["variant"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.3))
    plot_grouped_bars(variants, {f"{b}-bit": [100 * by[b, v]["accuracy"] for v in variants] for b in bits},
                      ylabel="accuracy (%)", title="accuracy (mean over calibration seeds)", ax=axes[0],
                      annotate="{:.1f}", reference=None if float_accuracy is None else ("float", 100 * float_accuracy))
    plot_grouped_bars(variants, {f"{b}-bit": [by[b, v]["layer_sqnr_db"] for v in variants] for b in bits},
                      ylabel="SQNR (dB)", title=f"SQNR of {rows[0]['layer']} (unseen images)", ax=axes[1],
                      annotate="{:.1f}", ylim_from_data=False)
    fig.tight_layout()
    return fig


def plot_knob(rows: Sequence[Mapping], key: str, title: str):
    """Observer time, the part of a calibration ``key`` changes (median, error bar = half the spread over the
    passes; the whole calibration's median in the title), and accuracy against ``key``."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    labels = [str(r[key]) for r in rows]
    whole = ", ".join(f"{r['calib_seconds']:.2f}" for r in rows)
    plot_bars(labels, [r["observer_seconds"] for r in rows], ylabel="seconds", ax=axes[0], annotate="{:.3f}",
              errors=[r["observer_seconds_spread"] / 2 for r in rows],
              title=f"{title}: time in the observers (whole calibration: {whole} s)")
    axes[0].set_xlabel(key)
    plot_curves(range(len(rows)), {f"{rows[0]['bits']}-bit": [100 * r["accuracy"] for r in rows]}, xlabel=key,
                ylabel="accuracy (%)", title=f"{title}: accuracy (mean over seeds)", ax=axes[1], xticklabels=labels)
    fig.tight_layout()
    return fig
