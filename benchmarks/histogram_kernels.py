"""How fast can one batch be histogrammed? calibkit's compiled kernel and torch-op path vs ``torch.histc`` vs
a kernel fused by ``torch.compile``.

The ``kl`` observer's time on large activations is bound by building the histogram of ``|x|`` (see
``benchmarks/observers.py``). This script times, on the same ReLU-like tensor in one run:

* ``calibkit (kernel)``: ``calibkit.quant.accumulating_histogram.AccumulatingHistogram.add`` with the compiled
  one-pass kernel of ``calibkit.quant.native`` (bins, max and NaN/Inf check in one pass; skipped with the reason if it cannot be built);
* ``calibkit (torch ops)``: the same call with ``CALIBKIT_NATIVE=0`` (min/max, scale, convert, 4-lane ``bincount``);
* ``torch.histc``: what NVIDIA ModelOpt's ``HistogramCalibrator`` and torch's ``HistogramObserver`` build on;
* ``torch.compile``: |x| * (1/width) -> int -> scatter-add fused into one loop by TorchInductor (needs a C++
  compiler on CPU; skipped with the reason if compilation fails). Its counts are checked to be identical to
  calibkit's.

It prints ms per batch (fastest of ``--repeat``) and the ratios to calibkit. Not a test; nothing is asserted.

    python benchmarks/histogram_kernels.py --numel 7870000 --threads 1
"""

import argparse
import time

import torch

from calibkit.quant import native
from calibkit.quant.accumulating_histogram import AccumulatingHistogram


def best_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=7_870_000, help="elements per batch (default: the kit model's "
                    "largest activation at batch 128, 128 x 64 x 31 x 31)")
    ap.add_argument("--bins", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.relu(torch.randn(args.numel, generator=g)) * 3  # half exact zeros, like a ReLU output

    hist = AccumulatingHistogram(args.bins)
    hist.add(x)
    length, inv = len(hist), torch.tensor(1.0 / hist.width, dtype=torch.float32)
    amax = float(x.abs().max())

    def fused(x, inv):
        idx = (x.abs() * inv).to(torch.int64)
        return torch.zeros(length, dtype=torch.int64).index_add_(0, idx, torch.ones_like(idx))

    reference = hist.counts.clone()

    def calibkit_ms(kernel: bool) -> tuple[float, str]:
        with native.switched(kernel):
            running = AccumulatingHistogram(args.bins)  # one histogram fed batch after batch, as in calibration
            running.add(x)
            same = torch.equal(running.counts, reference)
            return best_ms(lambda: running.add(x), args.repeat), f"counts identical: {same}"

    rows = [("calibkit (torch ops)", *calibkit_ms(False))]
    if native.available():
        rows.insert(0, ("calibkit (compiled kernel)", *calibkit_ms(True)))
    else:
        rows.append(("calibkit (compiled kernel)", float("nan"), "unavailable (see calibkit.quant.native)"))
    rows.append(("torch.histc (|x|, ModelOpt's way)", best_ms(lambda: torch.histc(x.abs(), length, 0, amax), args.repeat), ""))
    try:
        compiled = torch.compile(fused, dynamic=False)
        t0 = time.perf_counter()
        counts = compiled(x, inv)
        note = f"compiled in {time.perf_counter() - t0:.1f} s; counts identical: {torch.equal(counts, reference)}"
        rows.append(("torch.compile fused kernel", best_ms(lambda: compiled(x, inv), args.repeat), note))
    except Exception as e:  # noqa: BLE001 - report why the fused kernel is unavailable
        rows.append(("torch.compile fused kernel", float("nan"), f"unavailable: {type(e).__name__}: {str(e)[:120]}"))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.numel:,} elements, {length} bins")
    base = rows[0][1]
    for name, ms, note in rows:
        print(f"{name:<38} {ms:8.2f} ms   x{ms / base:5.2f} of {rows[0][0]}   {note}")


if __name__ == "__main__":
    main()
