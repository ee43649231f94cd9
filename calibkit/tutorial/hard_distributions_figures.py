"""Figures of notebook 05's hard-distribution checks (:mod:`calibkit.tutorial.hard_distributions`): the activation
range and the quantization drop against the weight decay, and the LayerNorm output's clip, SQNR and accuracy along
the small and the larger percentile steps. This module only draws the rows those functions return."""

from __future__ import annotations

from typing import Sequence

__all__ = ["plot_weight_decay", "plot_layernorm_steps"]


def _mean_by(rows, group, key):
    out: dict = {}
    for r in rows:
        out.setdefault(r[group], []).append(r[key])
    return {g: sum(v) / len(v) for g, v in out.items()}


def plot_weight_decay(rows: Sequence[dict], axes=None):
    """Two panels over the weight decays (mean over training seeds): the median spread ``max|x| / std`` of the
    activations, and the drop float -> quantized at 8 bits and at the lower width, in points."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    decays = sorted({r["weight_decay"] for r in rows})
    x = list(range(len(decays)))
    spread = _mean_by(rows, "weight_decay", "spread_median")
    axes[0].bar(x, [spread[d] for d in decays], color="tab:gray")
    axes[0].set_ylabel("median max|x| / std")
    axes[0].set_title("activation range (calibration batches)")
    for key, label in (("drop_8", "8-bit"), ("drop_low", f"{rows[0]['low_bits']}-bit activations")):
        drop = _mean_by(rows, "weight_decay", key)
        axes[1].plot(x, [100 * drop[d] for d in decays], "o-", label=label)
    axes[1].set_ylabel("float - quantized (points)")
    axes[1].set_title("quantization drop")
    axes[1].legend()
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels([f"{d:g}" for d in decays])
        ax.set_xlabel("weight decay")
    return axes


def plot_layernorm_steps(rows: Sequence[dict], axes=None):
    """Three panels (first calibration seed) against the step number along each path: the clip, the LayerNorm
    output's isolated SQNR and the accuracy; the kit's alternatives as horizontal lines in the accuracy panel."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    seed = rows[0]["seed"]
    rows = [r for r in rows if r["seed"] == seed]
    for path, marker in (("small", "o-"), ("large", "s-")):
        pts = [r for r in rows if r["path"] == path]
        label = f"{path} steps: " + " → ".join(f"{r['percentile']:g}" for r in pts)
        for ax, key, scale in zip(axes, ("clip", "sqnr_db", "accuracy"), (1, 1, 100)):
            ax.plot(range(len(pts)), [scale * r[key] for r in pts], marker, label=label)
    for r, style in zip([r for r in rows if r["path"] == "alternative"], ("--", ":")):
        axes[2].axhline(100 * r["accuracy"], ls=style, color="k", lw=1, label=r["setting"])
    for ax, title in zip(axes, ("clip of the LayerNorm output", "isolated SQNR (dB)", "accuracy (%)")):
        ax.set_title(title)
        ax.set_xlabel("step along the path")
        ax.set_xticks(range(max(len([r for r in rows if r["path"] == p]) for p in ("small", "large"))))
    axes[2].legend(fontsize=7)
    return axes
