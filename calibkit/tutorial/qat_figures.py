"""Figures of notebook 06: the curves of the QAT runs (validation accuracy, training loss, how far the activation
scales moved) and the guide-check grid (fixed / free scales from every start, per bit width and seed). Like every figure of the tutorial, it returns the ``Figure`` and neither shows nor saves it."""

from __future__ import annotations

from typing import Mapping

__all__ = ["plot_qat_curves", "plot_qat_grid"]

START_COLORS = {"well": "tab:blue", "poor": "tab:red", "uncalibrated": "tab:gray"}


def _moving_average(values, window: int) -> list[float]:
    """Mean over each run of ``window`` consecutive values (``len(values) - window + 1`` of them)."""
    import torch

    loss = torch.tensor(values, dtype=torch.float64)
    if len(loss) < window:
        return loss.tolist()
    return torch.nn.functional.avg_pool1d(loss[None, None], window, stride=1)[0, 0].tolist()


def plot_qat_curves(runs: Mapping[str, Mapping], float_accuracy: float | None = None):
    """Three panels over the epochs of every run in ``runs`` (``{"<start>_<fixed|free>": train_qat history}``):
    validation accuracy (%), the training loss smoothed over 1/25 of the steps, and the mean relative change of
    the activation scales since the start (%). Solid lines: fixed scales; dashed: free; colour: the start."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key, h in runs.items():
        start, mode = key.split("_")
        style = dict(color=START_COLORS.get(start), ls="-" if mode == "fixed" else "--",
                     label=f"{start} start, {mode} scales")
        epochs_at = [s * h["batch_size"] / h["train_images"] for s in h["eval_step"]]
        axes[0].plot(epochs_at, [100 * a for a in h["val_accuracy"]], marker="o", ms=3, **style)
        window = max(1, len(h["train_loss"]) // 25)
        smooth = _moving_average(h["train_loss"], window)
        axes[1].plot(h["epoch"][len(h["epoch"]) - len(smooth):], smooth, **style)
        axes[2].plot(epochs_at, [100 * c for c in h["act_scale_change"]], marker="o", ms=3, **style)
    if float_accuracy is not None:
        axes[0].axhline(100 * float_accuracy, color="k", ls=":", label="float")
    axes[0].set(xlabel="epoch", ylabel="accuracy on the slider subset (%)", title="validation accuracy during QAT")
    axes[1].set(xlabel="epoch", ylabel="training loss (moving average)", title="training loss")
    axes[2].set(xlabel="epoch", ylabel="mean |s / s0 - 1| (%)", title="activation scales moved")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_qat_grid(rows, float_accuracy: float | None = None):
    """One panel per activation bit width of the guide-check rows (:func:`calibkit.tutorial.qat_rules.fixed_free_rows`
    and ``uncalibrated_rows``): for every start and mode, the QAT accuracy of each seed (dots) and their mean (bar),
    with the start's PTQ accuracy before QAT (black dash). Colour: the start; hatched bars: free scales."""
    import matplotlib.pyplot as plt

    bits = sorted({r["bits"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(bits), figsize=(6 * len(bits), 4), squeeze=False)
    for ax, b in zip(axes[0], bits):
        here = [r for r in rows if r["bits"] == b]
        groups = list(dict.fromkeys((r["start"], r["mode"]) for r in here))
        for x, (start, mode) in enumerate(groups):
            g = [r for r in here if (r["start"], r["mode"]) == (start, mode)]
            accs = [100 * r["qat"] for r in g]
            ax.bar(x, sum(accs) / len(accs), color=START_COLORS.get(start), alpha=0.5,
                   hatch="//" if mode == "free" else None, edgecolor="k")
            ax.plot([x] * len(accs), accs, "o", color="k", ms=4)
            ax.plot([x - 0.4, x + 0.4], [100 * sum(r["ptq"] for r in g) / len(g)] * 2, color="k", lw=2)
        if float_accuracy is not None:
            ax.axhline(100 * float_accuracy, color="k", ls=":", label="float")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xticks(range(len(groups)), [f"{s}\n{m}" for s, m in groups], fontsize=8)
        accs = [100 * v for r in here for v in (r["qat"], r["ptq"])]
        ax.set_ylim(max(0.0, min(accs) - 5), max(accs + ([100 * float_accuracy] if float_accuracy else [])) + 2)
        ax.set(ylabel="accuracy (%)", title=f"{b}-bit activations: after QAT (bars, dots: seeds), before (dash)")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig
