"""``prepare``: trace a float model with torch.fx, fold BatchNorm, insert fake-quantizers.

Placement (what an int8 deployment quantizes):

* the model input (every floating-point placeholder): ``"input"`` (``"input.<arg>"`` for several);
* every weight of ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (per output channel by default):
  ``"<module>.weight"``;
* the output of every conv / linear, after BatchNorm folding and after a following ReLU / ReLU6
  when that activation is the conv's only user (fused, as int kernels do): ``"<module>.out"``;
* residual adds (``+``, ``+=``, ``torch.add``, ``Tensor.add``), fused with a following ReLU the same
  way: ``"<scope>.add.out"`` where ``<scope>`` is the module whose ``forward`` performs the add
  (``"layer1.0.add.out"``; a second add in the same scope is ``"layer1.0.add_1.out"``; adds in the
  top-level ``forward`` have no scope: ``"add.out"``);
* every other op that computes new values: avg / adaptive-avg pooling, concatenation, ``mul``,
  standalone activations and BatchNorms that could not be folded, leaf modules, ...: module ops are
  named ``"<module>.out"`` (a module called twice: ``"<module>.out_1"``), function and method ops
  ``"<scope>.<op>.out"`` like adds.

Shape-only and selection ops get no quantizer: their output holds values already on their input's
grid. These are flatten / view / reshape / permute / transpose / squeeze / getitem-style slicing /
chunk / split / expand / contiguous / clone / dropout / identity, and **max pooling**, which selects
among already-quantized values and so shares its input's quantizer.

While fake quantization is on, conv / linear biases are rounded to the int32 grid ``s_in * s_w[c]``
the integer model uses, and in eval mode (VALIDATION) conv / linear accumulate the integer codes
exactly, so that ``convert`` reproduces VALIDATION bit for bit (see ``_QuantWeightMixin``).

BatchNorm folding: a ``BatchNorm`` whose input is a conv (or a 2-d linear) used only by it is folded
into that conv with its running statistics (eval semantics), whatever mode the model is in. QAT then
trains the folded weights directly (BN statistics no longer update).

Quantizer modules live under ``prepared.fake_quant.<name>`` (activations) and
``<module>.weight_fake_quant`` (weights), so the calibration state (observer statistics and scales)
round-trips through ``state_dict``.
"""

from __future__ import annotations

import copy
import operator
from typing import Any, Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from calibkit.errors import PrepareError
from calibkit.quant.fake_quantize import FakeQuantize, FakeQuantState, named_quantizers
from calibkit.quant.qconfig import QConfig, QuantizerSite, resolve_specs

__all__ = ["prepare", "QConv1d", "QConv2d", "QConv3d", "QLinear", "ACTIVATION_ROOT"]

#: Attribute of the prepared model under which activation quantizers are stored.
ACTIVATION_ROOT = "fake_quant"


# -- weight-quantized modules ------------------------------------------------------------------------
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


def input_quantizer(node: fx.Node, modules) -> tuple[fx.Node, "FakeQuantize"] | None:
    """The activation quantizer whose codes reach ``node``'s first input through shape-only ops."""
    src = node.args[0] if node.args else None
    while isinstance(src, fx.Node):
        if src.op == "call_module" and isinstance(modules.get(src.target), FakeQuantize):
            return src, modules[src.target]
        if not _is_passthrough(src, modules) or not src.args:
            return None
        src = src.args[0]
    return None


_QUANT_CLASS = {nn.Conv1d: QConv1d, nn.Conv2d: QConv2d, nn.Conv3d: QConv3d, nn.Linear: QLinear}
_WEIGHTED = tuple(_QUANT_CLASS.values())

# -- op classification ---------------------------------------------------------------------------
_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCS = {F.relu, F.relu6, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Flatten,
                 nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                 nn.AdaptiveMaxPool3d, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle)
_PASS_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute, torch.t,
               torch.chunk, torch.split, torch.narrow, torch.select, torch.clone, torch.unflatten, torch.flip, torch.roll,
               F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
               torch.max_pool1d, torch.max_pool2d, torch.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
               F.adaptive_max_pool3d, F.pixel_shuffle, F.pixel_unshuffle, torch.channel_shuffle}
_PASS_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose",
                 "permute", "t", "contiguous", "expand", "expand_as", "repeat", "chunk", "split", "narrow", "select",
                 "clone", "detach", "flip", "roll", "to", "float", "type_as", "cpu", "cuda"}
_OP_NAMES = {operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub",
             operator.mul: "mul", operator.imul: "mul", operator.truediv: "div", operator.itruediv: "div",
             operator.matmul: "matmul", operator.neg: "neg", operator.getitem: "getitem", torch.cat: "cat",
             torch.concat: "cat", torch.concatenate: "cat"}


def _is_float(node: fx.Node) -> bool:
    return bool(node.meta.get("calibkit_float", False))


def _module(node: fx.Node, modules: Mapping[str, nn.Module]) -> nn.Module | None:
    return modules.get(node.target) if node.op == "call_module" else None


def _is_relu(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _RELU_MODULES)
    if node.op == "call_function":
        return node.target in _RELU_FUNCS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _is_add(node: fx.Node) -> bool:
    """A two-operand add without ``alpha`` (``+``, ``+=``, ``torch.add``, ``Tensor.add``)."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCS) or \
             (node.op == "call_method" and node.target in _ADD_METHODS)
    return is_add and len(node.args) == 2 and not node.kwargs


def _is_passthrough(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _PASS_MODULES)
    if node.op == "call_function":
        if node.target is operator.getitem:  # slicing a tensor selects values; indexing a tuple does not
            src = node.args[0]
            return isinstance(src, fx.Node) and bool(src.meta.get("calibkit_tensor", False))
        if node.target is F.pad:
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
            return value in (None, 0, 0.0)
        return node.target in _PASS_FUNCS
    return node.op == "call_method" and node.target in _PASS_METHODS


def fuses_with_relu(node: fx.Node, modules) -> fx.Node | None:
    """The ReLU/ReLU6 fused into ``node`` (a conv/linear/add): its only user, taking it as input."""
    users = list(node.users)
    if len(users) == 1 and _is_relu(users[0], modules) and users[0].args and users[0].args[0] is node:
        return users[0]
    return None


def op_name(node: fx.Node) -> str:
    """Short name of a function/method op (``"add"``, ``"cat"``, ``"adaptive_avg_pool2d"``, ...)."""
    if node.op == "call_method":
        name = str(node.target)
    else:
        name = _OP_NAMES.get(node.target) or getattr(node.target, "__name__", str(node.target))
    name = name.strip("_") or "op"
    return name.replace(".", "_")


def node_scopes(node: fx.Node) -> list[tuple[str, type]]:
    """Enclosing module paths and types of ``node``, outermost first (includes a called module itself)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(path, typ) for path, typ in stack.values() if path]


# -- tracing ---------------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: Iterable[str] = ()):
        super().__init__()
        self.leaf_types, self.leaf_names = tuple(leaf_types), set(leaf_names)
        self.failed_in: tuple[str, type] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, FakeQuantize):
            raise PrepareError(f"module {qualname!r} is already a FakeQuantize: prepare() takes a float model, "
                               "not a prepared one")
        return isinstance(m, self.leaf_types) or qualname in self.leaf_names or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (self.path_of_module(m), type(m))
            raise


def _trace(model: nn.Module, leaf_modules: Iterable | None) -> fx.GraphModule:
    leaf_types, leaf_names = [], set()
    names = {n for n, _ in model.named_modules()}
    for item in leaf_modules or ():
        if isinstance(item, type) and issubclass(item, nn.Module):
            leaf_types.append(item)
        elif isinstance(item, str):
            if item not in names:
                import difflib
                close = difflib.get_close_matches(item, sorted(names), n=5, cutoff=0.5)
                raise ValueError(f"leaf_modules entry {item!r} is not a module of the model"
                                 f"{f'; close matches: {close}' if close else ''}")
            leaf_names.add(item)
        else:
            raise TypeError(f"leaf_modules entries must be nn.Module subclasses or module names, got {item!r}")
    tracer = _Tracer(tuple(leaf_types), leaf_names)
    try:
        graph = tracer.trace(model)
    except PrepareError:
        raise
    except Exception as e:
        where = ""
        if tracer.failed_in is not None:
            path, typ = tracer.failed_in
            where = f" inside module {path!r} ({typ.__name__})" if path else ""
        hint = (f"pass leaf_modules=[{tracer.failed_in[1].__name__}] or leaf_modules=[{tracer.failed_in[0]!r}] "
                if tracer.failed_in and tracer.failed_in[0] else "pass leaf_modules=[<ModuleType or 'module.name'>] ")
        raise PrepareError(
            f"prepare could not trace {type(model).__name__} with torch.fx{where}: {type(e).__name__}: {e}\n"
            "Fix: make forward() traceable (no Python if/for/while on tensor values -- use torch.where or masks), "
            f"or {hint}to run the untraceable submodule as one opaque op (its output is quantized as a whole, its "
            "weights are not quantized).") from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


