"""The numbers of one per-op error row: streaming SQNR / cosine / relative L2 of a reconstruction against its
float reference, and the clipping threshold a quantizer's scale stands for (``docs/methods.md#per-op-error``)."""

from __future__ import annotations

import math

import torch

from calibkit.quant.fake_quantize import FakeQuantize
from calibkit.quant.numerics import qrange

__all__ = ["ErrorStats", "clip_threshold", "clip_count"]


class ErrorStats:
    """Streaming sums for SQNR / cosine / relative L2 of ``x_hat`` against reference ``x`` (float32 dot
    products per batch, summed in Python floats)."""

    def __init__(self):
        self.ref2 = self.err2 = self.hat2 = self.dot = 0.0
        self.n = 0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x, x_hat = x.detach().float().flatten(), x_hat.detach().float().flatten()
        d = x - x_hat
        self.ref2 += float(torch.dot(x, x))
        self.err2 += float(torch.dot(d, d))
        self.hat2 += float(torch.dot(x_hat, x_hat))
        self.dot += float(torch.dot(x, x_hat))
        self.n += x.numel()

    def sqnr_db(self) -> float:
        """``10 log10(sum x^2 / sum (x - x_hat)^2)``; ``inf`` if exact, ``-inf`` for a zero reference."""
        if self.err2 == 0:
            return math.inf
        if self.ref2 == 0:
            return -math.inf
        return 10 * math.log10(self.ref2 / self.err2)

    def cosine(self) -> float:
        den = math.sqrt(self.ref2 * self.hat2)
        if den == 0:
            return 1.0 if self.ref2 == self.hat2 else 0.0
        return self.dot / den

    def rel_l2(self) -> float:
        """``||x - x_hat|| / ||x||``."""
        if self.ref2 == 0:
            return 0.0 if self.err2 == 0 else math.inf
        return math.sqrt(self.err2 / self.ref2)


def _scale_view(scale: torch.Tensor, x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    if scale.dim() == 0 or ch_axis is None:
        return scale.to(x.device)
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return scale.to(x.device).reshape(shape)


def clip_threshold(fq: FakeQuantize) -> torch.Tensor:
    """``amax = scale * (qmax - qmin) / 2``, the threshold the scale stands for (``[]`` or ``[C]``)."""
    qmin, qmax = qrange(fq.bits)
    return fq.scale * ((qmax - qmin) / 2)


def clip_count(x: torch.Tensor, fq: FakeQuantize) -> int:
    """How many values of ``x`` lie beyond ``fq``'s clipping threshold (per channel for per-channel scales)."""
    return int((x.abs() > _scale_view(clip_threshold(fq), x, fq.ch_axis)).sum())
