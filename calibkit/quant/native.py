"""An optional compiled kernel for the CPU histogram of ``|x|`` (the hot loop of the histogram observers).

Counting values into bins is a scatter of increments, which torch ops do in several passes over the data
(scale, convert to an integer index, offset, ``bincount`` with its own min/max scans). On a CPU the kernel
below does it in one pass, and also returns the largest ``|x|`` and the number of NaN/Inf values, so the
``kl`` observer needs no separate input scan. It gives exactly the counts of the torch-ops path (the same
float32 multiply and truncation; a test compares them), 2-3x faster on one core.

The C source is compiled on first use with the system C compiler (``$CC``, default ``cc``; plain ``-O3``,
no machine-specific flags, so the library is safe to share between machines) into
``$CALIBKIT_NATIVE_DIR`` (default ``~/.cache/calibkit/native``) under a name that hashes the source, the
flags and the platform, and is loaded with :mod:`ctypes`. Without a working compiler calibkit warns once
and uses the torch-ops path: results are the same, only slower. ``CALIBKIT_NATIVE=0`` turns the kernel off.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from calibkit.checks import check_int, check_number

__all__ = ["available", "abs_counts", "switched", "SOURCE", "library_path"]

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

/* Histogram of |x| for float32 x[0..n):
   counts[k] += #{i : (int32)(|x[i]| * mult) == k} for the values whose bin k is below `length`;
   stats[0] = finite values whose bin is >= length (not counted; the first `cap` of them are copied, as |x|,
   to over_values), stats[1] = NaN/Inf values (not counted); *maxabs = the largest finite |x[i]| (0 if none).
   `lanes` is scratch of 4 * length uint32: consecutive values are counted in 4 interleaved copies, so a bin
   hit by long runs of equal values (the zeros of a ReLU) is not one counter incremented back to back. */
void calibkit_abs_counts(const float *x, int64_t n, float mult, int64_t *counts, int64_t length,
                         uint32_t *lanes, int64_t *stats, float *maxabs, float *over_values, int64_t cap)
{
    const float lim = (float)length;
    const int64_t block = (int64_t)1 << 30;  /* a uint32 lane counter never overflows within a block */
    int64_t over = 0, nonfinite = 0;
    float m = 0.0f;
    for (int64_t start = 0; start < n; start += block) {
        int64_t stop = n - start > block ? start + block : n;
        uint32_t *l0 = lanes, *l1 = lanes + length, *l2 = lanes + 2 * length, *l3 = lanes + 3 * length;
        memset(lanes, 0, 4 * (size_t)length * sizeof(uint32_t));
        int64_t i = start;
        for (; i + 4 <= stop; i += 4) {
            float a0 = fabsf(x[i]), a1 = fabsf(x[i + 1]), a2 = fabsf(x[i + 2]), a3 = fabsf(x[i + 3]);
            float v0 = a0 * mult, v1 = a1 * mult, v2 = a2 * mult, v3 = a3 * mult;
            if (v0 < lim && v1 < lim && v2 < lim && v3 < lim) {  /* false for NaN */
                l0[(int32_t)v0]++; l1[(int32_t)v1]++; l2[(int32_t)v2]++; l3[(int32_t)v3]++;
                float m01 = a0 > a1 ? a0 : a1, m23 = a2 > a3 ? a2 : a3, mm = m01 > m23 ? m01 : m23;
                m = mm > m ? mm : m;
            } else {
                float a[4] = {a0, a1, a2, a3}, v[4] = {v0, v1, v2, v3};
                uint32_t *l[4] = {l0, l1, l2, l3};
                for (int k = 0; k < 4; k++) {
                    if (v[k] < lim) { l[k][(int32_t)v[k]]++; m = a[k] > m ? a[k] : m; }
                    else if (isfinite(a[k])) { if (over < cap) over_values[over] = a[k]; over++; m = a[k] > m ? a[k] : m; }
                    else nonfinite++;
                }
            }
        }
        for (; i < stop; i++) {
            float a = fabsf(x[i]), v = a * mult;
            if (v < lim) { l0[(int32_t)v]++; m = a > m ? a : m; }
            else if (isfinite(a)) { if (over < cap) over_values[over] = a; over++; m = a > m ? a : m; }
            else nonfinite++;
        }
        for (int64_t k = 0; k < length; k++)
            counts[k] += (int64_t)l0[k] + (int64_t)l1[k] + (int64_t)l2[k] + (int64_t)l3[k];
    }
    stats[0] = over;
    stats[1] = nonfinite;
    *maxabs = m;
}
"""