class _Probe(fx.Interpreter):
    """Runs the traced graph once and records which nodes produce (floating-point) tensors."""

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        n.meta["calibkit_tensor"] = isinstance(out, torch.Tensor)
        n.meta["calibkit_float"] = isinstance(out, torch.Tensor) and out.is_floating_point()
        n.meta["calibkit_ndim"] = out.dim() if isinstance(out, torch.Tensor) else None
        return out


# -- BatchNorm folding -----------------------------------------------------------------------------
_CONV_BN = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def _set_module(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def fold_batchnorm(gm: fx.GraphModule) -> list[str]:
    """Fold every eligible BatchNorm into the conv/linear before it (in place); returns folded BN paths."""
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    folded = []
    for bn_node in list(gm.graph.nodes):
        if bn_node.op != "call_module" or not isinstance(modules[bn_node.target], nn.modules.batchnorm._BatchNorm):
            continue
        src = bn_node.args[0] if bn_node.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        if calls[src.target] != 1 or calls[bn_node.target] != 1:
            continue
        conv, bn = modules[src.target], modules[bn_node.target]
        if bn.running_mean is None or bn.running_var is None:
            continue
        if type(conv) in _CONV_BN and type(bn) is _CONV_BN[type(conv)] and bn.num_features == conv.out_channels:
            fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
        elif type(conv) is nn.Linear and type(bn) is nn.BatchNorm1d and bn.num_features == conv.out_features \
                and src.meta.get("calibkit_ndim") == 2:
            fused = fuse_linear_bn_eval(conv.eval(), bn.eval())
        else:
            continue
        _set_module(gm, src.target, fused)
        modules[src.target] = fused
        bn_node.replace_all_uses_with(src)
        gm.graph.erase_node(bn_node)
        folded.append(bn_node.target)
    return folded


# -- placement ---------------------------------------------------------------------------------------
class _Site(QuantizerSite):
    def __init__(self, name, kind, module_path, scopes, at=None, weighted_module=None):
        super().__init__(name, kind, module_path, scopes)
        self.at = at  # node whose output is quantized (activations)
        self.weighted_module = weighted_module  # module path (weights)


def _place(gm: fx.GraphModule) -> list[_Site]:
    modules = dict(gm.named_modules())
    sites: list[_Site] = []
    counts: dict[str, int] = {}
    handled: set[fx.Node] = set()
    weight_done: set[str] = set()

    def unique(base: str, suffix: str) -> str:
        k = counts.get(base, 0)
        counts[base] = k + 1
        if suffix:  # module ops: <module>.out, <module>.out_1
            return f"{base}.{suffix}" + (f"_{k}" if k else "")
        return (f"{base}_{k}" if k else base) + ".out"  # function ops: <scope>.add.out, <scope>.add_1.out

    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and _is_float(n)]
    for n in inputs:
        sites.append(_Site("input" if len(inputs) == 1 else f"input.{n.name}", "activation", "", [], at=n))
    for n in gm.graph.nodes:
        if n in handled or n.op in ("placeholder", "get_attr", "output") or not _is_float(n) or _is_passthrough(n, modules):
            continue
        at = n
        mod = _module(n, modules)
        weighted = type(mod) in _QUANT_CLASS
        if weighted or _is_add(n):
            relu = fuses_with_relu(n, modules)
            if relu is not None and _is_float(relu):
                at = relu
                handled.add(relu)
        scopes = node_scopes(n)
        if n.op == "call_module":
            name, module_path = unique(n.target, "out"), n.target
        else:
            scope = scopes[-1][0] if scopes else ""
            name = unique(f"{scope}.{op_name(n)}" if scope else op_name(n), "")
            module_path = scope
        if weighted and n.target not in weight_done:
            weight_done.add(n.target)
            sites.append(_Site(f"{n.target}.weight", "weight", n.target, scopes, weighted_module=n.target))
        sites.append(_Site(name, "activation", module_path, scopes, at=at))
    # storage paths are the names under ACTIVATION_ROOT: a name must not be a dotted prefix of another
    names = {s.name for s in sites if s.kind == "activation"}
    for s in sites:
        if s.kind == "activation":
            while any(o.startswith(s.name + ".") for o in names):
                names.discard(s.name)
                s.name += "_"
                names.add(s.name)
    return sites


