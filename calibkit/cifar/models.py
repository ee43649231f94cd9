"""A small CIFAR-10 ResNet built only from ops that an int8 deployment can fuse and quantize.

Layout (airbench-like, widths ``w = (w1, w2, w3)``, input ``[N, 3, 32, 32]`` normalized float):

    stem    conv 2x2 (no padding) → BN → ReLU                        [N, s,  31, 31]
    stage1  conv 3x3 → BN → ReLU → MaxPool 2 → residual             [N, w1, 15, 15]
    stage2  conv 3x3 → BN → ReLU → MaxPool 2 → residual             [N, w2,  7,  7]
    stage3  conv 3x3 → BN → ReLU → MaxPool 2 → residual             [N, w3,  3,  3]
    head    AdaptiveMaxPool2d(1) → flatten → Linear(w3, num_classes) [N, num_classes]

where ``residual`` is ``relu(x + BN(conv3x3(x)))``. Every conv is directly followed by its BN
(so eval-mode conv-BN folding removes all BNs), every activation is a plain ``nn.ReLU`` module,
there is no data-dependent control flow (the model is ``torch.fx``-traceable), and there is no
scale multiply on the logits.
"""

from collections import OrderedDict

import torch
import torch.fx
from torch import nn

from calibkit.checks import check_int, check_number

__all__ = ["ConvBN", "Residual", "Stage", "CifarResNet", "cifar_resnet", "build_model", "fusion_groups", "op_summary", "whiten_stem_",
           "ARCHITECTURES"]


class ConvBN(nn.Sequential):
    """``conv → BN`` (→ ``ReLU`` if ``relu``); the conv has no bias since BN follows it.

    Children are named ``conv``, ``bn`` and ``relu`` so fusion lists read naturally.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, padding: int = 1, relu: bool = True):
        layers = [("conv", nn.Conv2d(c_in, c_out, kernel_size, padding=padding, bias=False)), ("bn", nn.BatchNorm2d(c_out))]
        if relu:
            layers.append(("relu", nn.ReLU()))
        super().__init__(OrderedDict(layers))


class Residual(nn.Module):
    """``relu(x + BN(conv3x3(x)))``; shape-preserving ``[N, C, H, W] → [N, C, H, W]``."""

    def __init__(self, width: int):
        super().__init__()
        self.body = ConvBN(width, width, relu=False)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(x + self.body(x))


class Stage(nn.Module):
    """``conv-BN-ReLU (c_in → c_out) → MaxPool 2x2 → blocks × Residual``; halves H and W (floor).

    ``pool_first`` (default False; ``calibkit.cifar.train.train`` switches it on while it trains): in training mode,
    run ``conv → MaxPool → BN → ReLU`` instead, so BN and ReLU (forward and backward) touch 4x fewer elements.
    BN then normalizes with the statistics of the pooled map. In eval mode the order is always
    ``conv → BN → ReLU → MaxPool``, which is what fusion, calibration and conversion see; for a BN with a
    positive weight (a per-channel increasing map) both orders give the same output, because max-pooling
    commutes with increasing per-channel functions.
    """

    def __init__(self, c_in: int, c_out: int, blocks: int = 1):
        super().__init__()
        self.conv = ConvBN(c_in, c_out)
        self.pool = nn.MaxPool2d(2)
        self.residual = nn.Sequential(*[Residual(c_out) for _ in range(blocks)])
        self.pool_first = False

    def forward(self, x):
        if self.training and self.pool_first:
            c = self.conv
            x = c.relu(c.bn(self.pool(c.conv(x))))
        else:
            x = self.pool(self.conv(x))
        return self.residual(x)


class CifarResNet(nn.Module):
    """The CIFAR ResNet described in the module docstring.

    Args:
        width: channels of the three stages, each >= 1.
        num_classes: number of logits, >= 2.
        stem_width: channels of the 2x2 stem conv; ``None`` uses 24 (twice the 12 dims of a 2x2 RGB patch,
            see ``whiten_stem_``).
        blocks: residual blocks after the pool of each stage, each >= 0.
    Input: normalized float ``[N, 3, 32, 32]`` (other sizes >= 16 px also work). Output: logits ``[N, num_classes]``.
    """

    arch_name = "cifar_resnet"  # key in ARCHITECTURES, used by calibkit.cifar.checkpoint

    def __init__(self, width=(64, 128, 128), num_classes: int = 10, stem_width: int | None = None, blocks=(1, 1, 1)):
        super().__init__()
        width = tuple(int(w) for w in width)
        if len(width) != 3 or min(width) < 1:
            raise ValueError(f"width={width} is invalid: use three positive channel counts, e.g. (64, 128, 128)")
        blocks = tuple(int(b) for b in blocks)
        if len(blocks) != 3 or min(blocks) < 0:
            raise ValueError(f"blocks={blocks} is invalid: use three residual-block counts >= 0, e.g. (1, 1, 1)")
        num_classes = check_int("num_classes", num_classes, 2)
        stem_width = 24 if stem_width is None else check_int("stem_width", stem_width, 1, why=" (or None for 24)")
        self.config = {"width": list(width), "num_classes": int(num_classes), "stem_width": stem_width, "blocks": list(blocks)}
        self.stem = ConvBN(3, stem_width, kernel_size=2, padding=0)
        self.stage1 = Stage(stem_width, width[0], blocks[0])
        self.stage2 = Stage(width[0], width[1], blocks[1])
        self.stage3 = Stage(width[1], width[2], blocks[2])
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width[2], num_classes)
        self.reset_parameters()

    def reset_parameters(self):
        """Kaiming-normal convs (fan-in, ReLU gain), BN at identity; residual-branch BN starts at 0.5
        so that each block is near identity plus a small correction at initialization."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=m.in_features ** -0.5)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Residual):
                nn.init.constant_(m.body.bn.weight, 0.5)

    def forward(self, x):
        x = self.stem(x)
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(self.flatten(self.pool(x)))


