"""Recorded numbers the code must keep reproducing (scale fingerprints, smoke-notebook accuracies).

Both were recorded before the four-floors move (``tests/data``). Float arithmetic can differ in its last bits
between CPUs (vector width, bf16 support, thread count), so the comparison is exact on the machine kind the
numbers were recorded on and within a stated tolerance elsewhere; ``machine_signature`` names that kind.
"""

import json
import platform
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data"
#: scales: relative tolerance on the recording machine / elsewhere
SCALE_RTOL = {"same": 1e-6, "other": 1e-3}
#: accuracies (fractions): absolute tolerance on the recording machine / elsewhere (2 points)
ACCURACY_ATOL = {"same": 1e-9, "other": 0.02}


def machine_signature() -> str:
    """CPU model, AVX-512, fast-bf16 support and torch version: what decides the last bits of the float results."""
    cpu, avx512 = platform.processor() or platform.machine(), False
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    for line in info:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            avx512 = " avx512f " in f" {line} "
            break
    try:
        bf16 = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = False
    return f"{cpu} | avx512={avx512} | bf16={bf16} | torch {torch.__version__}"


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def tolerance(recorded_on: str, table: dict) -> tuple[str, float]:
    kind = "same" if recorded_on == machine_signature() else "other"
    return kind, table[kind]
