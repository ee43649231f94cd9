"""Recorded numbers the code must keep reproducing (scale fingerprints, smoke-notebook accuracies).

Both were recorded before the four-floors move (``tests/data``). Float arithmetic can differ in its last bits
between CPUs (vector width, bf16 support, thread count), so the comparison is exact on the machine kind the
numbers were recorded on and within a stated tolerance elsewhere; ``machine_signature`` names that kind. The smoke
accuracies are recorded on more than one machine kind (notebook 01's bf16 training rounds differently on each, so
the later notebooks start from a slightly different float model): exact on a recorded kind, and elsewhere within
the tolerance of the range the recorded kinds span.
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


def recorded_problems(recordings: list[dict], signature: str, stem: str, metrics: dict, table: dict) -> list[str]:
    """What differs between a notebook's ``metrics`` and the smoke ``recordings`` (``{"machine", "notebooks"}``
    each): on a recorded machine kind, every value within ``table["same"]`` of that recording; elsewhere within
    ``table["other"]`` of the range the recordings span. Empty when all agree."""
    same = [r for r in recordings if r["machine"] == signature]
    used, kind = (same[:1], "same") if same else (recordings, "other")
    atol, problems = table[kind], []
    for key in used[0]["notebooks"].get(stem, {}):
        got, values = metrics, [r["notebooks"][stem][key] for r in used if key in r["notebooks"].get(stem, {})]
        for part in key.split("."):
            got = got[part]
        eps = 1e-12  # a difference of exactly `atol` images' worth passes despite float rounding
        if not min(values) - atol - eps <= got <= max(values) + atol + eps:
            problems.append(f"{stem}: {key} = {got}, recorded {values} ({kind} machine, tolerance {atol})")
    return problems
