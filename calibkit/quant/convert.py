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
* every **other op** (average pooling, mean, sigmoid, hardswish, GELU, LayerNorm, softmax, attention, an unfolded
  BatchNorm, leaf modules and modules kept by ``KEEP_FLOAT``, ...) runs in float between an explicit
  ``Dequantize`` and ``Quantize`` (float fallback). The converted model lists them in ``float_ops``
  (``{quantizer name: op}``, e.g. ``{"encoder.ln.out": "LayerNorm"}``), and ``convert`` warns
  (``FloatOpsWarning``) with the list, leaving out average pooling and means (which every integer runtime
  computes on codes with a rescale). The fake-quant model is unchanged by this: it computes those ops in float
  too, on dequantized inputs, and quantizes their outputs.

Every integer op lives at ``qops.<quantizer name>`` with ``quantizer_name``, ``out_scale`` and
``bits``; its output is that quantizer's code tensor (``named_int_ops`` lists them in order).
With 8-bit tensors the converted model reproduces the VALIDATION-state model exactly as long as
float32 holds the accumulators exactly (|partial sums| < 2**24); beyond that (e.g. 16-bit tensors)
outputs agree within a quantization step per tensor at near-ties.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections import OrderedDict
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from calibkit.errors import PrepareError
from calibkit.quant.fake_quantize import FakeQuantize
from calibkit.quant.graph_ops import is_add, is_passthrough, is_relu, module_of
from calibkit.quant.int_ops import (Dequantize, IntAdd, IntCat, IntConv, IntLinear, IntMul, IntOp, Quantize,
                                    fixed_point_multiplier, requantize_fixed_point)
from calibkit.quant.numerics import quantize_dequantize
from calibkit.quant.qmodules import WEIGHTED, QConv1d, QConv2d, QConv3d, QLinear

__all__ = ["convert", "named_int_ops", "FloatOpsWarning",
           "fixed_point_multiplier", "requantize_fixed_point", "Quantize", "Dequantize",
           "IntConv", "IntLinear", "IntAdd", "IntMul", "IntCat"]


# -- graph conversion ----------------------------------------------------------------------------------
_MUL_FUNCS = {operator.mul, operator.imul, torch.mul}
_CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}
_INT_ROOTS = ("qops", "dequant")


#: Float-fallback ops ``convert`` lists in ``float_ops`` without warning about them.
_QUIET_FLOAT_OPS = {"AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
                    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                    "adaptive_avg_pool3d", "mean"}


class FloatOpsWarning(UserWarning):
    """``convert`` kept ops in float (no integer kernel for them): see ``converted.float_ops``."""


def _op_label(node: fx.Node, modules) -> str:
    """What a node computes, for messages: the module type, function or method name."""
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    src = node.args[0] if node.args else None
    if node.target is operator.getitem and isinstance(src, fx.Node) and src.op == "call_module":
        return f"{type(modules[src.target]).__name__}[{node.args[1]}]"  # e.g. MultiheadAttention[0]
    return getattr(node.target, "__name__", str(node.target))


_FLOAT_CLASS = {QConv1d: nn.Conv1d, QConv2d: nn.Conv2d, QConv3d: nn.Conv3d, QLinear: nn.Linear}


def _act(node, modules) -> str:
    """``"relu6"`` or ``"relu"`` for a fused activation node."""
    if node.op == "call_module":
        return "relu6" if isinstance(modules[node.target], nn.ReLU6) else "relu"
    return "relu6" if node.target is F.relu6 else "relu"


def named_int_ops(model: nn.Module) -> "OrderedDict[str, IntOp]":
    """Integer ops of a converted model by quantizer name (their outputs are that quantizer's codes)."""
    out: OrderedDict[str, IntOp] = OrderedDict()
    mods = dict(model.named_modules())
    targets = [n.target for n in model.graph.nodes if n.op == "call_module"] if isinstance(model, fx.GraphModule) else []
    for m in [mods[t] for t in targets] + [m for m in model.modules()]:  # execution order first
        if isinstance(m, IntOp) and m.quantizer_name not in out:
            out[m.quantizer_name] = m
    return out


