"""The in-memory dataset: uint8 images and int64 labels of a train and a test split, with seeded subsets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibkit.checks import check_int



# ----------------------------------------------------------------------------------------------------
# the dataset container


@dataclass(repr=False)
class ImageTensors:
    """An image-classification dataset held as tensors.

    Attributes:
        train_images, test_images: ``torch.uint8 [N, 3, H, W]`` RGB, values 0..255.
        train_labels, test_labels: ``torch.int64 [N]``, values in ``[0, len(classes))``.
        classes: class names; label ``i`` is ``classes[i]``.
        source: where the data came from, e.g. ``"image-folder:/data/cifar10-jpeg"`` or
            ``"torchvision:/data/cifar-10-batches-py"`` (a subset appends ``" subset(...)"``).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    source: str = ""

    def __post_init__(self):
        self.classes = list(self.classes)
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
                raise TypeError(f"{split}_images must be torch.uint8 [N, 3, H, W], got {x.dtype} {list(x.shape)}")
            if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
                raise TypeError(f"{split}_labels must be torch.int64 [{len(x)}], got {y.dtype} {list(y.shape)}")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
                raise ValueError(f"{split}_labels must lie in [0, {len(self.classes)}) (len(classes)), "
                                 f"got [{int(y.min())}, {int(y.max())}]")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(3, H, W)`` of every image."""
        return tuple(self.train_images.shape[1:])

    def __repr__(self):
        return (f"{type(self).__name__}(train={len(self.train_labels)}, test={len(self.test_labels)}, "
                f"image_shape={list(self.image_shape)}, classes={len(self.classes)}, source={self.source!r})")

    def to(self, device) -> "ImageTensors":
        """A copy with all tensors on ``device`` (tensors already there are shared, not copied)."""
        return ImageTensors(self.train_images.to(device), self.train_labels.to(device), self.test_images.to(device),
                            self.test_labels.to(device), list(self.classes), self.source)

    def subset(self, train: int | None = None, test: int | None = None, seed: int = 0,
               stratified: bool = True) -> "ImageTensors":
        """A smaller dataset for smoke runs: ``train`` / ``test`` images drawn without replacement.

        Args:
            train, test: number of images to keep per split (``None`` keeps the whole split).
            seed: random seed; the same seed always picks the same images.
            stratified: ``True`` (default) balances classes (per-class counts differ by at most one
                where the split allows it); ``False`` draws uniformly at random.

        Kept images stay in their original order.
        """
        check_int("seed", seed)
        g = torch.Generator().manual_seed(seed)
        parts = {}
        for split, n in (("train", train), ("test", test)):
            x, y = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if n is None:
                parts[split] = (x, y)
                continue
            check_int(split, n, 0)
            if n > len(y):
                raise ValueError(f"{split}={n} is out of range: the {split} split has {len(y)} images, "
                                 f"use a value in [0, {len(y)}]")
            idx = _stratified_pick(y.cpu(), n, g) if stratified else torch.randperm(len(y), generator=g)[:n]
            idx = idx.sort().values.to(y.device)
            parts[split] = (x[idx], y[idx])
        tag = f"subset(train={train}, test={test}, seed={seed}{'' if stratified else ', stratified=False'})"
        return ImageTensors(*parts["train"], *parts["test"], list(self.classes), f"{self.source} {tag}".strip())


CifarTensors = ImageTensors  # the name used by the CIFAR-10 API contract


def balanced_subset(images: torch.Tensor, labels: torch.Tensor, n: int | None, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` of ``(images, labels)`` drawn without replacement with balanced class counts (they differ by at most
    one where the labels allow it), kept in their original order; ``None`` keeps them all.

    Use it instead of slicing ``images[:n]``: an image-folder split is sorted by class, so its first ``n`` images
    may hold one or two classes only.
    """
    if len(images) != len(labels):
        raise ValueError(f"images has {len(images)} entries and labels {len(labels)}: they must match")
    if n is None:
        return images, labels
    check_int("n", n, 0)
    check_int("seed", seed)
    if n > len(labels):
        raise ValueError(f"n={n} is out of range: there are {len(labels)} images, use a value in [0, {len(labels)}]")
    idx = _stratified_pick(labels.cpu(), n, torch.Generator().manual_seed(seed)).sort().values.to(labels.device)
    return images[idx.to(images.device)], labels[idx]


def _stratified_pick(labels: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """Indices of ``n`` labels, classes taken round-robin in a random order (balanced counts)."""
    perm = torch.randperm(len(labels), generator=g)
    lab = labels[perm]
    # rank of each shuffled element within its class: 0 for the first of that class, 1 for the next, ...
    order = torch.argsort(lab, stable=True)
    sorted_lab = lab[order]
    starts = torch.searchsorted(sorted_lab, sorted_lab, right=False)
    rank = torch.empty_like(lab)
    rank[order] = torch.arange(len(lab)) - starts
    key = rank * len(lab) + torch.arange(len(lab))  # by rank, ties broken by shuffled position
    return perm[torch.argsort(key)[:n]]