def prepare(model: nn.Module, qconfig: QConfig, example_inputs: Any, overrides: Mapping | None = None,
            leaf_modules: Iterable | None = None) -> fx.GraphModule:
    """Return a fake-quantized copy of ``model`` (the input model is not modified).

    Args:
        model: float ``nn.Module``, traceable by ``torch.fx``.
        qconfig: global :class:`~calibkit.quant.qconfig.QConfig` (e.g. ``get_default_qconfig()``).
        example_inputs: a tensor or tuple of positional inputs on the model's device, run once to
            find which values are floating-point tensors (e.g. ``torch.randn(1, 3, 32, 32)``).
        overrides: per-op settings, ``{quantizer name | module name | module type: QConfig/QuantSpec}``
            (priority: quantizer name > module name > module type > global; see ``calibkit.quant.qconfig``).
        leaf_modules: module types or names to keep as opaque ops instead of tracing into them.

    Returns an ``fx.GraphModule`` in eval mode whose quantizers observe and pass values through
    unchanged (the CALIBRATION behaviour); use ``set_fake_quantize`` to change state and
    ``named_quantizers`` to list the quantizers. Raises ``PrepareError`` when tracing fails.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, FakeQuantize) for m in model.modules()):
        raise PrepareError(f"{type(model).__name__} already contains FakeQuantize modules: prepare() takes a float model")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be a tensor or a tuple of the model's positional inputs")
    module_names = {n for n, _ in model.named_modules()}
    model = copy.deepcopy(model).eval()
    gm = _trace(model, leaf_modules)
    try:
        with torch.no_grad():
            _Probe(gm).run(*example_inputs)
    except Exception as e:
        raise PrepareError(f"running the traced {type(model).__name__} on example_inputs failed: "
                           f"{type(e).__name__}: {e}") from e
    if ACTIVATION_ROOT in dict(gm.named_children()):
        raise PrepareError(f"the model has a submodule named {ACTIVATION_ROOT!r}, which prepare needs for its quantizers")
    fold_batchnorm(gm)
    sites = _place(gm)
    specs = resolve_specs(sites, qconfig, overrides, module_names)

    device = next((t.device for t in [*gm.parameters(), *gm.buffers()]), None)
    if device is None:
        device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for s in sites:
        fq = specs[s.name].create().to(device)
        fq.quantizer_name, fq.kind, fq.module_path, fq.spec = s.name, s.kind, s.module_path, specs[s.name]
        fq.state = FakeQuantState.CALIBRATION
        if s.kind == "weight":
            mod = gm.get_submodule(s.weighted_module)
            mod.__class__ = _QUANT_CLASS[type(mod)]
            mod.add_module("weight_fake_quant", fq)
            continue
        target = f"{ACTIVATION_ROOT}.{s.name}"
        gm.add_submodule(target, fq)
        after = placeholders[-1] if s.at.op == "placeholder" else s.at
        with graph.inserting_after(after):
            q = graph.call_module(target, (s.at,))
        s.at.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
    modules = dict(gm.named_modules())
    for n in graph.nodes:  # link each weighted op to the quantizer of its input (bias grid s_in * s_w)
        if n.op == "call_module" and isinstance(modules[n.target], _WEIGHTED):
            found = input_quantizer(n, modules)
            modules[n.target].__dict__["_input_quantizer"] = found[1] if found else None
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
    gm.meta["calibkit_prepared"] = True
    return gm.eval()


def quantizer_sites(model: fx.GraphModule) -> dict[str, str]:
    """Map quantizer name -> module path of the op it belongs to (``""`` for the model input)."""
    return {name: getattr(fq, "module_path", "") for name, fq in named_quantizers(model).items()}
