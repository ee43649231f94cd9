"""The conv and linear modules ``prepare`` swaps in: their weight passes through a fake-quantizer, and while
fake quantization is on they follow the integer model's arithmetic (see ``_QuantWeightMixin``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QConv1d", "QConv2d", "QConv3d", "QLinear", "QUANT_CLASS", "WEIGHTED"]


def _ste_round(t: torch.Tensor) -> torch.Tensor:
    """``round(t)`` in value (exactly), identity for the gradient (plain ``round`` when no gradient is needed)."""
    if not (t.requires_grad and torch.is_grad_enabled()):
        return torch.round(t)
    return t + (torch.round(t) - t).detach()


class _QuantWeightMixin:
    """Conv / linear whose weight passes through ``self.weight_fake_quant``.

    While both the weight quantizer and the quantizer of the input (``_input_quantizer``, linked by
    ``prepare``) fake-quantize, the op follows the integer model (``calibkit.quant.convert``):

    * the bias is rounded to the int32 grid of the accumulator, ``s_in * s_w[c]``;
    * in eval mode (VALIDATION) the op runs on the integer codes, ``(conv(q_x, q_w) + q_bias) * s_in * s_w``,
      with the integer accumulator rounded (exact below 2**24 whatever algorithm the conv kernel uses),
      so the converted model reproduces it bit for bit. In train mode (QAT) it computes
      ``conv(x_hat, w_hat) + bias`` in float. Gradients are straight-through in both.
    """

    def _weighted_forward(self, x: torch.Tensor, op, channel_view) -> torch.Tensor:
        wfq, fq_in = self.weight_fake_quant, self.__dict__.get("_input_quantizer")
        w = wfq(self.weight)
        if fq_in is None or fq_in.ch_axis is not None or not (wfq.fake_quantizing and fq_in.fake_quantizing):
            return op(x, w, self.bias)
        acc_scale = fq_in.scale * wfq.scale  # [C] or []
        qb = None if self.bias is None else _ste_round(self.bias / acc_scale)
        if self.training or wfq.ch_axis not in (None, 0):
            return op(x, w, None if qb is None else qb * acc_scale)
        qw = _ste_round(w / (wfq.scale.reshape([-1] + [1] * (w.dim() - 1)) if wfq.scale.dim() else wfq.scale))
        # the sum of integer products is an integer: rounding it cancels any float error of the kernel
        # (Winograd / FFT / TF32 algorithms) as long as that error stays below 0.5
        acc = _ste_round(op(_ste_round(x / fq_in.scale), qw, None))
        if qb is not None:
            acc = acc + channel_view(qb, acc)
        return acc * channel_view(acc_scale, acc)


def _conv_channels(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape([1, -1] + [1] * (like.dim() - 2)) if t.dim() else t


class _QuantConvMixin(_QuantWeightMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._weighted_forward(x, self._conv_forward, _conv_channels)


class QConv1d(_QuantConvMixin, nn.Conv1d):
    pass


class QConv2d(_QuantConvMixin, nn.Conv2d):
    pass


class QConv3d(_QuantConvMixin, nn.Conv3d):
    pass


class QLinear(_QuantWeightMixin, nn.Linear):
    """Linear with fake-quantized weight (see ``_QuantWeightMixin``); output channels on the last axis."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._weighted_forward(x, F.linear, lambda t, like: t)


QUANT_CLASS = {nn.Conv1d: QConv1d, nn.Conv2d: QConv2d, nn.Conv3d: QConv3d, nn.Linear: QLinear}
WEIGHTED = tuple(QUANT_CLASS.values())
