"""``convert``: turn a calibrated prepared model into an integer reference model.

Representation:

* **activations** are integer codes ``q`` in ``[qmin, qmax]`` of their quantizer, stored as
  ``float64`` tensors holding exact integers (torch has no integer conv kernels; float64 holds every
  int32 accumulator exactly). A code tensor stands for ``q * s``, ``s`` the scale of the quantizer
  it came from. The model input is quantized by ``qops.input``; outputs are dequantized to float32.
* **weights** are ``int8`` codes (``int16`` above 8 bits) with a float32 scale per output channel
  (``weight_scale``, ``[C]``); **bias** is ``int32`` at the accumulator scale ``s_in * s_w[c]``.
* **conv / linear** accumulate ``acc = sum(q_in * q_w) + q_bias`` exactly in integers, then
  requantize with the per-channel multiplier ``M[c] = s_in * s_w[c] / s_out`` (float64 buffer
  ``multiplier``) and clamp to the output range (a fused ReLU / ReLU6 clamps at 0 / 6). By default
  ``M`` is applied as ``round((acc * (s_in * s_w[c])) / s_out)`` in float32, the very arithmetic of
  the fake-quant model, so the two agree bit for bit. ``M`` is also stored as fixed point,
  ``M ~= M0 * 2**-shift`` with ``M0`` in ``[2**30, 2**31)`` (``multiplier_m0``, ``multiplier_shift``);
  ``convert(..., fixed_point=True)`` requantizes integer-only, ``(acc*M0 + 2**(shift-1)) >> shift``
  (round half up), which can differ by one step at near-ties.
* **residual add / mul / concatenation** (``IntAdd``, ``IntMul``, ``IntCat``) combine code tensors with
  the multipliers ``s_a/s_out``, ``s_b/s_out`` (mul: ``s_a s_b/s_out``; cat: ``s_i/s_out``), evaluated
  in float32 like the fake-quant model.
* **shape-only ops** (max pooling, flatten, view, dropout, ...) act on the codes directly.
* every **other op** (average pooling, mean, sigmoid, hardswish, an unfolded BatchNorm, leaf
  modules, ...) runs in float between an explicit ``Dequantize`` and ``Quantize`` (float fallback).

Every integer op lives at ``qops.<quantizer name>`` with ``quantizer_name``, ``out_scale`` and
``bits``; its output is that quantizer's code tensor (``named_int_ops`` lists them in order).
With 8-bit tensors the converted model reproduces the VALIDATION-state model exactly as long as
float32 holds the accumulators exactly (|partial sums| < 2**24); beyond that (e.g. 16-bit tensors)
outputs agree within a quantization step per tensor at near-ties.
"""

from __future__ import annotations

import copy
import operator
from collections import OrderedDict
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from calibkit.errors import PrepareError
from calibkit.quant.fake_quantize import FakeQuantize
from calibkit.quant.prepare import QConv1d, QConv2d, QConv3d, QLinear, _is_add, _is_passthrough, _is_relu
from calibkit.quant.numerics import qrange, quantize

__all__ = ["convert", "named_int_ops", "fixed_point_multiplier", "requantize_fixed_point", "Quantize", "Dequantize",
           "IntConv", "IntLinear", "IntAdd", "IntMul", "IntCat"]


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


class _IntOp(nn.Module):
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


class Quantize(_IntOp):
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


class _WeightedIntOp(_IntOp):
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


class IntAdd(_IntOp):
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


class IntMul(_IntOp):
    """Product of two code tensors, ``q_out = round(q_a q_b * s_a s_b / s_out)`` (multiplier stored,
    evaluated in float32 as in the fake-quant model)."""

    def __init__(self, name, scale_a, scale_b, out_scale, bits):
        super().__init__(name, out_scale, bits)
        self.register_buffer("scale_a", scale_a.float().reshape(()).clone())
        self.register_buffer("scale_b", scale_b.float().reshape(()).clone())
        self.register_buffer("multiplier", self.scale_a.double() * self.scale_b.double() / self.out_scale.double())

    def forward(self, qa, qb):
        return self._output((qa.float() * self.scale_a) * (qb.float() * self.scale_b))


class IntCat(_IntOp):
    """Concatenation: every input requantized to ``s_out`` (``round(q_i s_i / s_out)``), joined along ``dim``."""

    def __init__(self, name, in_scales, out_scale, bits, dim):
        super().__init__(name, out_scale, bits)
        self.dim = dim
        self.register_buffer("in_scales", torch.stack([s.float().reshape(()) for s in in_scales]))
        self.register_buffer("multipliers", self.in_scales.double() / self.out_scale.double())

    def forward(self, *qs):
        return self._output(torch.cat([q.float() * s for q, s in zip(qs, self.in_scales)], dim=self.dim))


