"""The torchvision classification zoo at toy size, shared by tests/test_zoo.py and benchmarks/zoo.py.

Random weights (seeded), BatchNorm statistics from two train-mode batches, 32 x 32 inputs: two calibration batches
of 4 standard-normal images and a held-out batch of 8 to measure on. The ViT is torchvision's
``VisionTransformer`` with 2 layers, hidden size 32, patch 8; its zero-initialised head is re-drawn so its logits
are not all zero.
"""

from __future__ import annotations

import time
import warnings

import torch
from torchvision import models as tvm
from torchvision.models.vision_transformer import VisionTransformer

import calibkit as ck
from calibkit.quant.convert import FloatOpsWarning

SIZE, CLASSES = 32, 10


def _vit():
    m = VisionTransformer(image_size=SIZE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                          num_classes=CLASSES)
    torch.nn.init.normal_(m.heads.head.weight, std=0.2)
    return m


ZOO = {
    "resnet18": lambda: tvm.resnet18(num_classes=CLASSES),
    "mobilenet_v3_small": lambda: tvm.mobilenet_v3_small(num_classes=CLASSES),
    "efficientnet_b0": lambda: tvm.efficientnet_b0(num_classes=CLASSES),
    "convnext_tiny": lambda: tvm.convnext_tiny(num_classes=CLASSES),
    "vit_tiny": _vit,
}


def zoo_data(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(calibration batches [2 x (4, 3, 32, 32)], held-out batch (8, 3, 32, 32))``, standard normal."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, SIZE, SIZE, generator=g)
    return [x[:4], x[4:8]], x[8:]


def float_model(name: str) -> torch.nn.Module:
    """The seeded model in eval mode, its BatchNorm statistics from two train-mode batches of other noise."""
    torch.manual_seed(0)
    model = ZOO[name]()
    model.train()
    with torch.no_grad():
        for b in zoo_data(seed=1)[0]:
            model(b)
    return model.eval()


def zoo_case(name: str, method: str, model: torch.nn.Module | None = None) -> dict:
    """prepare -> calibrate -> VALIDATION -> convert with ``method`` on activations (min_max weights per channel).

    Returns ``sqnr_db`` (fake-quant logits vs float on the held-out batch), ``max_int_diff`` (converted vs
    fake-quant, max abs), ``float_ops`` (what convert kept in float) and ``seconds`` (the whole pipeline)."""
    model = float_model(name) if model is None else model
    calib, held_out = zoo_data()
    start = time.perf_counter()
    prepared = ck.prepare(model, ck.get_default_qconfig(method, "min_max"), (calib[0][:1],))
    ck.calibrate(prepared, calib, progress=False)
    ck.set_fake_quantize(prepared, ck.FakeQuantState.VALIDATION)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FloatOpsWarning)
        converted = ck.convert(prepared)
    with torch.no_grad():
        ref, fq, out = model(held_out), prepared(held_out), converted(held_out)
    seconds = time.perf_counter() - start
    return {"sqnr_db": float(ck.sqnr_db(ref, fq)), "max_int_diff": float((out - fq).abs().max()),
            "logit_range": float(ref.abs().max()), "float_ops": dict(converted.float_ops), "seconds": seconds}
