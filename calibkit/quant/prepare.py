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

A conv / linear called at several places gets a module per call site, sharing its parameters, with its own
weight quantizer (``"<module>.weight_1"``, ...) and its own input link (:func:`split_shared_calls`).

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
from typing import Any, Iterable, Mapping

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from calibkit.errors import PrepareError
from calibkit.quant.fake_quantize import FakeQuantize, FakeQuantState
from calibkit.quant.graph_ops import (fuses_with_relu, input_quantizer, is_add, is_float, is_passthrough, module_of,
                                      node_scopes, op_name)
from calibkit.quant.qconfig import QConfig, QuantizerSite, float_modules, resolve_specs
from calibkit.quant.qmodules import QUANT_CLASS, WEIGHTED

__all__ = ["prepare", "fold_batchnorm", "ACTIVATION_ROOT"]

#: Attribute of the prepared model under which activation quantizers are stored.
ACTIVATION_ROOT = "fake_quant"


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
        path, typ = tracer.failed_in if tracer.failed_in and tracer.failed_in[0] else ("module.name", None)
        tname = typ.__name__ if typ is not None else "ModuleType"
        raise PrepareError(
            f"prepare could not trace {type(model).__name__} with torch.fx{where}: {type(e).__name__}: {e}\n"
            "Fix: make forward() traceable (no Python if/for/while on tensor values -- use torch.where or masks), "
            f"or keep that submodule in float with a qconfig override by name or type: overrides={{{path!r}: "
            f"KEEP_FLOAT}} or overrides={{{tname}: KEEP_FLOAT}} (from calibkit import KEEP_FLOAT; the same as "
            f"leaf_modules=[{tname}] or leaf_modules=[{path!r}]): it runs as one opaque float op, its output is "
            "quantized as a whole, its weights are not quantized.") from e
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


