"""The torchvision zoo table: logits SQNR (dB) and seconds per model and calibration method.

Every model of ``tests/zoo_models.py`` (resnet18, mobilenet_v3_small, efficientnet_b0, convnext_tiny, a 2-layer
ViT; random seeded weights, 32 x 32 inputs, 2 calibration batches of 4 images, SQNR on 8 held-out images) goes
through prepare -> calibrate -> VALIDATION -> convert with each method on activations (weights min_max per
channel), on ``--threads`` threads. Prints one row per model: SQNR per method, the seconds of the whole pipeline
per method, and how many ops ``convert`` kept in float (and which kinds). Not a test: seconds depend on the
machine and its load; the SQNR floors live in tests/test_zoo.py.

    python benchmarks/zoo.py [--threads 1] [--models resnet18,vit_tiny] [--methods min_max,kl]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from calibkit.quant.observers import CALIBRATION_METHODS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo_models import ZOO, float_model, zoo_case  # noqa: E402

METHODS = CALIBRATION_METHODS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default=",".join(ZOO))
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    head = f"{'model':<20}" + "".join(f"{m + ' dB':>14}" for m in methods) + "".join(f"{m + ' s':>14}" for m in methods)
    print(head + "  float ops (convert)")
    for name in args.models.split(","):
        model = float_model(name)
        rows = {m: zoo_case(name, m, model) for m in methods}
        kinds = sorted({k for r in rows.values() for k in r["float_ops"].values()})
        n_float = len(next(iter(rows.values()))["float_ops"])
        print(f"{name:<20}" + "".join(f"{rows[m]['sqnr_db']:>14.2f}" for m in methods)
              + "".join(f"{rows[m]['seconds']:>14.2f}" for m in methods) + f"  {n_float}: {', '.join(kinds)}",
              flush=True)


if __name__ == "__main__":
    main()
