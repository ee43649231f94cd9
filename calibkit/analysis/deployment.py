"""Checking an exported model in ONNX Runtime (CPU): parity with calibkit, which kernels really run in int8, timing.

* :func:`parity` runs the same images through calibkit's VALIDATION model and the ONNX file and reports top-1
  agreement, both accuracies, and the largest logit difference, also in units of the output scale (the scale of the
  ``DequantizeLinear`` that produces the graph output): 1.0 means one step of the output grid.
* :func:`kernel_counts` reads the optimized model ONNX Runtime writes (``SessionOptions.optimized_model_filepath``)
  and counts its nodes: integer kernels (``QLinearConv``, ``QGemm``, ``QLinearAdd``, ``ConvInteger``, ...) and the
  float compute ops left (``Conv``, ``FusedConv``, ``Gemm``, ...). A graph full of QDQ pairs can still run its convs
  in float; only this count says what ran.
* :func:`median_seconds` times a call (warm-up first, then the median of ``repeats``).

See ``docs/methods.md#export-to-onnx``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from calibkit.checks import check_int
from calibkit.devices import model_device

__all__ = ["ort_session", "run_onnx", "output_scale", "parity", "kernel_counts", "median_seconds", "INTEGER_OPS",
           "FLOAT_COMPUTE_OPS"]

#: Node types of an optimized ONNX Runtime model that compute in integers (``NhwcMaxPool``: ONNX Runtime's int8 pool).
INTEGER_OPS = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd",
                         "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat",
                         "QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax", "MatMulIntegerToFloat",
                         "DynamicQuantizeMatMul", "NhwcMaxPool"})
#: Float node types that do the heavy work of a conv / linear / add (what should have become integer kernels).
FLOAT_COMPUTE_OPS = frozenset({"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "Add", "Mul"})


def ort_session(path: str | Path, threads: int | None = None, optimized_path: str | Path | None = None):
    """An ONNX Runtime CPU session for ``path`` with all graph optimizations; ``threads``: intra-op threads (None:
    ONNX Runtime's default); ``optimized_path``: where ONNX Runtime writes the optimized model."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # no warning about serializing hardware-specific (NCHWc) optimizations
    if threads is not None:
        so.intra_op_num_threads = check_int("threads", threads, 1)
        so.inter_op_num_threads = 1
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_onnx(session, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Outputs of an ONNX Runtime ``session`` (or a model path) on ``images``, in batches, as a float32 CPU tensor."""
    batch_size = check_int("batch_size", batch_size, 1)
    if isinstance(session, (str, Path)):
        session = ort_session(session)
    name = session.get_inputs()[0].name
    x = images.detach().cpu().float().numpy()
    outs = [session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return torch.from_numpy(np.concatenate(outs))


def output_scale(path: str | Path) -> float | None:
    """Scale of the ``DequantizeLinear`` producing the first graph output of the ONNX file (None if another op does)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    out = model.graph.output[0].name
    node = next((n for n in model.graph.node if out in n.output), None)
    if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in inits:
        return None
    return float(numpy_helper.to_array(inits[node.input[1]]).reshape(-1)[0])


@torch.no_grad()
def parity(prepared_model: nn.Module, path: str | Path, images: torch.Tensor, labels: torch.Tensor,
           batch_size: int = 500, session=None) -> dict:
    """Compare calibkit's model (run as it is: VALIDATION for the check) with the ONNX file on ``images``.

    Returns ``top1_agreement`` (fraction of images where both pick the same class), ``accuracy_calibkit``,
    ``accuracy_onnx``, ``accuracy_difference`` (onnx - calibkit, fraction), ``max_logit_difference`` and
    ``max_logit_difference_steps`` (divided by :func:`output_scale`; None without one), ``images``.
    """
    session = session or ort_session(path)
    onnx_out = run_onnx(session, images, batch_size)
    dev = model_device(prepared_model)
    ref = torch.cat([prepared_model(images[i:i + batch_size].to(dev)).float().cpu()
                     for i in range(0, len(images), batch_size)])
    labels = labels.cpu()
    acc_ref = float((ref.argmax(1) == labels).float().mean())
    acc_onnx = float((onnx_out.argmax(1) == labels).float().mean())
    diff = float((onnx_out - ref).abs().max())
    scale = output_scale(path)
    return {"images": len(labels), "top1_agreement": float((onnx_out.argmax(1) == ref.argmax(1)).float().mean()),
            "accuracy_calibkit": acc_ref, "accuracy_onnx": acc_onnx, "accuracy_difference": acc_onnx - acc_ref,
            "max_logit_difference": diff, "output_scale": scale,
            "max_logit_difference_steps": None if scale is None else diff / scale}


def kernel_counts(path: str | Path, threads: int | None = None) -> dict:
    """Node types of the model ONNX Runtime optimizes from ``path`` (CPU, all optimizations).

    Returns ``{"integer": {op: n}, "float_compute": {op: n}, "all": {op: n}, "integer_total": n,
    "float_compute_total": n}``; NCHWc ops count under their plain name (``com.microsoft.nchwc`` Conv -> Conv).
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        ort_session(path, threads=threads, optimized_path=opt)
        nodes = onnx.load(str(opt)).graph.node
    counts = Counter(n.op_type for n in nodes)
    integer = {k: v for k, v in sorted(counts.items()) if k in INTEGER_OPS}
    floats = {k: v for k, v in sorted(counts.items()) if k in FLOAT_COMPUTE_OPS}
    return {"integer": integer, "float_compute": floats, "all": dict(sorted(counts.items())),
            "integer_total": sum(integer.values()), "float_compute_total": sum(floats.values())}


def median_seconds(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    repeats, warmup = check_int("repeats", repeats, 1), check_int("warmup", warmup, 0)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)

