"""Quantization arithmetic shared by observers, fake-quantizers and the integer reference model.

Scheme (``docs/methods.md#quantization-scheme``): signed, symmetric, scale only (zero point 0).

* ``qmin, qmax = -2**(bits-1), 2**(bits-1) - 1``  (int8: -128, 127)
* ``scale = amax / ((qmax - qmin) / 2)``           (int8: amax / 127.5)
* ``q = clamp(round(x / scale), qmin, qmax)``; ``x_hat = q * scale``

Rounding is **round half to even** (``torch.round``; the same rule as ``torch.fake_quantize_*``
and IEEE ``nearbyint``). Scales are float32 tensors: shape ``[]`` per tensor, ``[C]`` per channel.
"""

from __future__ import annotations

import torch

MIN_BITS, MAX_BITS = 2, 16
#: Smallest scale ever returned, so that a constant or all-zero tensor still yields a valid,
#: strictly positive scale instead of a division by zero.
MIN_SCALE = float(torch.finfo(torch.float32).tiny) * 2**10


def check_bits(bits: int, name: str = "bits") -> int:
    """Validate a bit width; returns it as ``int``. Allowed range: integers 2..16."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not (MIN_BITS <= bits <= MAX_BITS):
        raise ValueError(f"{name}={bits!r} is not supported: use an integer bit width in [{MIN_BITS}, {MAX_BITS}]")
    return bits


def qrange(bits: int = 8) -> tuple[int, int]:
    """Signed integer range for ``bits``: ``(-2**(bits-1), 2**(bits-1) - 1)``."""
    check_bits(bits)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def scale_from_amax(amax: torch.Tensor | float, bits: int = 8) -> torch.Tensor:
    """Symmetric scale for a clipping threshold ``amax`` (>= 0): ``amax / ((qmax - qmin) / 2)``.

    Returns float32 with the shape of ``amax``; values are at least ``MIN_SCALE``.
    """
    qmin, qmax = qrange(bits)
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return (amax / ((qmax - qmin) / 2)).clamp_min(MIN_SCALE)


def _broadcast_scale(scale: torch.Tensor, x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    scale = scale.to(device=x.device, dtype=x.dtype)
    if ch_axis is None or scale.dim() == 0:
        return scale
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return scale.reshape(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, bits: int = 8, ch_axis: int | None = None) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale), qmin, qmax)`` (same dtype as ``x``, integer-valued)."""
    qmin, qmax = qrange(bits)
    return torch.round(x / _broadcast_scale(scale, x, ch_axis)).clamp_(qmin, qmax)


def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, bits: int = 8, ch_axis: int | None = None) -> torch.Tensor:
    """Round-clamp-rescale without a gradient path (for error measurements)."""
    return quantize(x, scale, bits, ch_axis) * _broadcast_scale(scale, x, ch_axis)


class _FakeQuantSTE(torch.autograd.Function):
    """Fake quantization with a straight-through gradient: d out / d x = 1 inside the clipping
    range ``[qmin*scale, qmax*scale]`` and 0 outside (values that were clipped get no gradient)."""

    @staticmethod
    def forward(ctx, x, scale, bits, ch_axis):  # noqa: D401
        qmin, qmax = qrange(bits)
        s = _broadcast_scale(scale, x, ch_axis)
        q = torch.round(x / s)
        ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return q.clamp_(qmin, qmax) * s

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int = 8, ch_axis: int | None = None) -> torch.Tensor:
    """Differentiable round-clamp-rescale (straight-through estimator); see ``_FakeQuantSTE``.

    Without a gradient to track (``no_grad`` or inputs that do not require one) it takes a fused,
    in-place fast path with identical values.
    """
    if not (torch.is_grad_enabled() and (x.requires_grad or (isinstance(scale, torch.Tensor) and scale.requires_grad))):
        qmin, qmax = qrange(bits)
        s = _broadcast_scale(scale, x, ch_axis)
        return torch.div(x, s).round_().clamp_(qmin, qmax).mul_(s)
    return _FakeQuantSTE.apply(x, scale, bits, ch_axis)


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum x^2 / sum (x - x_hat)^2)``.

    Returns ``inf`` when the reconstruction is exact. Computed in float64.
    """
    x = x.detach().double()
    noise = (x - x_hat.detach().double()).pow(2).sum()
    signal = x.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
