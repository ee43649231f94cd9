"""``python -m calibkit compare|calibrate``: your model and your image folder, from the shell.

``compare`` runs :func:`calibkit.own.compare.compare` and writes the report (:mod:`calibkit.own.report_files`)::

    python -m calibkit compare --model torchvision.models:mobilenet_v3_small --model-kwargs '{"num_classes": 3}' \\
        --weights w.pt --data DIR --image-size 64 --mean 0.49,0.48,0.45 --std 0.25,0.24,0.26 \\
        --calib-batches 2 --batch-size 16 --methods all --out report/

``calibrate`` calibrates one method on the same kind of batches and saves the prepared model with
:func:`calibkit.quant.io.save_prepared` (read back with ``weights_only=True``; ``meta`` holds the spec, the
method and the preprocessing, everything needed to ``prepare`` the model again before ``load_prepared``).

Bad input (a spec that does not build, weights that do not fit, a folder without images, a mean or std of the
wrong length, a model ``prepare`` cannot trace, ...) exits with status 2 and one line on stderr, before any report
file exists; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from calibkit.devices import model_device
from calibkit.errors import CalibKitError
from calibkit.own.compare import METHODS, check_methods, compare, method_qconfig
from calibkit.own.data import Preprocessing, image_data, parse_floats
from calibkit.own.report_files import check_out_dir, write_report
from calibkit.own.spec import load_model
from calibkit.quant.calibrate import calibrate
from calibkit.quant.io import save_prepared
from calibkit.quant.prepare import prepare
from calibkit.version import __version__

__all__ = ["main", "build_parser"]

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise _UsageError(f"{message} (see `python -m calibkit {self.prog.split()[-1]} --help`)")


class _UsageError(ValueError):
    pass


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="'package.module:callable', e.g. torchvision.models:resnet18")
    p.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments, e.g. '{\"num_classes\": 3}'")
    p.add_argument("--weights", help="state_dict file (torch.save(model.state_dict())), loaded weights_only")
    p.add_argument("--data", required=True, help="image folder DIR/<class>/<image>")
    p.add_argument("--val-data", help="a second folder to evaluate on (else --data is split with --seed)")
    p.add_argument("--image-size", type=int, required=True, help="center-crop side in pixels")
    p.add_argument("--resize-size", type=int, help="shorter side before the crop (default image-size / 0.875)")
    p.add_argument("--mean", required=True, help="per-channel mean of [0, 1] pixels, e.g. 0.485,0.456,0.406")
    p.add_argument("--std", required=True, help="per-channel std of [0, 1] pixels, e.g. 0.229,0.224,0.225")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--activation-bits", type=int, default=8)
    p.add_argument("--weight-bits", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration / evaluation split")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m calibkit", description="Calibrate your own model on your own images.")
    parser.add_argument("--version", action="version", version=f"calibkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = sub.add_parser("compare", help="compare every method on the same calibration batches")
    _common(c)
    c.add_argument("--methods", default="all", help=f"'all' or a comma list of {','.join(METHODS)}")
    c.add_argument("--worst-k", type=int, default=5, help="worst ops by isolated SQNR kept per method")
    c.add_argument("--out", required=True, help="report folder (must be new or empty)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    k = sub.add_parser("calibrate", help="calibrate one method and save the prepared model")
    _common(k)
    k.add_argument("--method", default="mse", help=f"one of {','.join(METHODS)}")
    k.add_argument("--out", required=True, help="file for the calibrated prepared model (e.g. calibrated.pt)")
    return parser


def _model_and_data(a: argparse.Namespace):
    """Check every argument, then build the model (on ``--device``) and the data."""
    try:
        kwargs = json.loads(a.model_kwargs)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-kwargs={a.model_kwargs!r} is not JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs={a.model_kwargs!r} must be a JSON object like '{{\"num_classes\": 3}}'")
    pre = Preprocessing(a.image_size, parse_floats("mean", a.mean), parse_floats("std", a.std), a.resize_size)
    device = torch.device(a.device)
    model = load_model(a.model, kwargs, a.weights).to(device)
    data = image_data(a.data, pre, a.calib_batches, a.batch_size, a.val_data, a.seed, workers=a.workers)
    meta = {"model": a.model, "model_kwargs": kwargs, "weights": a.weights, "data": a.data, "val_data": a.val_data,
            "preprocessing": pre.as_dict(), "classes": data.classes, "seed": a.seed, "device": str(device)}
    return model, data, meta


def _compare(a: argparse.Namespace) -> str:
    methods = check_methods(a.methods)
    out = check_out_dir(a.out, a.overwrite)
    t0 = time.perf_counter()
    model, data, meta = _model_and_data(a)
    result = compare(model, data.calib, data.eval_loader, methods, a.activation_bits, a.weight_bits,
                     worst_k=a.worst_k, progress=not a.no_progress)
    meta.update(command="python -m calibkit " + shlex.join(sys.argv[1:]), calibkit=__version__,
                seconds=round(time.perf_counter() - t0, 3))
    write_report(result, out, meta, a.overwrite)
    lines = [f"{'float':<11} top1 {100 * result.float_top1:6.2f}%  top5 {100 * result.float_top5:6.2f}%"]
    lines += [f"{m:<11} top1 {100 * r.top1:6.2f}%  top5 {100 * r.top5:6.2f}%  drop {r.drop_points:+.2f} points  "
              f"calibration {r.calibration_seconds:.2f} s" for m, r in result.methods.items()]
    return "\n".join(lines + [f"report: {out}/report.md ({meta['seconds']:.1f} s)"])


def _calibrate(a: argparse.Namespace) -> str:
    (method,) = check_methods([a.method])
    model, data, meta = _model_and_data(a)
    example = (data.calib[0][:1].to(model_device(model)),)
    prepared = prepare(model, method_qconfig(method, a.activation_bits, a.weight_bits), example)
    seconds = calibrate(prepared, data.calib, progress=not a.no_progress)
    meta.update(method=method, activation_bits=a.activation_bits, weight_bits=a.weight_bits,
                weight_observer="min_max", calibration_seconds=seconds)
    path = save_prepared(a.out, prepared, meta)
    return f"calibrated {method} in {seconds:.2f} s on {data.calib_images} images: saved {path}"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for bad input with one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        a = build_parser().parse_args(argv)
        print(_compare(a) if a.command == "compare" else _calibrate(a))
        return 0
    except (CalibKitError, ValueError, TypeError, OSError, KeyError) as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"calibkit: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
