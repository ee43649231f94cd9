"""``export_onnx``: a calibrated or QAT-trained prepared model as an ONNX graph of QuantizeLinear/DequantizeLinear
(QDQ) pairs that ONNX Runtime runs with integer kernels (``docs/methods.md#export-to-onnx``).

What the file holds:

* every activation quantizer becomes ``QuantizeLinear -> DequantizeLinear`` with its scale as a **scalar**
  float32 initializer (shape ``[]``, not ``[1]``, which would stop ONNX Runtime from fusing ``QLinearAdd`` and
  friends) and an int8 zero point 0;
* every conv / linear weight is an **int8 initializer** of codes ``clamp(round(w / s_w), qmin, qmax)`` followed by
  ``DequantizeLinear`` with one scale per output channel (``axis=0``; a per-tensor weight gets a scalar);
* a conv / linear bias is an **int32 initializer** ``round(b / (s_in * s_w))`` (the rounding calibkit's VALIDATION
  model does) followed by ``DequantizeLinear`` at the accumulator scale ``s_in * s_w``;
* a ReLU that calibkit fuses into its conv / add gets a QDQ pair *before* it as well, with the output scale:
  ``Conv -> Q -> DQ -> Relu -> Q -> DQ``. Without it ONNX Runtime would see ``Conv -> Relu -> Q``, which it can only
  fuse when the zero point is the range minimum, and the conv would stay float (``FusedConv``). The pair is exact:
  ``relu`` maps grid values to grid values and commutes with rounding;
* shape-only ops that share their input's quantizer in calibkit (max pooling, flatten, ...) get a QDQ pair with
  that scale after them, so that every conv / linear / add reads ``DequantizeLinear`` directly (exact as well);
* a max pool after such a ReLU moves in front of it (``Q -> DQ -> MaxPool -> Q -> DQ -> Relu -> Q -> DQ``), exact
  as well since max pooling selects grid values and commutes with relu: ONNX Runtime pools the int8 codes and runs
  the float ReLU on the pooled map, a quarter of the values. (On x86 it converts int8 activations to uint8 with
  zero point 128, so a ReLU cannot be folded into the requantization as it is for zero point = range minimum;
  the ``DQ -> Relu -> Q`` stays a float op);
* a ``Q -> DQ`` pair read by several nodes is repeated per node (``calibkit.quant.onnx_graph``), or ONNX Runtime
  would leave the residual add and the conv after a shared tensor in float;
* activations narrower than 8 bits are stored in int8 and clamped to their grid: ``Q -> DQ -> Clip(qmin * s,
  qmax * s) -> Q -> DQ``, which equals calibkit's ``clamp(round(x / s), qmin, qmax)``.

So ONNX Runtime's QDQ transformer turns every conv into ``QLinearConv``, every linear into ``QGemm``, every
residual add into ``QLinearAdd`` and every max pool into an int8 pool; ``calibkit.analysis.deployment`` counts them in the optimized model.

**Exporter.** torch 2.14 ships two: the dynamo exporter (``torch.onnx.export(..., dynamo=True)``: ``torch.export`` +
onnxscript's torchlib) and the TorchScript exporter (``dynamo=False``). torchlib does map
``aten::fake_quantize_per_tensor_affine`` / ``..._per_channel_affine`` to QuantizeLinear/DequantizeLinear, but
``torch.export`` never gets that far: it decomposes the op into ``fake_quantize_per_tensor_affine_cachemask``, which
has no meta kernel in torch 2.14, and fails ("attempted to run this operator with Meta tensors"). The TorchScript
exporter traces the same module and maps both ops directly (symbolics of opset 13, the first with per-axis
QuantizeLinear), folding constants into initializers, so calibkit uses it.

**Bit widths.** ONNX QDQ with int8 holds any width from 2 to 8 bits exactly (narrower grids through the clip
above). Wider grids need the INT16 type of opset 21 (beyond the TorchScript exporter), and ONNX Runtime has no integer conv kernels for it; INT4
(opset 21) likewise runs as float convs. Widths above 8 bits are refused with a ``ValueError`` naming the
quantizer.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from calibkit.checks import check_int
from calibkit.errors import CalibrationError, PrepareError, StateError
from calibkit.quant.fake_quantize import FakeQuantize, FakeQuantState, get_fake_quantize_state, require_quantizers
from calibkit.quant.graph_ops import input_quantizer, is_add, is_passthrough, is_relu, module_of
from calibkit.quant.numerics import qrange
from calibkit.quant.qmodules import WEIGHTED, QLinear

__all__ = ["export_onnx", "export_float_onnx", "export_module", "EXPORTER", "MIN_OPSET", "MAX_OPSET", "MAX_EXPORT_BITS"]

EXPORTER = "torchscript"
MIN_OPSET, MAX_OPSET = 13, 20  # 20: the newest opset of the TorchScript exporter
#: Widest grid the int8 QDQ export holds exactly.
MAX_EXPORT_BITS = 8
_EXPORT_ROOT = "onnx_qdq"
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


class QDQ(nn.Module):
    """Per-tensor fake quantization in the form the ONNX exporters map to QuantizeLinear/DequantizeLinear: an int8
    grid (zero point 0, ``[-128, 127]``), then for ``bits < 8`` a clip to ``[qmin * s, qmax * s]`` and a second pair."""

    def __init__(self, scale: torch.Tensor, bits: int = 8):
        super().__init__()
        self.scale, self.bits = float(scale), int(bits)
        qmin, qmax = qrange(self.bits)
        self.low, self.high = qmin * self.scale, qmax * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.fake_quantize_per_tensor_affine(x, self.scale, 0, -128, 127)
        if self.bits < 8:
            y = torch.fake_quantize_per_tensor_affine(y.clamp(self.low, self.high), self.scale, 0, -128, 127)
        return y


class QDQWeighted(nn.Module):
    """A prepared conv / linear for export: its frozen fake-quantized weight passes through a per-channel (or
    per-tensor) QDQ pair; the float bias stays as it is (``onnx_graph`` turns it into int32 codes)."""

    def __init__(self, mod: nn.Module):
        super().__init__()
        wfq = mod.weight_fake_quant
        with torch.no_grad():
            self.register_buffer("weight", wfq(mod.weight).detach().clone())
        self.register_buffer("scale", wfq.scale.detach().clone())
        self.register_buffer("zero_point", torch.zeros(self.scale.shape, dtype=torch.int32))
        self.bias = None if mod.bias is None else nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
        self.linear = isinstance(mod, QLinear)
        self.conv_args = None if self.linear else (mod.stride, mod.padding, mod.dilation, mod.groups)
        self.conv = None if self.linear else {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[mod.weight.dim() - 2]
        if not self.linear and mod.padding_mode != "zeros":
            raise PrepareError(f"export_onnx: conv with padding_mode={mod.padding_mode!r} is not supported: use 'zeros'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale.dim():
            w = torch.fake_quantize_per_channel_affine(self.weight, self.scale, self.zero_point, 0, -128, 127)
        else:
            w = torch.fake_quantize_per_tensor_affine(self.weight, float(self.scale), 0, -128, 127)
        if self.linear:
            return F.linear(x, w, self.bias)
        return self.conv(x, w, self.bias, *self.conv_args)


def _check_model(model: nn.Module) -> dict[str, FakeQuantize]:
    """Every reason the model cannot be exported, checked before anything is built."""
    qs = require_quantizers(model)
    if not isinstance(model, fx.GraphModule) or not model.meta.get("calibkit_prepared", False):
        raise PrepareError("export_onnx takes a model returned by calibkit.quant.prepare (an fx.GraphModule)")
    missing = [n for n, fq in qs.items() if not (bool(torch.isfinite(fq.scale).all()) and bool((fq.scale > 0).all()))]
    if missing:
        raise CalibrationError(f"export_onnx: {len(missing)} quantizer(s) have no valid scale (uncalibrated): "
                               f"{missing[:5]}: calibrate the model first")
    state = get_fake_quantize_state(model)
    if state is not FakeQuantState.VALIDATION or model.training:
        have = "mixed" if state is None else f"FakeQuantState.{state.name}"
        raise StateError(f"export_onnx needs the model in eval mode and FakeQuantState.VALIDATION (frozen scales), "
                         f"but it is in {'train' if model.training else 'eval'} mode, {have}: call model.eval() and "
                         "set_fake_quantize(model, FakeQuantState.VALIDATION) first")
    for name, fq in qs.items():
        if fq.bits > MAX_EXPORT_BITS:
            raise ValueError(f"quantizer {name!r} has bits={fq.bits}, which int8 QDQ cannot hold: export_onnx supports "
                             f"bit widths in [2, {MAX_EXPORT_BITS}]")
        if fq.kind != "weight" and fq.ch_axis is not None:
            raise ValueError(f"quantizer {name!r} has ch_axis={fq.ch_axis}: export_onnx needs per-tensor activations "
                             "(ch_axis=None)")
        if fq.kind == "weight" and fq.ch_axis not in (None, 0):
            raise ValueError(f"quantizer {name!r} has ch_axis={fq.ch_axis}: export_onnx supports weights per output "
                             "channel (ch_axis=0) or per tensor (None)")
    return qs


def _insert_qdq(gm: fx.GraphModule, after: fx.Node, qdq: QDQ, target: str) -> fx.Node:
    gm.add_submodule(target, qdq)
    with gm.graph.inserting_after(after):
        q = gm.graph.call_module(target, (after,))
    after.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
    return q


def _fused_relu_producer(n: fx.Node, modules) -> fx.Node | None:
    """The conv / linear / add whose fused ReLU feeds quantizer node ``n`` (None if there is none)."""
    src = n.args[0]
    if not (isinstance(src, fx.Node) and is_relu(src, modules) and isinstance(src.args[0], fx.Node)):
        return None
    prod = src.args[0]
    ok = len(prod.users) == 1 and (isinstance(module_of(prod, modules), WEIGHTED) or is_add(prod))
    return prod if ok else None


def _extra_pairs(gm: fx.GraphModule, modules) -> set[fx.Node]:
    """Insert the 8-bit pairs before fused ReLUs and after shape-only ops; returns the pairs before ReLUs."""
    plan = []  # (node, scale, before a relu): found first, as input_quantizer walks the original graph
    for n in gm.graph.nodes:
        mod = module_of(n, modules)
        if isinstance(mod, FakeQuantize):
            prod = _fused_relu_producer(n, modules)
            if prod is not None:
                plan.append((prod, mod.scale, True))
        elif is_passthrough(n, modules) and n.meta.get("calibkit_tensor", False):
            found = input_quantizer(n, modules)
            if found is not None:
                plan.append((n, found[1].scale, False))
    before_relus = set()
    for i, (n, scale, pre) in enumerate(plan):
        q = _insert_qdq(gm, n, QDQ(scale, 8), f"{_EXPORT_ROOT}.q{i}")
        if pre:
            before_relus.add(q)
    return before_relus


def _pool_before_relu(gm: fx.GraphModule, modules, pre_relu: set[fx.Node]) -> None:
    """``pair -> relu -> quantizer -> max pool -> pair`` becomes ``pair -> max pool -> pair -> relu -> quantizer``.

    Exact: max pooling selects grid values and commutes with the (monotone) relu and with rounding. ONNX Runtime then
    pools the int8 codes (its QDQ rules drop a pair around ``MaxPool``) and runs the float ``DQ -> Relu -> Q`` on the
    pooled map, a quarter of the values for a 2x2 pool."""
    for n in list(gm.graph.nodes):
        relu = n.args[0] if isinstance(module_of(n, modules), FakeQuantize) else None
        if not (isinstance(relu, fx.Node) and is_relu(relu, modules) and relu.args[0] in pre_relu) or len(n.users) != 1:
            continue
        pool = next(iter(n.users))
        if not isinstance(module_of(pool, modules), _MAX_POOLS) or len(pool.users) != 1:
            continue
        after = next(iter(pool.users))  # the pair inserted after the pool
        for user in list(after.users):
            user.replace_input_with(after, n)
        pool.replace_input_with(n, relu.args[0])
        relu.replace_input_with(relu.args[0], after)
        after.append(relu)
        relu.append(n)


def export_module(prepared_model: nn.Module) -> fx.GraphModule:
    """The plain module ``export_onnx`` hands to the torch exporter (a copy; ``prepared_model`` is not changed):
    quantizers become :class:`QDQ`, convs / linears :class:`QDQWeighted`, with the extra pairs described in the
    module docstring. Its outputs equal the VALIDATION model's up to the float32 rounding of the accumulators."""
    _check_model(prepared_model)
    gm = copy.deepcopy(prepared_model)
    modules = dict(gm.named_modules())
    _pool_before_relu(gm, modules, _extra_pairs(gm, modules))
    for n in gm.graph.nodes:
        mod = module_of(n, modules)
        if isinstance(mod, FakeQuantize):
            gm.add_submodule(n.target, QDQ(mod.scale, mod.bits))
        elif isinstance(mod, WEIGHTED):
            gm.add_submodule(n.target, QDQWeighted(mod))
    gm.graph.lint()
    gm.recompile()
    return gm.eval()