# -- graph conversion ----------------------------------------------------------------------------------
_MUL_FUNCS = {operator.mul, operator.imul, torch.mul}
_CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}
_INT_ROOTS = ("qops", "dequant")


_FLOAT_CLASS = {QConv1d: nn.Conv1d, QConv2d: nn.Conv2d, QConv3d: nn.Conv3d, QLinear: nn.Linear}


def _act(node, modules) -> str:
    """``"relu6"`` or ``"relu"`` for a fused activation node."""
    if node.op == "call_module":
        return "relu6" if isinstance(modules[node.target], nn.ReLU6) else "relu"
    return "relu6" if node.target is F.relu6 else "relu"


def named_int_ops(model: nn.Module) -> "OrderedDict[str, _IntOp]":
    """Integer ops of a converted model by quantizer name (their outputs are that quantizer's codes)."""
    out: OrderedDict[str, _IntOp] = OrderedDict()
    mods = dict(model.named_modules())
    targets = [n.target for n in model.graph.nodes if n.op == "call_module"] if isinstance(model, fx.GraphModule) else []
    for m in [mods[t] for t in targets] + [m for m in model.modules()]:  # execution order first
        if isinstance(m, _IntOp) and m.quantizer_name not in out:
            out[m.quantizer_name] = m
    return out


def convert(model: fx.GraphModule, fixed_point: bool = False) -> fx.GraphModule:
    """Integer reference model of a prepared, calibrated ``model`` (which is not modified).

    Uses the scales VALIDATION uses (fixed ones, else from the observers; ``CalibrationError`` names
    any quantizer without data). ``fixed_point=True``: conv / linear requantize with integer
    ``(M0, shift)`` arithmetic. Returns an ``fx.GraphModule`` in eval mode taking the same float
    inputs and returning float32 outputs (dequantized codes). See the module docstring.
    """
    if not isinstance(model, fx.GraphModule) or not any(isinstance(m, FakeQuantize) for m in model.modules()):
        raise TypeError("convert expects a model returned by calibkit.quant.prepare (an fx.GraphModule with FakeQuantize modules)")
    modules = dict(model.named_modules())
    for root in _INT_ROOTS:
        if root in modules:
            raise PrepareError(f"the model has a submodule named {root!r}, which convert needs for its own ops")
    graph = fx.Graph()
    root: dict[str, Any] = {}
    env: dict[fx.Node, fx.Node] = {}
    qinfo: dict[fx.Node, tuple[str, torch.Tensor]] = {}  # old node -> (quantizer name, scale) for code tensors
    deq_cache: dict[fx.Node, fx.Node] = {}

    def is_fq(n):
        return n.op == "call_module" and isinstance(modules[n.target], FakeQuantize)

    # chains absorbed into the quantizer that follows them: producer [+ fused relu] -> fq
    chains: dict[fx.Node, list[fx.Node]] = {}
    absorbed: set[fx.Node] = set()
    for n in model.graph.nodes:
        if not is_fq(n):
            continue
        x = n.args[0]
        chain = [x]
        if _is_relu(x, modules) and isinstance(x.args[0], fx.Node) and len(x.args[0].users) == 1:
            p = x.args[0]
            if isinstance(modules.get(p.target) if p.op == "call_module" else None, (QConv1d, QConv2d, QConv3d, QLinear)) or _is_add(p):
                chain = [p, x]
        chains[n] = chain
        absorbed.update(c for c in chain if c.op != "placeholder")

    def add_module(target: str, mod: nn.Module) -> str:
        root[target] = mod
        return target

    def copy_module(target: str) -> str:
        if target not in root:
            mod = modules[target]
            if isinstance(mod, (QConv1d, QConv2d, QConv3d, QLinear)):  # float fallback: frozen fake-quantized weights
                plain = copy.deepcopy(mod)
                del plain.weight_fake_quant
                plain.__class__ = _FLOAT_CLASS[type(mod)]
                plain.weight = nn.Parameter(_fq_weight(mod), requires_grad=False)
                root[target] = plain
            else:
                root[target] = copy.deepcopy(mod)
        return target

    def codes(n: fx.Node) -> fx.Node:
        return env[n]

    def floaty(n: Any) -> Any:
        """Mapped argument for a consumer that needs real values: code tensors get dequantized."""
        if not isinstance(n, fx.Node):
            return n
        if n not in qinfo:
            return env[n]
        if n not in deq_cache:
            name, scale = qinfo[n]
            target = f"dequant.{name}"
            if target not in root:
                add_module(target, Dequantize(scale))
            deq_cache[n] = graph.call_module(target, (env[n],))
        return deq_cache[n]

    def copy_node(n: fx.Node, mapper) -> fx.Node:
        if n.op == "call_module":
            copy_module(n.target)
        elif n.op == "get_attr":
            root[n.target] = copy.deepcopy(_get_attr(model, n.target))
        return graph.node_copy(n, mapper)

    for n in model.graph.nodes:
        if n in absorbed:
            continue
        if n.op == "placeholder":
            env[n] = graph.node_copy(n)
        elif n.op == "output":
            graph.output(fx.node.map_arg(n.args[0], floaty))
        elif is_fq(n):
            fq: FakeQuantize = modules[n.target]
            env[n] = _emit(n, fq, chains[n], modules, model, graph, env, qinfo, codes, floaty, copy_node, add_module, fixed_point)
            qinfo[n] = (fq.quantizer_name or n.target, fq.validation_scale().detach().float().reshape(()))
        elif _is_passthrough(n, modules) and any(isinstance(a, fx.Node) and a in qinfo for a in n.all_input_nodes):
            src = next(a for a in n.all_input_nodes if a in qinfo)
            env[n] = copy_node(n, lambda a: env[a])
            if n.meta.get("calibkit_float", True):
                qinfo[n] = qinfo[src]
        else:
            env[n] = copy_node(n, floaty)
    graph.lint()
    gm = fx.GraphModule(root, graph, f"{type(model).__name__}Int")
    gm.meta["calibkit_converted"] = True
    return gm.eval()