_FLAGS = ["-O3", "-std=c99", "-shared", "-fPIC"]
_lock = threading.Lock()
_state: dict = {}  # "lib": loaded function, or "error": why it is unavailable


def _enabled() -> bool:
    return os.environ.get("CALIBKIT_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC", "cc")) or ["cc"]


def library_path() -> pathlib.Path:
    """Where the compiled kernel is (or would be) cached: a file name that hashes the source, compiler,
    flags and platform, in ``$CALIBKIT_NATIVE_DIR`` or ``~/.cache/calibkit/native``."""
    root = os.environ.get("CALIBKIT_NATIVE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "calibkit", "native")
    key = "\n".join([SOURCE, " ".join(_compiler()), " ".join(_FLAGS), sys.platform, platform.machine()])
    return pathlib.Path(root) / f"abs_counts_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _build(path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src = pathlib.Path(tmp) / "abs_counts.c"
        src.write_text(SOURCE)
        out = pathlib.Path(tmp) / path.name
        cmd = _compiler() + _FLAGS + ["-o", str(out), str(src)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"`{' '.join(cmd)}` could not run: {e}") from None
        if res.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {(res.stderr or res.stdout).strip()[-500:]}")
        os.replace(out, path)  # atomic: concurrent builders leave one complete file


def _load():
    """The kernel function, or None (with the reason in ``_state["error"]``)."""
    with _lock:
        if "lib" in _state or "error" in _state:
            return _state.get("lib")
        try:
            path = library_path()
            if not path.exists():
                try:
                    _build(path)
                except OSError:  # cache folder not writable: build in the temp folder instead
                    path = pathlib.Path(tempfile.gettempdir()) / f"calibkit-native-{os.getuid() if hasattr(os, 'getuid') else 0}" / path.name
                    if not path.exists():
                        _build(path)
            fn = ctypes.CDLL(str(path)).calibkit_abs_counts
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64,
                           ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            _state["lib"] = fn
        except Exception as e:  # noqa: BLE001 - any failure means: use the torch-ops path
            _state["error"] = f"{type(e).__name__}: {e}"
            warnings.warn(f"calibkit: the compiled histogram kernel is unavailable ({_state['error']}); using torch "
                          "ops instead (same results, slower). Set CALIBKIT_NATIVE=0 to silence this.", RuntimeWarning,
                          stacklevel=3)
        return _state.get("lib")


def available() -> bool:
    """True when the kernel is enabled (``CALIBKIT_NATIVE`` not ``0``) and compiled/loaded; the first call
    may compile it (well under a second)."""
    return _enabled() and _load() is not None


@contextlib.contextmanager
def switched(on: bool):
    """Run a block with the kernel switched on or off (sets ``CALIBKIT_NATIVE``, restores its previous value);
    e.g. to time or compare the torch-ops path in the same process."""
    before = os.environ.get("CALIBKIT_NATIVE")
    os.environ["CALIBKIT_NATIVE"] = "1" if on else "0"  # read on every use
    try:
        yield
    finally:
        if before is None:
            del os.environ["CALIBKIT_NATIVE"]
        else:
            os.environ["CALIBKIT_NATIVE"] = before


def reset() -> None:
    """Forget the loaded kernel or the load error (the next use loads again; for tests)."""
    with _lock:
        _state.clear()


def usable(x: torch.Tensor) -> bool:
    """True when ``abs_counts`` can take ``x``: a CPU float32 tensor and the kernel available."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and available()


def abs_counts(x: torch.Tensor, mult: float, length: int, keep_over: int = 0
               ) -> tuple[torch.Tensor, int, int, float, torch.Tensor | None]:
    """One pass over CPU float32 ``x`` (any shape): the histogram of ``|x|`` with bin ``trunc(float32(|x| * mult))``.

    Args:
        x: CPU float32 tensor (made contiguous if it is not).
        mult: bins per unit of ``|x|``, a finite number > 0 (used as float32; e.g. ``1 / bin width``).
        length: number of bins, an integer >= 1.
        keep_over: also return up to this many (an integer >= 0) of the values whose bin is ``>= length``
            (default 0: none).
    Returns ``(counts, over, nonfinite, maxabs, over_values)``: int64 ``[length]`` counts of the values whose bin
    is below ``length``; the number of finite values whose bin is ``>= length`` and of NaN/Inf values (neither
    is counted); the largest finite ``|x|`` (0.0 if none); float32 ``|x|`` of the out-of-range values when
    ``0 < over <= keep_over`` (in no particular order), else None. Raises RuntimeError if the kernel is
    unavailable (check :func:`usable` first). Large tensors are split into ``torch.get_num_threads()`` parts
    counted in parallel (integer sums: the result does not depend on the split).
    """
    fn = _load() if _enabled() else None
    if fn is None:
        raise RuntimeError("the compiled histogram kernel is unavailable: check calibkit.quant.native.usable(x) first")
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise ValueError(f"abs_counts needs a CPU float32 tensor, got {x.dtype} on {x.device}")
    length = check_int("length", int(length), 1)
    mult = check_number("mult", mult, 0, math.inf, low_open=True, high_open=True)
    keep_over = check_int("keep_over", int(keep_over), 0)
    x = x.detach().contiguous().reshape(-1)
    parts = max(1, min(torch.get_num_threads(), x.numel() // PARALLEL_MIN_ELEMS))
    counts, stats, maxabs, over_buf = _run_parts(fn, x.tensor_split(parts), mult, length, keep_over)
    over, nonfinite = (int(v) for v in stats.sum(0))
    over_values = None
    if 0 < over <= keep_over:
        over_values = torch.cat([over_buf[k, :int(stats[k, 0])] for k in range(parts)])
    return counts.sum(0) if parts > 1 else counts[0], over, nonfinite, float(maxabs.max()), over_values


def _run_parts(fn, slices: tuple[torch.Tensor, ...], mult: float, length: int, keep_over: int):
    """Runs the kernel on every slice, in parallel when there are several (ctypes releases the GIL). Returns the
    per-slice ``counts`` int64 ``[P, length]``, ``stats`` int64 ``[P, 2]`` (over, nonfinite), ``maxabs``
    float32 ``[P]`` and the kept out-of-range values ``[P, max(keep_over, 1)]``."""
    parts = len(slices)
    counts = torch.zeros(parts, length, dtype=torch.int64)
    lanes = torch.empty(parts, 4 * length, dtype=torch.int32)
    stats = torch.zeros(parts, 2, dtype=torch.int64)
    maxabs = torch.zeros(parts, dtype=torch.float32)
    over_buf = torch.empty(parts, max(keep_over, 1), dtype=torch.float32)

    def run(k: int) -> None:
        xs = slices[k]
        fn(xs.data_ptr(), xs.numel(), mult, counts[k].data_ptr(), length, lanes[k].data_ptr(),
           stats[k].data_ptr(), maxabs[k:k + 1].data_ptr(), over_buf[k].data_ptr(), keep_over)

    if parts == 1:
        run(0)
    else:
        list(_pool(parts).map(run, range(parts)))
    return counts, stats, maxabs, over_buf


#: Tensors of at least twice this many elements are split over ``torch.get_num_threads()`` threads.
PARALLEL_MIN_ELEMS = 1 << 19
_pools: dict = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    with _lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="calibkit-hist")
        return pool