# -- shared modules ------------------------------------------------------------------------------------
def split_shared_calls(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Give every call site of a conv / linear called more than once its own module, so that each site gets its
    own weight quantizer and links its own input quantizer (the bias grid and the integer path of VALIDATION
    use the scale of *that* call's input, as ``convert`` does). The copies share the original's parameters
    (one weight, trained once in QAT) and live beside it as ``<module>_call<k>``; quantizer names still use the
    original path (``"c.out"``, ``"c.out_1"``; weights ``"c.weight"``, ``"c.weight_1"``). Returns
    ``{module: [copies]}``."""
    modules = dict(gm.named_modules())
    seen: dict[str, int] = {}
    copies: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_module" or type(modules.get(n.target)) not in QUANT_CLASS:
            continue
        k = seen.get(n.target, 0)
        seen[n.target] = k + 1
        if k == 0:
            continue
        original = modules[n.target]
        path = f"{n.target}_call{k}"
        while path in modules:
            path += "_"
        clone = copy.copy(original)  # the same parameter and buffer tensors, in dicts of its own
        clone._parameters, clone._buffers, clone._modules = dict(original._parameters), dict(original._buffers), {}
        _set_module(gm, path, clone)
        modules[path] = clone
        n.meta["calibkit_call_of"], n.meta["calibkit_call_index"] = n.target, k
        n.target = path
        copies.setdefault(n.meta["calibkit_call_of"], []).append(path)
    return copies


# -- placement ---------------------------------------------------------------------------------------
class _Site(QuantizerSite):
    def __init__(self, name, kind, module_path, scopes, at=None, weighted_module=None):
        super().__init__(name, kind, module_path, scopes)
        self.at = at  # node whose output is quantized (activations)
        self.weighted_module = weighted_module  # module path (weights)


def _place(gm: fx.GraphModule, kept: set[str] = frozenset()) -> list[_Site]:
    """Quantizer sites in graph order (see the module docstring); modules in ``kept`` (``KEEP_FLOAT``) get no
    weight quantizer, only their output's."""
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

    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and is_float(n)]
    for n in inputs:
        sites.append(_Site("input" if len(inputs) == 1 else f"input.{n.name}", "activation", "", [], at=n))
    for n in gm.graph.nodes:
        if n in handled or n.op in ("placeholder", "get_attr", "output") or not is_float(n) or is_passthrough(n, modules):
            continue
        at = n
        mod = module_of(n, modules)
        weighted = type(mod) in QUANT_CLASS and n.meta.get("calibkit_call_of", n.target) not in kept
        if weighted or is_add(n):
            relu = fuses_with_relu(n, modules)
            if relu is not None and is_float(relu):
                at = relu
                handled.add(relu)
        scopes = node_scopes(n)
        if n.op == "call_module":
            module_path = n.meta.get("calibkit_call_of", n.target)  # a shared module's copy: the original's names
            name = unique(module_path, "out")
        else:
            scope = scopes[-1][0] if scopes else ""
            name = unique(f"{scope}.{op_name(n)}" if scope else op_name(n), "")
            module_path = scope
        if weighted and n.target not in weight_done:
            weight_done.add(n.target)
            k = n.meta.get("calibkit_call_index", 0)
            sites.append(_Site(f"{module_path}.weight" + (f"_{k}" if k else ""), "weight", module_path, scopes,
                               weighted_module=n.target))
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


def _insert_quantizers(gm: fx.GraphModule, sites: list[_Site], specs: Mapping, device: torch.device) -> None:
    """Create each site's ``FakeQuantize`` (CALIBRATION state) on ``device``: weight quantizers inside their
    conv / linear (swapped for its ``QConv``/``QLinear`` class), activation quantizers under ``ACTIVATION_ROOT``
    and called on the node's output; then link each weighted op to the quantizer of its input."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for s in sites:
        fq = specs[s.name].create().to(device)
        fq.quantizer_name, fq.kind, fq.module_path, fq.spec = s.name, s.kind, s.module_path, specs[s.name]
        fq.state = FakeQuantState.CALIBRATION
        if s.kind == "weight":
            mod = gm.get_submodule(s.weighted_module)
            mod.__class__ = QUANT_CLASS[type(mod)]
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
        if n.op == "call_module" and isinstance(modules[n.target], WEIGHTED):
            found = input_quantizer(n, modules)
            modules[n.target].__dict__["_input_quantizer"] = found[1] if found else None


def prepare(model: nn.Module, qconfig: QConfig, example_inputs: Any, overrides: Mapping | None = None,
            leaf_modules: Iterable | None = None) -> fx.GraphModule:
    """Return a fake-quantized copy of ``model`` (the input model is not modified).

    Args:
        model: float ``nn.Module``, traceable by ``torch.fx``.
        qconfig: global :class:`~calibkit.quant.qconfig.QConfig` (e.g. ``get_default_qconfig()``).
        example_inputs: a tensor or tuple of positional inputs on the model's device, run once to
            find which values are floating-point tensors (e.g. ``torch.randn(1, 3, 32, 32)``).
        overrides: per-op settings, ``{quantizer name | module name | module type: QConfig/QuantSpec}``
            (priority: quantizer name > module name > module type > global; see ``calibkit.quant.qconfig``);
            ``{module name | module type: KEEP_FLOAT}`` keeps such modules in float (not traced into, no weight
            quantizer, only the output quantized).
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
    kept, overrides = float_modules(model, overrides)
    model = copy.deepcopy(model).eval()
    gm = _trace(model, [*(leaf_modules or ()), *sorted(kept)])
    try:
        with torch.no_grad():
            _Probe(gm).run(*example_inputs)
    except Exception as e:
        raise PrepareError(f"running the traced {type(model).__name__} on example_inputs failed: "
                           f"{type(e).__name__}: {e}") from e
    if ACTIVATION_ROOT in dict(gm.named_children()):
        raise PrepareError(f"the model has a submodule named {ACTIVATION_ROOT!r}, which prepare needs for its quantizers")
    fold_batchnorm(gm)
    split_shared_calls(gm)
    sites = _place(gm, kept)
    specs = resolve_specs(sites, qconfig, overrides, module_names)

    device = next((t.device for t in [*gm.parameters(), *gm.buffers()]), None)
    if device is None:
        device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    _insert_quantizers(gm, sites, specs, device)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    gm.meta["calibkit_prepared"] = True
    gm.meta["calibkit_float_modules"] = sorted(kept)
    return gm.eval()