def _get_attr(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fq_weight(mod: nn.Module) -> torch.Tensor:
    wfq = mod.weight_fake_quant
    from calibkit.quant.numerics import quantize_dequantize
    return quantize_dequantize(mod.weight.detach(), wfq.validation_scale(), wfq.bits, wfq.ch_axis)


def _emit(fq_node, fq: FakeQuantize, chain, modules, model, graph, env, qinfo, codes, floaty, copy_node, add_module,
          fixed_point) -> fx.Node:
    """New-graph node producing the codes of quantizer ``fq`` from its absorbed ``chain``."""
    name = fq.quantizer_name or fq_node.target
    target = f"qops.{name}"
    s_out = fq.validation_scale().detach().float().reshape(())
    if fq.ch_axis is not None:
        raise PrepareError(f"activation quantizer {name!r} is per-channel; convert supports per-tensor activations")
    bits = fq.bits
    p = chain[0]
    relu = len(chain) == 2
    act = _act(chain[1], modules) if relu else None

    def scale(n):
        return qinfo[n][1]

    pmod = modules.get(p.target) if p.op == "call_module" else None
    if isinstance(pmod, (QConv1d, QConv2d, QConv3d, QLinear)) and len(p.args) == 1 and not p.kwargs and p.args[0] in qinfo:
        cls = IntLinear if isinstance(pmod, QLinear) else IntConv
        op = cls(name, pmod, scale(p.args[0]), s_out, bits, act=act, fixed_point=fixed_point)
        return graph.call_module(add_module(target, op), (codes(p.args[0]),))
    if _is_add(p) and all(isinstance(a, fx.Node) and a in qinfo for a in p.args):
        op = IntAdd(name, scale(p.args[0]), scale(p.args[1]), s_out, bits, act=act)
        return graph.call_module(add_module(target, op), (codes(p.args[0]), codes(p.args[1])))
    if not relu and p.op != "placeholder":
        if ((p.op == "call_function" and p.target in _MUL_FUNCS) or (p.op == "call_method" and p.target == "mul")) \
                and len(p.args) == 2 and not p.kwargs and all(isinstance(a, fx.Node) and a in qinfo for a in p.args):
            op = IntMul(name, scale(p.args[0]), scale(p.args[1]), s_out, bits)
            return graph.call_module(add_module(target, op), (codes(p.args[0]), codes(p.args[1])))
        if p.op == "call_function" and p.target in _CAT_FUNCS and isinstance(p.args[0], (list, tuple)) \
                and all(isinstance(a, fx.Node) and a in qinfo for a in p.args[0]):
            dim = p.args[1] if len(p.args) > 1 else p.kwargs.get("dim", 0)
            if isinstance(dim, int):
                op = IntCat(name, [scale(a) for a in p.args[0]], s_out, bits, dim)
                return graph.call_module(add_module(target, op), tuple(codes(a) for a in p.args[0]))
    # float fallback: dequantize -> float op(s) -> quantize
    if p.op == "placeholder":
        x = env[p]
    else:
        x = None
        for c in chain:
            x = copy_node(c, lambda a, prev=x, c=c: prev if (a is chain[0] and c is not chain[0]) else floaty(a))
    return graph.call_module(add_module(target, Quantize(name, s_out, bits)), (x,))
