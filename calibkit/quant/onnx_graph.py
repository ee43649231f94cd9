"""The ONNX side of ``export_onnx``: turn the exporter's QDQ graph into the one ONNX Runtime runs in int8.

:func:`finalize` rewrites the file the torch exporter wrote (``docs/methods.md#export-to-onnx``):

1. ``Constant`` nodes become initializers, ``Identity`` nodes of initializers are skipped, and scales / zero points of shape ``[1]`` become scalars ``[]``;
2. ``QuantizeLinear`` on a constant (a weight) is folded: the weight is stored as int8 codes
   ``clamp(round(w / s), -128, 127)`` (round half to even) feeding the ``DequantizeLinear`` directly;
3. the float bias of a ``Conv`` / ``Gemm`` whose input and weight both come from ``DequantizeLinear`` becomes
   int32 codes ``round(b / (s_in * s_w))`` with a ``DequantizeLinear`` at scale ``s_in * s_w`` (float32, the
   product and rounding calibkit's VALIDATION model uses);
4. a ``Q -> DQ`` pair read by several nodes is repeated once per node (see :func:`_qdq_per_consumer`);
5. unused initializers are dropped, the model is checked (``onnx.checker``, with shape inference) and saved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["finalize", "qdq_scales"]

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _constants_to_initializers(graph) -> None:
    from onnx import helper, numpy_helper

    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            arr = numpy_helper.to_array(helper.get_attribute_value(node.attribute[0]))
            graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _skip_identities(graph, inits: dict) -> None:
    """``Identity`` of an initializer (the TorchScript exporter shares equal constants that way) -> the initializer
    itself: ONNX Runtime fuses a weight ``DequantizeLinear`` only when its scale and zero point are initializers."""
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in keep:
        for i, x in enumerate(n.input):
            if x in alias:
                n.input[i] = alias[x]
    del graph.node[:]
    graph.node.extend(keep)


def _scalar_qparams(graph, inits: dict) -> None:
    """Scales and zero points of shape ``[1]`` -> ``[]`` (ONNX Runtime fuses ``QLinearAdd`` only with scalars)."""
    from onnx import numpy_helper

    for node in graph.node:
        if node.op_type not in _QDQ:
            continue
        for name in node.input[1:3]:
            t = inits.get(name)
            if t is not None and list(t.dims) == [1]:
                arr = numpy_helper.to_array(t).reshape(())
                t.CopyFrom(numpy_helper.from_array(arr, name))


def _fold_weight_quantize(graph, inits: dict) -> None:
    from onnx import numpy_helper

    keep = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in inits and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
            s = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if s.ndim == 1:
                s = s.reshape([-1 if i == axis % w.ndim else 1 for i in range(w.ndim)])
            q = np.clip(np.rint(w / s), -128, 127).astype(np.int8)
            name = node.input[0] + "_int8"
            graph.initializer.append(numpy_helper.from_array(q, name))
            inits[name] = graph.initializer[-1]
            for other in graph.node:
                for i, x in enumerate(other.input):
                    if x == node.output[0]:
                        other.input[i] = name
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _int32_bias(graph, inits: dict) -> None:
    from onnx import helper, numpy_helper

    producers = {o: n for n in graph.node for o in n.output}
    new_nodes = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        dq = [producers.get(x) for x in node.input[:2]]
        if any(d is None or d.op_type != "DequantizeLinear" or d.input[1] not in inits for d in dq):
            continue
        s_in = numpy_helper.to_array(inits[dq[0].input[1]]).astype(np.float32)
        s_w = numpy_helper.to_array(inits[dq[1].input[1]]).astype(np.float32)
        if s_in.ndim != 0:
            continue
        acc = (s_in * s_w).astype(np.float32)
        b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
        q = np.rint(b / acc)
        if np.abs(q).max(initial=0) >= 2**31 - 1:
            continue  # the bias does not fit int32 codes at this scale: keep it float
        base = f"{node.input[2]}_{node.name}"  # per node: the exporter shares equal bias initializers
        graph.initializer.extend([numpy_helper.from_array(q.astype(np.int32), base + "_int32"),
                                  numpy_helper.from_array(acc, base + "_scale"),
                                  numpy_helper.from_array(np.zeros(acc.shape, np.int32), base + "_zero_point")])
        new_nodes.append(helper.make_node("DequantizeLinear", [base + "_int32", base + "_scale", base + "_zero_point"],
                                          [base + "_dq"], name=base + "_DequantizeLinear", axis=0))
        node.input[2] = base + "_dq"
    nodes = new_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)


def _qdq_per_consumer(graph, inits: dict) -> None:
    """A ``Q -> DQ`` pair whose output feeds several nodes is repeated, one pair per consumer. ONNX Runtime would
    otherwise copy only the ``DQ`` (one per node unit), and a ``Q`` with several ``DQ``s is left out of its
    int8 -> uint8 conversion on x86, so the max pool and residual add after it would stay float."""
    from onnx import helper

    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i, x in enumerate(n.input):
            consumers.setdefault(x, []).append((n, i))
    out = []
    for node in graph.node:
        out.append(node)
        users = consumers.get(node.output[0], []) if node.op_type == "DequantizeLinear" else []
        q = producers.get(node.input[0])
        if len(users) < 2 or q is None or q.op_type != "QuantizeLinear" or len(consumers[q.output[0]]) != 1:
            continue
        for k, (user, i) in enumerate(users[1:], start=1):
            qparams = []
            for name in q.input[1:]:  # own copies, so that ORT's common-subexpression elimination keeps the pair
                copy = inits[name].__deepcopy__()
                copy.name = f"{name}_{q.name}_{k}"
                graph.initializer.append(copy)
                qparams.append(copy.name)
            q2 = helper.make_node("QuantizeLinear", [q.input[0], *qparams], [f"{q.output[0]}_{k}"],
                                  name=f"{q.name}_{k}", axis=next((a.i for a in q.attribute if a.name == "axis"), 1))
            dq2 = helper.make_node("DequantizeLinear", [q2.output[0], *node.input[1:]], [f"{node.output[0]}_{k}"],
                                   name=f"{node.name}_{k}", axis=next((a.i for a in node.attribute if a.name == "axis"), 1))
            out.extend([q2, dq2])
            user.input[i] = dq2.output[0]
    del graph.node[:]
    graph.node.extend(out)


def _drop_unused(graph) -> None:
    used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def finalize(src: str | Path, dst: str | Path) -> Path:
    """Rewrite the exporter's file ``src`` as described in the module docstring and save it to ``dst``."""
    import onnx

    model = onnx.load(str(src))
    graph = model.graph
    _constants_to_initializers(graph)
    inits = {t.name: t for t in graph.initializer}
    _skip_identities(graph, inits)
    _scalar_qparams(graph, inits)
    _fold_weight_quantize(graph, inits)
    _int32_bias(graph, inits)
    _qdq_per_consumer(graph, inits)
    _drop_unused(graph)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))
    return Path(dst)


def qdq_scales(model) -> dict[str, np.ndarray]:
    """Scale of every ``QuantizeLinear`` of an ONNX ``model`` (a ``ModelProto`` or a path), by its input name."""
    import onnx
    from onnx import numpy_helper

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    inits = {t.name: t for t in model.graph.initializer}
    return {n.input[0]: numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[1] in inits}