def _torch_export(module: nn.Module, example_inputs: Any, path: Path, opset: int, dynamic_batch: bool) -> None:
    """``torch.onnx.export`` with the TorchScript exporter: inputs ``input`` (``input_<i>`` for several), output
    ``output``, a symbolic batch axis if ``dynamic_batch``, constants folded into initializers."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    inputs = tuple(t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in inputs)
    names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    dyn = {n: {0: "batch"} for n in [*names, "output"]} if dynamic_batch else None
    with warnings.catch_warnings():  # the TorchScript exporter announces its deprecation on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(module, inputs, str(path), dynamo=False, do_constant_folding=True, dynamic_axes=dyn,
                          input_names=names, output_names=["output"], opset_version=opset)


def _check_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"path={str(path)!r}: the folder {str(path.parent)!r} does not exist")
    return path


def export_onnx(prepared_model: nn.Module, example_inputs: Any, path: str | Path, opset: int = 17,
                dynamic_batch: bool = True) -> Path:
    """Write ``prepared_model`` (calibrated or QAT-trained, eval mode, ``FakeQuantState.VALIDATION``) to ``path``
    as an ONNX QDQ model (module docstring); returns the path.

    Args:
        example_inputs: a tensor or tuple of positional inputs (e.g. one batch) used to trace the model.
        opset: ONNX opset, an integer in [13, 20] (13: the first with per-axis QuantizeLinear; 20: the newest the
            TorchScript exporter writes).
        dynamic_batch: the batch dimension of inputs and outputs is symbolic (``"batch"``).

    Raises ``CalibrationError`` (a quantizer without a scale), ``StateError`` (not eval + VALIDATION),
    ``ValueError`` (bits > 8, per-channel activations, bad ``opset`` or ``path``), ``PrepareError`` (not a
    prepared model). Everything is checked before anything is built; ``prepared_model`` is never changed.
    """
    from calibkit.quant import onnx_graph

    opset = check_int("opset", opset, MIN_OPSET, MAX_OPSET)
    path = _check_path(path)
    gm = export_module(prepared_model).cpu()
    tmp = path.with_name(path.name + ".raw")
    try:
        _torch_export(gm, example_inputs, tmp, opset, dynamic_batch)
        onnx_graph.finalize(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_float_onnx(model: nn.Module, example_inputs: Any, path: str | Path, opset: int = 17,
                      dynamic_batch: bool = True) -> Path:
    """The float ``model`` (eval mode) as a plain float32 ONNX file, with the same exporter, names and batch axis as
    :func:`export_onnx`: the baseline an int8 export is compared with. Returns the path."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if model.training:
        raise StateError("export_float_onnx needs the model in eval mode: call model.eval() first")
    opset = check_int("opset", opset, MIN_OPSET, MAX_OPSET)
    path = _check_path(path)
    _torch_export(model, example_inputs, path, opset, dynamic_batch)
    return path
