"""Figure of notebook 08: accuracy, time per batch and file size of every (model, runtime) row as bars. Like every
figure of the tutorial, it returns the ``Figure`` and neither shows nor saves it."""

from __future__ import annotations

from typing import Mapping, Sequence

__all__ = ["plot_deployment"]

RUNTIME_COLORS = {"PyTorch": "tab:gray", "ORT float32": "tab:blue", "fake-quant (PyTorch)": "tab:orange",
                  "ORT int8": "tab:green"}


def plot_deployment(rows: Sequence[Mapping], batch: int):
    """Three panels over the rows of ``calibkit.tutorial.deploy.result_rows``: accuracy (%), milliseconds per batch of
    ``batch`` images (log scale) and ONNX file size (KiB); colour: the runtime."""
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['runtime']}" for r in rows]
    colors = [RUNTIME_COLORS.get(r["runtime"], "tab:purple") for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = (("accuracy %", "validation accuracy (%)", False), ("ms/batch", f"ms per batch of {batch}", True),
              ("file KiB", "ONNX file size (KiB)", False))
    for ax, (key, title, log) in zip(axes, panels):
        values = [r[key] for r in rows]
        ax.bar(range(len(rows)), values, color=colors)
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        if key == "accuracy %":
            ax.set_ylim(max(0.0, min(values) - 10), min(100.0, max(values) + 5))
    fig.tight_layout()
    return fig
