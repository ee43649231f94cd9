"""Matplotlib figures for the float-training notebook. Every function returns a ``matplotlib.figure.Figure``
(built without pyplot, so nothing is shown or kept open implicitly; display it or ``fig.savefig(path)``)."""

import torch
from matplotlib.figure import Figure

from calibkit.checks import check_int

__all__ = ["sample_grid", "training_curves", "per_class_bar", "confusion_matrix_plot"]


def sample_grid(images: torch.Tensor, labels: torch.Tensor, classes, per_class: int = 8, seed: int = 0) -> Figure:
    """A grid of ``per_class`` (>= 1) random images for each class (one row per class) from uint8 ``images [N, 3, H, W]``."""
    check_int("per_class", per_class, 1)
    g = torch.Generator().manual_seed(seed)
    fig = Figure(figsize=(per_class * 0.9 + 1.2, len(classes) * 0.9))
    axes = fig.subplots(len(classes), per_class, squeeze=False)
    for c, name in enumerate(classes):
        idx = (labels.cpu() == c).nonzero().flatten()
        pick = idx[torch.randperm(len(idx), generator=g)[:per_class]]
        for j in range(per_class):
            ax = axes[c, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(pick):
                ax.imshow(images[pick[j]].cpu().permute(1, 2, 0).numpy())
            if j == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.subplots_adjust(wspace=0.05, hspace=0.05, left=0.15, right=0.99, top=0.99, bottom=0.01)
    return fig


def training_curves(history: dict) -> Figure:
    """Train loss (left) and train / test accuracy (right) per epoch from a ``calibkit.cifar.train.train`` history
    (``epoch`` may be missing: epochs are then numbered 1, 2, ...)."""
    ep = history.get("epoch") or list(range(1, len(history["train_loss"]) + 1))
    fig = Figure(figsize=(10, 3.6))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(ep, history["train_loss"], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss (label-smoothed CE)", title="loss")
    ax_acc.plot(ep, [100 * a for a in history["train_accuracy"]], marker="o", label="train (augmented batches)")
    test = [(e, 100 * a) for e, a in zip(ep, history["test_accuracy"]) if a is not None]
    if test:
        ax_acc.plot(*zip(*test), marker="s", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def per_class_bar(acc: torch.Tensor, classes) -> Figure:
    """Horizontal bars of per-class accuracy (``acc`` in [0, 1], one value per class), in percent."""
    fig = Figure(figsize=(6, 0.35 * len(classes) + 1))
    ax = fig.subplots()
    vals = [100 * float(a) for a in acc]
    ax.barh(range(len(classes)), vals)
    ax.set_yticks(range(len(classes)), classes)
    ax.invert_yaxis()
    for i, v in enumerate(vals):
        ax.text(v + 0.5, i, f"{v:.1f}", va="center", fontsize=8)
    ax.set(xlim=(0, 105), xlabel="test accuracy (%)", title="per-class accuracy")
    fig.tight_layout()
    return fig


def confusion_matrix_plot(confusion: torch.Tensor, classes, normalize: bool = True) -> Figure:
    """Heat map of a confusion matrix (rows = true class, columns = predicted); ``normalize`` shows row percentages."""
    cm = confusion.double()
    if normalize:
        cm = 100 * cm / cm.sum(1, keepdim=True).clamp_min(1)
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    im = ax.imshow(cm.numpy(), cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix" + (" (% of true class)" if normalize else ""))
    hi = float(cm.max())
    for i in range(len(classes)):
        for j in range(len(classes)):
            v = float(cm[i, j])
            ax.text(j, i, f"{v:.0f}" if normalize else f"{int(v)}", ha="center", va="center", fontsize=7,
                    color="white" if v > 0.5 * hi else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig
