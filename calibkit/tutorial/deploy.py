"""Notebook 08's measurements: one exported model run in ONNX Runtime and in calibkit, side by side.

:func:`measure_float` and :func:`measure_quantized` time a batch (median of ``repeats`` after a warm-up, on the
threads ONNX Runtime and torch are given), check parity (``calibkit.analysis.deployment.parity``) and count the
integer kernels; :func:`result_rows` turns the results into the rows of the notebook's table and bar chart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from calibkit.analysis import deployment
from calibkit.checks import check_labels

__all__ = ["measure_float", "measure_quantized", "result_rows"]


def _ms(fn, repeats: int) -> float:
    return 1e3 * deployment.median_seconds(fn, repeats=repeats, warmup=1)


def measure_float(model: nn.Module, path: str | Path, images: torch.Tensor, labels: torch.Tensor, batch: int,
                  repeats: int, threads: int) -> dict:
    """The float model in PyTorch and its float32 ONNX file in ONNX Runtime: accuracy, agreement, ms per batch."""
    sess = deployment.ort_session(path, threads=threads)
    ort_out = deployment.run_onnx(sess, images)
    with torch.no_grad():
        ref = torch.cat([model(images[i:i + 500]) for i in range(0, len(images), 500)])
    xb = images[:batch].contiguous()
    with torch.no_grad():
        ms_torch = _ms(lambda: model(xb), repeats)
    check_labels(labels, ref.shape[1])
    return {"accuracy_pytorch": int((ref.argmax(1) == labels).sum()) / len(labels),  # evaluate's top-1, from ref
            "accuracy_onnx": float((ort_out.argmax(1) == labels).float().mean()),
            "top1_agreement": float((ort_out.argmax(1) == ref.argmax(1)).float().mean()),
            "ms_pytorch": ms_torch, "ms_onnx": _ms(lambda: sess.run(None, {"input": xb.numpy()}), repeats),
            "file_kib": Path(path).stat().st_size / 1024}


def measure_quantized(prepared: nn.Module, path: str | Path, images: torch.Tensor, labels: torch.Tensor, batch: int,
                      repeats: int, threads: int) -> dict:
    """A prepared model (VALIDATION) and its int8 ONNX file: parity, integer kernels, ms per batch, file size."""
    sess = deployment.ort_session(path, threads=threads)
    result = deployment.parity(prepared, path, images, labels, session=sess)
    kernels = deployment.kernel_counts(path, threads=threads)
    xb = images[:batch].contiguous()
    with torch.no_grad():
        ms_fq = _ms(lambda: prepared(xb), repeats)
    result.update(integer_kernels=kernels["integer"], float_compute_ops=kernels["float_compute_total"],
                  ms_fake_quant=ms_fq, ms_onnx=_ms(lambda: sess.run(None, {"input": xb.numpy()}), repeats),
                  file_kib=Path(path).stat().st_size / 1024)
    return result


def result_rows(float_result: Mapping, quantized: Mapping[str, Mapping], batch: int) -> list[dict]:
    """One row per (model, runtime): accuracy %, agreement % (with the PyTorch model it was exported from), ms per
    batch, images/s, file size in KiB (the PyTorch rows show the size of the ONNX file they were exported to)."""
    f = float_result
    rows = [{"model": "float", "runtime": "PyTorch", "accuracy %": 100 * f["accuracy_pytorch"], "agreement %": 100.0,
             "ms/batch": f["ms_pytorch"], "file KiB": f["file_kib"]},
            {"model": "float", "runtime": "ORT float32", "accuracy %": 100 * f["accuracy_onnx"],
             "agreement %": 100 * f["top1_agreement"], "ms/batch": f["ms_onnx"], "file KiB": f["file_kib"]}]
    for name, r in quantized.items():
        rows.append({"model": name, "runtime": "fake-quant (PyTorch)", "accuracy %": 100 * r["accuracy_calibkit"],
                     "agreement %": 100.0, "ms/batch": r["ms_fake_quant"], "file KiB": r["file_kib"]})
        rows.append({"model": name, "runtime": "ORT int8", "accuracy %": 100 * r["accuracy_onnx"],
                     "agreement %": 100 * r["top1_agreement"], "ms/batch": r["ms_onnx"], "file KiB": r["file_kib"]})
    for row in rows:
        row["images/s"] = 1e3 * batch / row["ms/batch"]
    return rows
