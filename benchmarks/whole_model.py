"""Benchmark: whole-model calibration time and logits SQNR, calibkit against torch.ao FX and NVIDIA ModelOpt.

For each torchvision model (random weights; BatchNorm statistics from 2 batches in train mode) every method sees
the same ``--batches`` batches of 16 x 3 x 96 x 96 standard-normal images (fixed seed), with
``torch.set_num_threads(--threads)`` (default 2). Per model it prints

* ``float s``: the float model's forward time over the batches (min of ``--repeats``);
* per method, ``calib s`` (the calibration forward passes plus the final scale computation), ``x float``
  (``calib s / float s``) and ``SQNR dB``: logits of the fake-quantized model against the float logits on the same
  batches;
* the ratios calibkit / matching peer (time, and the SQNR difference).

Methods:

* calibkit ``min_max``, ``percentile``, ``mse``, ``kl``, ``mix`` on activations (per tensor), weights ``min_max`` per
  channel (``get_default_qconfig``); time = ``calibkit.calibrate``; SQNR in ``FakeQuantState.VALIDATION``. A
  module that calibkit's tracer cannot quantize is kept float (``leaf_modules``).
* torch.ao FX: ``prepare_fx`` (native backend config, quint8 per-tensor affine activations, qint8 per-channel
  symmetric weights) with ``MinMaxObserver`` and with ``HistogramObserver``; time = forward passes plus every
  activation observer's ``calculate_qparams``; SQNR with every observer replaced by a fake quantizer of its qparams
  and the (BN-folded) conv / linear weights fake-quantized per channel.
* ModelOpt (``pip install calibkit[bench]``): ``mtq.quantize`` quantizers (``INT8_DEFAULT_CFG``: inputs of conv /
  linear per tensor, weights per channel), calibrated with ``max`` (``mtq.calibrate``) and with the histogram
  calibrator's ``entropy``, ``percentile`` and ``mse`` amax; time = calibration only (module replacement excluded).

Matching peers: min_max ~ torch.ao MinMax and ModelOpt max; percentile ~ ModelOpt percentile; mse ~ ModelOpt mse
and torch.ao Histogram (an L2 search); kl ~ ModelOpt entropy; mix ~ the best of ModelOpt's histogram methods.

``--busy`` first starts one spinning Python process per core (the oversubscribed condition: the cores are shared
with other work) and stops them at the end. Not a test: the numbers depend on the machine and its load.

Usage::

    python benchmarks/whole_model.py                                   # all four models, 2 threads
    python benchmarks/whole_model.py --models resnet18 --busy --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

import calibkit as ck
from calibkit.quant.observers import CALIBRATION_METHODS

MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"]
CALIBKIT = list(CALIBRATION_METHODS)
TORCH_AO = ["ao_minmax", "ao_histogram"]
MODELOPT = ["mo_max", "mo_entropy", "mo_percentile", "mo_mse"]
PEERS = {"min_max": ["ao_minmax", "mo_max"], "percentile": ["mo_percentile"], "mse": ["mo_mse", "ao_histogram"],
         "kl": ["mo_entropy"], "mix": ["mo_entropy", "mo_percentile", "mo_mse"]}


# ---------------------------------------------------------------- models and data
def build(name: str, batches: list[torch.Tensor], seed: int) -> nn.Module:
    """torchvision ``name`` with random weights; BN statistics from the first 2 batches (train mode); eval mode."""
    import torchvision
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    model.train()
    with torch.no_grad():
        for b in batches[:2]:
            model(b)
    return model.eval()


def make_batches(n: int, seed: int, size: int = 96) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, size, size, generator=g) for _ in range(n)]


def forward_all(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b) for b in batches])


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ---------------------------------------------------------------- calibkit
def run_calibkit(model: nn.Module, batches, method: str) -> tuple[float, torch.Tensor]:
    qc = ck.get_default_qconfig(activation_observer=method, weight_observer="min_max")
    try:
        m = ck.prepare(model, qc, (batches[0][:2],))
    except ck.PrepareError:  # keep the parts calibkit cannot trace float
        m = ck.prepare(model, qc, (batches[0][:2],), leaf_modules=_untraceable())
    seconds = ck.calibrate(m, batches, progress=False)
    ck.set_fake_quantize(m, ck.FakeQuantState.VALIDATION)
    return seconds, forward_all(m, batches)


def _untraceable() -> list[type]:
    """Module types calibkit's tracer should treat as leaves (kept float inside): convnext's CNBlock-level layer
    scale / stochastic depth, for instance."""
    import torchvision.ops
    return [torchvision.ops.StochasticDepth]


# ---------------------------------------------------------------- torch.ao FX
class _AoFakeQuant(nn.Module):
    """Replaces a calibrated torch.ao observer: fake-quantize with its qparams (per tensor)."""

    def __init__(self, obs):
        super().__init__()
        scale, zp = obs.calculate_qparams()
        self.scale, self.zp = float(scale), int(zp)
        self.qmin, self.qmax = (0, 255) if obs.dtype == torch.quint8 else (-128, 127)

    def forward(self, x):
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zp, self.qmin, self.qmax)


def run_torch_ao(model: nn.Module, batches, method: str) -> tuple[float, torch.Tensor]:
    from torch.ao.quantization import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver, QConfig, QConfigMapping
    from torch.ao.quantization.observer import ObserverBase
    from torch.ao.quantization.quantize_fx import prepare_fx
    act = (MinMaxObserver if method == "ao_minmax" else HistogramObserver).with_args(
        dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=False)
    weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = prepare_fx(copy.deepcopy(model), QConfigMapping().set_global(QConfig(activation=act, weight=weight)),
                       (batches[0][:2],))
    observers = {n: o for n, o in m.named_modules() if isinstance(o, ObserverBase)}

    def calibrate():
        forward_all(m, batches)
        return [o.calculate_qparams() for o in observers.values()]
    seconds, _ = timed(calibrate)
    for name, obs in observers.items():
        parent, _, leaf = name.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, leaf, _AoFakeQuant(obs))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                w = mod.weight
                scale = (w.abs().amax(dim=tuple(range(1, w.dim()))) / 127.5).clamp_min(1e-12)
                mod.weight.copy_(torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32),
                                                                        0, -128, 127))
    m.recompile()
    return seconds, forward_all(m, batches)


# ---------------------------------------------------------------- ModelOpt
def run_modelopt(model: nn.Module, batches, method: str) -> tuple[float, torch.Tensor]:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.model_calib import enable_stats_collection
    from modelopt.torch.quantization.nn import TensorQuantizer
    cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    algo = method[len("mo_"):]
    if algo != "max":
        cfg["quant_cfg"].append({"quantizer_name": "*input_quantizer",
                                 "cfg": {"num_bits": 8, "axis": None, "calibrator": "histogram"}})
    cfg["algorithm"] = None  # quantizers only: calibration is timed below
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        m = mtq.quantize(copy.deepcopy(model), cfg, forward_loop=None)

        def calibrate():
            if algo == "max":
                return mtq.calibrate(m, "max", forward_loop=lambda mm: forward_all(mm, batches))
            enable_stats_collection(m)
            forward_all(m, batches)
            for q in m.modules():
                if isinstance(q, TensorQuantizer) and not q._disabled and getattr(q, "_calibrator", None) is not None:
                    if q._calibrator.__class__.__name__ == "HistogramCalibrator":
                        q.load_calib_amax(algo)
                    else:
                        q.load_calib_amax()
                    q.enable_quant()
                    q.disable_calib()
        seconds, _ = timed(calibrate)
    return seconds, forward_all(m, batches)


# ---------------------------------------------------------------- running
def run_method(model, batches, method):
    if method in CALIBKIT:
        return run_calibkit(model, batches, method)
    if method in TORCH_AO:
        return run_torch_ao(model, batches, method)
    return run_modelopt(model, batches, method)


def bench_model(name: str, args) -> dict:
    data = make_batches(args.batches + 2, args.seed)
    model = build(name, data[args.batches:], args.seed)
    batches = data[:args.batches]
    with torch.no_grad():
        model(batches[0][:2])  # warm-up
    if any(m in CALIBKIT for m in args.methods):
        run_calibkit(model, batches[:1], "kl")  # warm-up (kernels, allocator), untimed
    float_runs = [timed(lambda: forward_all(model, batches)) for _ in range(args.repeats)]
    float_s, ref = min(t for t, _ in float_runs), float_runs[-1][1]
    rows = {}
    for method in args.methods:
        try:
            runs = [run_method(model, batches, method) for _ in range(args.repeats if method in CALIBKIT else 1)]
            seconds = min(r[0] for r in runs)
            rows[method] = {"seconds": seconds, "x_float": seconds / float_s, "sqnr_db": ck.sqnr_db(ref, runs[-1][1])}
        except Exception as e:  # noqa: BLE001 - a peer that cannot take the model is reported, not fatal
            rows[method] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(f"  {name:20s} {method:14s} {_fmt(rows[method])}", file=sys.stderr, flush=True)
    return {"float_seconds": float_s, "methods": rows}


def _fmt(r: dict) -> str:
    if "error" in r:
        return r["error"]
    return f"{r['seconds']:8.3f} s {r['x_float']:7.2f}x {r['sqnr_db']:7.2f} dB"


def report(results: dict, title: str) -> None:
    print(f"\n== {title}")
    for name, res in results.items():
        print(f"\n{name}: float forward {res['float_seconds']:.3f} s")
        print(f"  {'method':14s} {'calib s':>8s} {'x float':>8s} {'SQNR dB':>8s}   calibkit / peer (time, dSQNR)")
        rows = res["methods"]
        for method, r in rows.items():
            line = f"  {method:14s} " + ("  " + r["error"] if "error" in r else
                                         f"{r['seconds']:8.3f} {r['x_float']:8.2f} {r['sqnr_db']:8.2f}")
            if method in PEERS and "error" not in r:
                for peer in PEERS[method]:
                    p = rows.get(peer)
                    if p and "error" not in p:
                        line += f"   {peer}: {r['seconds'] / p['seconds']:.2f}x, {r['sqnr_db'] - p['sqnr_db']:+.1f} dB"
            print(line)


@contextlib.contextmanager
def busy_cores(on: bool):
    """One spinning Python process per core while the block runs (the oversubscribed condition)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)] if on else []
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--methods", nargs="+", default=CALIBKIT + TORCH_AO + MODELOPT)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="calibkit runs and float timings per model (min)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--busy", action="store_true", help="one spinning process per core while measuring")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with busy_cores(args.busy):
        results = {name: bench_model(name, args) for name in args.models}
    report(results, f"{args.batches} batches of 16x3x96x96, {args.threads} threads, "
                    f"{'busy cores' if args.busy else 'idle cores'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
