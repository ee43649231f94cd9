"""Classifying the nodes of a traced graph: what ``prepare`` quantizes and ``convert`` turns into integer ops.

A node is a ReLU, an add, a shape-only / selection op (no quantizer of its own: its values are already on its
input's grid), or an op that computes new values. Names of function ops (``"add"``, ``"cat"``) and the module
scopes a node sits in give quantizers their names.
"""

from __future__ import annotations

import operator
from typing import Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from calibkit.quant.fake_quantize import FakeQuantize

__all__ = ["is_float", "module_of", "is_relu", "is_add", "is_passthrough", "fuses_with_relu", "op_name",
           "node_scopes", "input_quantizer"]

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


def is_float(node: fx.Node) -> bool:
    """Whether ``node`` produced a floating-point tensor when the traced graph was probed."""
    return bool(node.meta.get("calibkit_float", False))


def module_of(node: fx.Node, modules: Mapping[str, nn.Module]) -> nn.Module | None:
    """The module a ``call_module`` node calls (None for other nodes)."""
    return modules.get(node.target) if node.op == "call_module" else None


def is_relu(node: fx.Node, modules) -> bool:
    """A ReLU or ReLU6, as a module, a function or a method."""
    if node.op == "call_module":
        return isinstance(modules[node.target], _RELU_MODULES)
    if node.op == "call_function":
        return node.target in _RELU_FUNCS
    return node.op == "call_method" and node.target in _RELU_METHODS


def is_add(node: fx.Node) -> bool:
    """A two-operand add without ``alpha`` (``+``, ``+=``, ``torch.add``, ``Tensor.add``)."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCS) or \
             (node.op == "call_method" and node.target in _ADD_METHODS)
    return is_add and len(node.args) == 2 and not node.kwargs


def is_passthrough(node: fx.Node, modules) -> bool:
    """A shape-only or selection op: its output holds values already on its input's grid (no quantizer)."""
    if node.op == "call_module":
        return isinstance(modules[node.target], _PASS_MODULES)
    if node.op == "call_function":
        if node.target is operator.getitem:  # slicing a tensor selects values; indexing a tuple does not
            src = node.args[0]  # a quantizer's output (inserted after probing) is a tensor too
            return isinstance(src, fx.Node) and (bool(src.meta.get("calibkit_tensor", False))
                                                 or isinstance(module_of(src, modules), FakeQuantize))
        if node.target is F.pad:
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
            return value in (None, 0, 0.0)
        return node.target in _PASS_FUNCS
    return node.op == "call_method" and node.target in _PASS_METHODS


def fuses_with_relu(node: fx.Node, modules) -> fx.Node | None:
    """The ReLU/ReLU6 fused into ``node`` (a conv/linear/add): its only user, taking it as input."""
    users = list(node.users)
    if len(users) == 1 and is_relu(users[0], modules) and users[0].args and users[0].args[0] is node:
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


def input_quantizer(node: fx.Node, modules) -> tuple[fx.Node, "FakeQuantize"] | None:
    """The activation quantizer whose codes reach ``node``'s first input through shape-only ops."""
    src = node.args[0] if node.args else None
    while isinstance(src, fx.Node):
        if src.op == "call_module" and isinstance(modules.get(src.target), FakeQuantize):
            return src, modules[src.target]
        if not is_passthrough(src, modules) or not src.args:
            return None
        src = src.args[0]
    return None
