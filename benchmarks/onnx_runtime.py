"""How fast is the exported int8 model? PyTorch float vs ONNX Runtime float32 vs ONNX Runtime int8 (QDQ from
``calibkit.export_onnx``), at batch 1 and batch 256, in one run, on 2 threads.

* ``PyTorch float``: the float model in eval mode (``torch.set_num_threads(threads)``, ``torch.inference_mode``);
* ``ORT float32``: the same float model exported by ``calibkit.export_float_onnx`` (TorchScript exporter, opset 17);
* ``ORT int8``: the model calibrated with the default qconfig (``mse`` activations per tensor, ``min_max`` weights
  per channel, int8) and exported by ``calibkit.export_onnx``.

Without ``--checkpoint`` the model is the full profile's architecture with random weights, calibrated on random
inputs (timing only). With a checkpoint (e.g. notebook 01's full model) it is calibrated on 32 x 128 CIFAR-10
training images, the batches are test images, and the parity with calibkit's VALIDATION model on the 10 000 test
images is printed as well (top-1 agreement, accuracies, largest logit difference in output steps).

Both ONNX Runtime sessions use the CPU provider with all graph optimizations and ``intra_op_num_threads=threads``.
It prints median latency per batch, throughput (images/s), the speed-up of each row over ``ORT float32`` and the
file sizes, plus the integer kernels ONNX Runtime runs (read from its optimized model) and the float compute ops
left. The goal of issue 15 is ``ORT int8`` at least 2x faster than ``ORT float32`` at batch 256. Not a test;
nothing is asserted. Timings on a machine shared with other jobs are noisy: compare ratios measured in the same
run, and rerun on a quiet machine for numbers to quote.

    python benchmarks/onnx_runtime.py                       # the full profile's architecture, random weights
    python benchmarks/onnx_runtime.py --checkpoint outputs/full/01_train_float/model.pt
"""

import argparse
import tempfile
from pathlib import Path

import torch

import calibkit as ck
from calibkit.cifar.train import PROFILES
from calibkit.analysis import deployment


def _float_model(checkpoint: str | None) -> torch.nn.Module:
    if checkpoint:
        return ck.load_checkpoint(checkpoint)[0].eval()
    torch.manual_seed(0)
    model = ck.cifar_resnet(width=PROFILES["full"]["width"])  # the full profile's widths
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that folding and calibration see real ranges
        model.train()(torch.randn(512, 3, 32, 32))
    return model.eval()


def _rows(model, sessions: dict, x: torch.Tensor, batches, repeats: int) -> list[dict]:
    rows = []
    for batch in batches:
        xb = x[:batch].contiguous()
        xn = xb.numpy()

        def torch_call():
            with torch.inference_mode():
                model(xb)

        calls = {"PyTorch float": torch_call}
        for name, sess in sessions.items():
            calls[name] = (lambda s=sess: s.run(None, {"input": xn}))
        n = repeats if batch > 1 else repeats * 20
        for name, fn in calls.items():
            sec = deployment.median_seconds(fn, repeats=n, warmup=2)
            rows.append({"model": name, "batch": batch, "ms": 1e3 * sec, "images_per_s": batch / sec})
    for r in rows:
        ref = next(o for o in rows if o["batch"] == r["batch"] and o["model"] == "ORT float32")
        r["speedup_vs_ort_fp32"] = ref["ms"] / r["ms"]
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="a calibkit float checkpoint (default: random full-width model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per batch-256 cell (x20 at batch 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = _float_model(args.checkpoint)
    data = ck.load_cifar10(download=False, progress=False) if args.checkpoint else None
    x = ck.normalize(data.test_images[:256]) if data else torch.randn(256, 3, 32, 32)
    calib = ck.calibration_batches(data, 32, 128, seed=0) if data else [x[i:i + 64] for i in range(0, 256, 64)]
    q = ck.prepare(model, ck.get_default_qconfig(), (x[:2],))
    ck.calibrate(q, calib, progress=False)
    ck.set_fake_quantize(q, ck.FakeQuantState.VALIDATION)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"ORT float32": ck.export_float_onnx(model, x[:1], Path(tmp) / "float32.onnx"),
                 "ORT int8": ck.export_onnx(q, x[:2], Path(tmp) / "int8.onnx")}
        sessions = {k: deployment.ort_session(p, threads=args.threads) for k, p in paths.items()}
        sizes = {k: p.stat().st_size for k, p in paths.items()}
        kernels = deployment.kernel_counts(paths["ORT int8"], threads=args.threads)
        rows = _rows(model, sessions, x, (1, 256), args.repeats)
        parity = (deployment.parity(q, paths["ORT int8"], ck.normalize(data.test_images), data.test_labels,
                                    session=sessions["ORT int8"]) if data else None)
    print(f"{args.threads} threads; {'checkpoint ' + args.checkpoint if args.checkpoint else 'random full-width model'}")
    print(f"{'model':<14} {'batch':>5} {'ms/batch':>10} {'images/s':>10} {'x ORT fp32':>10}")
    for r in rows:
        print(f"{r['model']:<14} {r['batch']:>5} {r['ms']:>10.2f} {r['images_per_s']:>10.0f} {r['speedup_vs_ort_fp32']:>10.2f}")
    print("file size: " + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in sizes.items())
          + f" (int8 / float32 = {sizes['ORT int8'] / sizes['ORT float32']:.2f})")
    print(f"ONNX Runtime int8 kernels: {kernels['integer']}; float compute ops left: {kernels['float_compute'] or 'none'}")
    print(f"all node types of the optimized int8 model: {kernels['all']}")
    if parity:
        print(f"parity on the {parity['images']} CIFAR-10 test images (calibration 32 x 128 training images, default "
              f"qconfig): top-1 agreement {100 * parity['top1_agreement']:.2f} %, accuracy calibkit "
              f"{100 * parity['accuracy_calibkit']:.2f} % / ORT {100 * parity['accuracy_onnx']:.2f} %, largest logit "
              f"difference {parity['max_logit_difference_steps']:.2f} output steps")
    r256 = next(r for r in rows if r["model"] == "ORT int8" and r["batch"] == 256)
    verdict = "met" if r256["speedup_vs_ort_fp32"] >= 2 else "NOT met"
    print(f"goal int8 >= 2x ORT float32 at batch 256: {verdict} ({r256['speedup_vs_ort_fp32']:.2f}x)")


if __name__ == "__main__":
    main()
