"""The integer ops of a converted model: quantize / dequantize, integer conv and linear with requantization
(float32 or fixed point), and the code-tensor add, mul and concatenation. See :mod:`calibkit.quant.convert`
for the representation they share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calibkit.errors import PrepareError
from calibkit.quant.fake_quantize import FakeQuantize
from calibkit.quant.numerics import qrange, quantize

__all__ = ["fixed_point_multiplier", "requantize_fixed_point", "IntOp", "Quantize", "Dequantize", "IntConv",
           "IntLinear", "IntAdd", "IntMul", "IntCat"]


# -- fixed point ---------------------------------------------------------------------------------------
def fixed_point_multiplier(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positive multipliers ``m`` into ``(M0, shift)`` (int64) with ``m ~= M0 * 2**-shift``,
    ``2**30 <= M0 < 2**31`` (relative error < 2**-31). Raises ``ValueError`` when a shift would fall
    outside ``[1, 62]`` (multiplier >= 2**30 or < 2**-31)."""
    m = torch.as_tensor(m, dtype=torch.float64)
    if not bool((m > 0).all()) or not bool(torch.isfinite(m).all()):
        raise ValueError("multipliers must be finite and > 0")
    mant, exp = torch.frexp(m)  # m = mant * 2**exp, mant in [0.5, 1)
    m0 = torch.round(mant * 2.0**31).to(torch.int64)
    carry = m0 == 2**31
    m0 = torch.where(carry, m0 // 2, m0)
    shift = 31 - (exp.to(torch.int64) + carry.to(torch.int64))
    if bool((shift < 1).any()) or bool((shift > 62).any()):
        raise ValueError(f"multiplier range [{float(m.min()):.3g}, {float(m.max()):.3g}] is out of range for a "
                         "fixed-point shift in [1, 62]: use a value in [2**-31, 2**30)")
    return m0, shift


def requantize_fixed_point(acc: torch.Tensor, m0: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Integer-only ``round(acc * M0 * 2**-shift)`` (round half up): ``(acc*M0 + 2**(shift-1)) >> shift``.

    ``acc``: int64 accumulator with ``|acc| < 2**32`` (else ``OverflowError``); ``m0``, ``shift``:
    int64, broadcastable to ``acc``. Returns int64.
    """
    if acc.numel() and int(acc.abs().max()) >= 2**32:
        raise OverflowError(f"accumulator magnitude {int(acc.abs().max())} >= 2**32 overflows the int64 "
                            "fixed-point product: use convert(..., fixed_point=False)")
    return torch.bitwise_right_shift(acc * m0 + torch.bitwise_left_shift(torch.ones_like(shift), shift - 1), shift)


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape([1, -1] + [1] * (ndim - 2)) if t.dim() else t


class IntOp(nn.Module):
    """Output side shared by every integer op: ``out_scale`` (float32 ``[]``), ``bits``, the fused
    activation (``"relu"``, ``"relu6"`` or ``None``) and its integer clamp range ``[lo, hi]``."""

    def __init__(self, name: str, out_scale: torch.Tensor, bits: int, act: str | None = None):
        super().__init__()
        self.quantizer_name, self.bits, self.act = name, bits, act
        self.register_buffer("out_scale", out_scale.detach().float().reshape(()).clone())
        self.qmin, self.qmax = qrange(bits)
        self.lo, self.hi = (0 if act else self.qmin), self.qmax
        if act == "relu6":
            self.hi = min(self.qmax, int(torch.round(torch.tensor(6.0) / self.out_scale.cpu())))

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        """Codes of a float32 value ``y`` (before the fused activation): the fake quantizer's arithmetic."""
        if self.act == "relu":
            y = F.relu(y)
        elif self.act == "relu6":
            y = F.relu6(y)
        return torch.round(y / self.out_scale).clamp_(self.qmin, self.qmax).double()

    def extra_repr(self) -> str:
        return (f"name={self.quantizer_name!r}, bits={self.bits}, out_scale={float(self.out_scale):.6g}, "
                f"act={self.act}, clamp=[{self.lo}, {self.hi}]")


class Quantize(IntOp):
    """float -> codes: ``clamp(round(x / s), qmin, qmax)`` (float32 arithmetic, like the fake quantizer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize(x.float(), self.out_scale, self.bits).double()


class Dequantize(nn.Module):
    """codes -> float32 ``q * s``."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().float().clone())

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return q.float() * self.scale


class _WeightedIntOp(IntOp):
    """Integer conv / linear: ``acc = sum(q_in * q_w) + q_bias`` (exact), then requantization.

    Requantization applies ``M[c] = s_in * s_w[c] / s_out`` as ``round((acc * (s_in * s_w[c])) / s_out)``
    in float32 -- the two roundings the fake-quant model performs, so VALIDATION is reproduced bit for
    bit -- or, with ``fixed_point=True``, as the integer ``(acc * M0[c] + 2**(shift[c]-1)) >> shift[c]``
    followed by the clamp ``[lo, hi]`` of the fused activation.
    """

    def __init__(self, name, mod: nn.Module, in_scale, out_scale, bits, act, fixed_point):
        super().__init__(name, out_scale, bits, act)
        wfq: FakeQuantize = mod.weight_fake_quant
        if wfq.ch_axis not in (None, 0):
            raise PrepareError(f"{name}: weights quantized along ch_axis={wfq.ch_axis} cannot be requantized per output channel")
        c = mod.weight.shape[0]
        w_scale = wfq.validation_scale().detach().float()
        codes = quantize(mod.weight.detach().float(), w_scale, wfq.bits, 0 if w_scale.dim() else None)
        w_scale = w_scale.expand(c).clone() if w_scale.dim() == 0 else w_scale.clone()
        self.register_buffer("weight", codes.to(torch.int8 if wfq.bits <= 8 else torch.int16))
        self.register_buffer("weight_scale", w_scale)
        self.register_buffer("in_scale", in_scale.detach().float().reshape(()).clone())
        acc_scale = self.in_scale * w_scale  # float32 scale of the int32 accumulator, [C] (as the fake path)
        bias = torch.zeros(c, device=codes.device) if mod.bias is None else mod.bias.detach().float()
        qbias = torch.round(bias / acc_scale)
        if bool((qbias.abs() > 2**31 - 1).any()):
            raise PrepareError(f"{name}: the bias does not fit int32 at scale s_in*s_w (max |bias/scale| = "
                               f"{float((bias / acc_scale).abs().max()):.3g})")
        self.register_buffer("bias", qbias.to(torch.int32))
        self.register_buffer("acc_scale", acc_scale)
        self.register_buffer("multiplier", self.in_scale.double() * w_scale.double() / self.out_scale.double())
        m0, shift = fixed_point_multiplier(self.multiplier.cpu())
        self.register_buffer("multiplier_m0", m0.to(codes.device))
        self.register_buffer("multiplier_shift", shift.to(codes.device))
        self.fixed_point = fixed_point

    def _accumulate(self, q: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _view(self, t: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        return _channel_view(t, acc.dim())

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        acc = torch.round(self._accumulate(q.double()))  # exact integer sums (round: any kernel's float error)
        acc = acc + self._view(self.bias.double(), acc)
        if self.fixed_point:
            out = requantize_fixed_point(acc.to(torch.int64), self._view(self.multiplier_m0, acc),
                                         self._view(self.multiplier_shift, acc))
            return out.clamp_(self.lo, self.hi).double()
        return self._output(acc.float() * self._view(self.acc_scale, acc))


class IntConv(_WeightedIntOp):
    """Integer conv (1/2/3-d) + int32 bias + requantization (+ fused ReLU / ReLU6)."""

    def __init__(self, name, mod, in_scale, out_scale, bits, act=None, fixed_point=False):
        super().__init__(name, mod, in_scale, out_scale, bits, act, fixed_point)
        self.dims = mod.weight.dim() - 2
        self.stride, self.padding, self.dilation, self.groups = mod.stride, mod.padding, mod.dilation, mod.groups
        self.padding_mode = mod.padding_mode
        self.pad_twice = getattr(mod, "_reversed_padding_repeated_twice", None)

    def _accumulate(self, q):
        padding = self.padding
        if self.padding_mode != "zeros":
            q, padding = F.pad(q, self.pad_twice, mode=self.padding_mode), 0
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        return conv(q, self.weight.double(), None, self.stride, padding, self.dilation, self.groups)


class IntLinear(_WeightedIntOp):
    """Integer linear + int32 bias + requantization (+ fused ReLU / ReLU6); channels on the last axis."""

    def __init__(self, name, mod, in_scale, out_scale, bits, act=None, fixed_point=False):
        super().__init__(name, mod, in_scale, out_scale, bits, act, fixed_point)

    def _accumulate(self, q):
        return F.linear(q, self.weight.double())

    def _view(self, t, acc):
        return t


class IntAdd(IntOp):
    """Residual add of two code tensors, ``q_out = round((q_a s_a + q_b s_b) / s_out)`` (+ fused ReLU);
    the multipliers ``s_a/s_out``, ``s_b/s_out`` are stored, the sum is evaluated in float32 as in the
    fake-quant model."""

    def __init__(self, name, scale_a, scale_b, out_scale, bits, act=None):
        super().__init__(name, out_scale, bits, act)
        self.register_buffer("scale_a", scale_a.float().reshape(()).clone())
        self.register_buffer("scale_b", scale_b.float().reshape(()).clone())
        self.register_buffer("multiplier_a", self.scale_a.double() / self.out_scale.double())
        self.register_buffer("multiplier_b", self.scale_b.double() / self.out_scale.double())

    def forward(self, qa, qb):
        return self._output(qa.float() * self.scale_a + qb.float() * self.scale_b)


class IntMul(IntOp):
    """Product of two code tensors, ``q_out = round(q_a q_b * s_a s_b / s_out)`` (multiplier stored,
    evaluated in float32 as in the fake-quant model)."""

    def __init__(self, name, scale_a, scale_b, out_scale, bits):
        super().__init__(name, out_scale, bits)
        self.register_buffer("scale_a", scale_a.float().reshape(()).clone())
        self.register_buffer("scale_b", scale_b.float().reshape(()).clone())
        self.register_buffer("multiplier", self.scale_a.double() * self.scale_b.double() / self.out_scale.double())

    def forward(self, qa, qb):
        return self._output((qa.float() * self.scale_a) * (qb.float() * self.scale_b))


class IntCat(IntOp):
    """Concatenation: every input requantized to ``s_out`` (``round(q_i s_i / s_out)``), joined along ``dim``."""

    def __init__(self, name, in_scales, out_scale, bits, dim):
        super().__init__(name, out_scale, bits)
        self.dim = dim
        self.register_buffer("in_scales", torch.stack([s.float().reshape(()) for s in in_scales]))
        self.register_buffer("multipliers", self.in_scales.double() / self.out_scale.double())

    def forward(self, *qs):
        return self._output(torch.cat([q.float() * s for q, s in zip(qs, self.in_scales)], dim=self.dim))