class _Converter:
    """Builds the integer graph of one prepared model, node by node (see the module docstring)."""

    def __init__(self, model: fx.GraphModule, fixed_point: bool):
        self.model, self.fixed_point = model, fixed_point
        self.modules = dict(model.named_modules())
        self.graph = fx.Graph()
        self.root: dict[str, Any] = {}
        self.env: dict[fx.Node, fx.Node] = {}
        self.qinfo: dict[fx.Node, tuple[str, torch.Tensor]] = {}  # old node -> (quantizer name, scale) of its codes
        self.deq_cache: dict[fx.Node, fx.Node] = {}
        self.float_ops: dict[str, str] = {}  # quantizer name -> op kept in float
        self.chains = self._chains()
        self.absorbed = {c for chain in self.chains.values() for c in chain if c.op != "placeholder"}

    def is_fq(self, n: fx.Node) -> bool:
        return n.op == "call_module" and isinstance(self.modules[n.target], FakeQuantize)

    def _chains(self) -> dict[fx.Node, list[fx.Node]]:
        """Per quantizer node, the op(s) absorbed into it: its producer, or a conv/linear/add and its fused ReLU."""
        chains = {}
        for n in self.model.graph.nodes:
            if not self.is_fq(n):
                continue
            x = n.args[0]
            chain = [x]
            if is_relu(x, self.modules) and isinstance(x.args[0], fx.Node) and len(x.args[0].users) == 1:
                p = x.args[0]
                if isinstance(module_of(p, self.modules), WEIGHTED) or is_add(p):
                    chain = [p, x]
            chains[n] = chain
        return chains

    def add_module(self, target: str, mod: nn.Module) -> str:
        self.root[target] = mod
        return target

    def copy_module(self, target: str) -> str:
        """Copy a module into the new model; a conv/linear kept in float gets its frozen fake-quantized weight."""
        if target not in self.root:
            mod = self.modules[target]
            if isinstance(mod, WEIGHTED):
                plain = copy.deepcopy(mod)
                del plain.weight_fake_quant
                plain.__class__ = _FLOAT_CLASS[type(mod)]
                plain.weight = nn.Parameter(_fq_weight(mod), requires_grad=False)
                self.root[target] = plain
            else:
                self.root[target] = copy.deepcopy(mod)
        return target

    def floaty(self, n: Any) -> Any:
        """Mapped argument for a consumer that needs real values: code tensors get dequantized (once)."""
        if not isinstance(n, fx.Node):
            return n
        if n not in self.qinfo:
            return self.env[n]
        if n not in self.deq_cache:
            name, scale = self.qinfo[n]
            target = f"dequant.{name}"
            if target not in self.root:
                self.add_module(target, Dequantize(scale))
            self.deq_cache[n] = self.graph.call_module(target, (self.env[n],))
        return self.deq_cache[n]

    def copy_node(self, n: fx.Node, mapper) -> fx.Node:
        if n.op == "call_module":
            self.copy_module(n.target)
        elif n.op == "get_attr":
            self.root[n.target] = copy.deepcopy(_get_attr(self.model, n.target))
        return self.graph.node_copy(n, mapper)

    def visit(self, n: fx.Node) -> None:
        """Emit the new node(s) for ``n`` and record whether its output is a code tensor."""
        if n.op == "placeholder":
            self.env[n] = self.graph.node_copy(n)
        elif n.op == "output":
            self.graph.output(fx.node.map_arg(n.args[0], self.floaty))
        elif self.is_fq(n):
            fq: FakeQuantize = self.modules[n.target]
            self.env[n] = self.emit(n, fq)
            self.qinfo[n] = (fq.quantizer_name or n.target, fq.validation_scale().detach().float().reshape(()))
        elif is_passthrough(n, self.modules) and any(isinstance(a, fx.Node) and a in self.qinfo for a in n.all_input_nodes):
            src = next(a for a in n.all_input_nodes if a in self.qinfo)
            self.env[n] = self.copy_node(n, lambda a: self.env[a])
            if n.meta.get("calibkit_float", True):
                self.qinfo[n] = self.qinfo[src]
        else:
            self.env[n] = self.copy_node(n, self.floaty)

    def run(self) -> fx.GraphModule:
        for n in self.model.graph.nodes:
            if n not in self.absorbed:
                self.visit(n)
        self.graph.lint()
        gm = fx.GraphModule(self.root, self.graph, f"{type(self.model).__name__}Int")
        gm.meta["calibkit_converted"] = True
        gm.float_ops = dict(self.float_ops)
        loud = {n: op for n, op in self.float_ops.items() if op not in _QUIET_FLOAT_OPS}
        if loud:
            shown = ", ".join(f"{n} ({op})" for n, op in list(loud.items())[:8]) + (", ..." if len(loud) > 8 else "")
            kinds = sorted(set(loud.values()))
            warnings.warn(f"convert kept {len(loud)} op(s) in float, with no integer kernel ({', '.join(kinds[:10])}): "
                          f"{shown}. Their inputs are dequantized and their outputs quantized again; the list is in "
                          "converted.float_ops", FloatOpsWarning, stacklevel=3)
        return gm.eval()

    def emit(self, fq_node: fx.Node, fq: FakeQuantize) -> fx.Node:
        """New-graph node producing the codes of quantizer ``fq`` from its absorbed chain: an integer op where one
        exists for the producer, else the float fallback (dequantize, float op(s), quantize)."""
        name = fq.quantizer_name or fq_node.target
        if fq.ch_axis is not None:
            raise PrepareError(f"activation quantizer {name!r} is per-channel; convert supports per-tensor activations")
        chain = self.chains[fq_node]
        s_out = fq.validation_scale().detach().float().reshape(())
        op, inputs = self._int_op(name, chain, s_out, fq.bits)
        if op is None:
            op, inputs = Quantize(name, s_out, fq.bits), (self._float_chain(chain),)
            if chain[0].op != "placeholder":
                self.float_ops[name] = "+".join(_op_label(c, self.modules) for c in chain)
        return self.graph.call_module(self.add_module(f"qops.{name}", op), inputs)

    def _coded(self, args) -> bool:
        return all(isinstance(a, fx.Node) and a in self.qinfo for a in args)

    def _int_op(self, name: str, chain: list[fx.Node], s_out, bits: int):
        """``(integer op, its code inputs)`` for the chain's producer, or ``(None, None)``."""
        p, relu = chain[0], len(chain) == 2
        act = _act(chain[1], self.modules) if relu else None
        scale = lambda n: self.qinfo[n][1]  # noqa: E731
        codes = lambda args: tuple(self.env[a] for a in args)  # noqa: E731
        pmod = module_of(p, self.modules)
        if isinstance(pmod, WEIGHTED) and len(p.args) == 1 and not p.kwargs and p.args[0] in self.qinfo:
            cls = IntLinear if isinstance(pmod, QLinear) else IntConv
            return cls(name, pmod, scale(p.args[0]), s_out, bits, act=act, fixed_point=self.fixed_point), codes(p.args)
        if is_add(p) and self._coded(p.args):
            return IntAdd(name, scale(p.args[0]), scale(p.args[1]), s_out, bits, act=act), codes(p.args)
        if relu or p.op == "placeholder":
            return None, None
        is_mul = (p.op == "call_function" and p.target in _MUL_FUNCS) or (p.op == "call_method" and p.target == "mul")
        if is_mul and len(p.args) == 2 and not p.kwargs and self._coded(p.args):
            return IntMul(name, scale(p.args[0]), scale(p.args[1]), s_out, bits), codes(p.args)
        if p.op == "call_function" and p.target in _CAT_FUNCS and isinstance(p.args[0], (list, tuple)) \
                and self._coded(p.args[0]):
            dim = p.args[1] if len(p.args) > 1 else p.kwargs.get("dim", 0)
            if isinstance(dim, int):
                return IntCat(name, [scale(a) for a in p.args[0]], s_out, bits, dim), codes(p.args[0])
        return None, None

    def _float_chain(self, chain: list[fx.Node]) -> fx.Node:
        """The chain's op(s) copied in float, fed dequantized inputs (the model input as it is)."""
        if chain[0].op == "placeholder":
            return self.env[chain[0]]
        x = None
        for c in chain:
            x = self.copy_node(c, lambda a, prev=x, c=c: prev if (a is chain[0] and c is not chain[0]) else self.floaty(a))
        return x