def cifar_resnet(width=(64, 128, 128), num_classes: int = 10, stem_width: int | None = None, blocks=(1, 1, 1)) -> CifarResNet:
    """Build the CIFAR ResNet (see ``CifarResNet``); seed with ``torch.manual_seed`` first for a reproducible init."""
    return CifarResNet(width=width, num_classes=num_classes, stem_width=stem_width, blocks=blocks)


ARCHITECTURES = {"cifar_resnet": cifar_resnet}


@torch.no_grad()
def whiten_stem_(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> nn.Conv2d:
    """Initialize ``conv`` (in place) as a patch-whitening filter bank computed from ``images``.

    The covariance of all ``kh x kw`` patches of ``images`` (normalized float ``[N, C, H, W]``) is
    eigendecomposed; output channel ``2i`` gets eigenvector ``i`` (largest eigenvalue first) divided by
    ``sqrt(eigenvalue + eps)`` and channel ``2i + 1`` its negative, so that a following ReLU keeps both
    signs. Channels beyond ``2 * C * kh * kw`` keep their current weights. Returns ``conv``.
    """
    if images.ndim != 4 or images.shape[1] != conv.in_channels or not images.is_floating_point():
        raise ValueError(f"images must be float [N, {conv.in_channels}, H, W]; got {images.dtype} {tuple(images.shape)}")
    check_number("eps", eps, 0, low_open=True)
    kh, kw = conv.kernel_size
    patches = torch.nn.functional.unfold(images.double(), (kh, kw)).transpose(1, 2).reshape(-1, conv.in_channels * kh * kw)
    patches = patches - patches.mean(0)
    eigval, eigvec = torch.linalg.eigh(patches.T @ patches / len(patches))
    order = eigval.argsort(descending=True)
    filters = (eigvec[:, order] / (eigval[order] + eps).sqrt()).T  # [dims, C*kh*kw], strongest first
    pairs = torch.stack([filters, -filters], 1).reshape(-1, filters.shape[1])[: conv.out_channels]
    conv.weight[: len(pairs)] = pairs.reshape(-1, conv.in_channels, kh, kw).to(conv.weight)
    return conv


def build_model(arch: str, **kwargs) -> nn.Module:
    """Rebuild a model from its architecture name (a key of ``ARCHITECTURES``) and constructor kwargs."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is unknown: use one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**kwargs)


def op_summary(model: nn.Module) -> dict[str, int]:
    """How many times each op kind appears in ``model``'s ``torch.fx`` graph: module class names for
    module calls (``Conv2d``, ``ReLU``, ...), function names for functions (``add``, ...). Tracing errors
    propagate (a model calibkit's ``prepare`` cannot handle fails here too)."""
    graph = torch.fx.symbolic_trace(model).graph
    kinds: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            kind = type(model.get_submodule(node.target)).__name__
        elif node.op in ("call_function", "call_method"):
            kind = getattr(node.target, "__name__", str(node.target))
        else:
            continue
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def fusion_groups(model: nn.Module) -> list[list[str]]:
    """Qualified names of every ``[conv, bn]`` / ``[conv, bn, relu]`` group in ``model``, ready for
    ``torch.ao.quantization.fuse_modules(model.eval(), fusion_groups(model))``."""
    groups = []
    for name, m in model.named_modules():
        if isinstance(m, ConvBN):
            groups.append([f"{name}.{child}" for child, _ in m.named_children()])
    return groups