def convert(model: fx.GraphModule, fixed_point: bool = False) -> fx.GraphModule:
    """Integer reference model of a prepared, calibrated ``model`` (which is not modified).

    Uses the scales VALIDATION uses (fixed ones, else from the observers; ``CalibrationError`` names
    any quantizer without data). ``fixed_point=True``: conv / linear requantize with integer
    ``(M0, shift)`` arithmetic. Returns an ``fx.GraphModule`` in eval mode taking the same float
    inputs and returning float32 outputs (dequantized codes); its ``float_ops`` attribute lists the ops kept in
    float (``FloatOpsWarning`` names them, pooling and means aside). See the module docstring.
    """
    if not isinstance(model, fx.GraphModule) or not any(isinstance(m, FakeQuantize) for m in model.modules()):
        raise TypeError("convert expects a model returned by calibkit.quant.prepare (an fx.GraphModule with FakeQuantize modules)")
    modules = dict(model.named_modules())
    for root in _INT_ROOTS:
        if root in modules:
            raise PrepareError(f"the model has a submodule named {root!r}, which convert needs for its own ops")
    return _Converter(model, fixed_point).run()


def _get_attr(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fq_weight(mod: nn.Module) -> torch.Tensor:
    wfq = mod.weight_fake_quant
    return quantize_dequantize(mod.weight.detach(), wfq.validation_scale(), wfq.bits, wfq.ch_axis)
