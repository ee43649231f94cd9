"""Benchmark: calibkit observers vs torch.ao HistogramObserver and NVIDIA ModelOpt calibrators.

All methods see the same tensors in one run. Per method and distribution it prints

* ``collect ms/batch``: time spent observing one batch (for calibkit ``kl`` without its searches; ``kl (torch
  ops)`` is the same observer with the compiled counting kernel of ``calibkit.quant.native`` switched off),
* ``search ms``: total threshold-search time (calibkit ``kl``: all its searches inside ``forward``;
  peers: their final ``calculate_qparams`` / ``compute_amax``; other calibkit methods: reading qparams),
* ``total s`` and ``SQNR dB``: signal-to-quantization-noise ratio of the chosen range (8-bit, scale =
  ``amax / 127.5``, the calibkit scheme for every method) measured on *all* the batches,
* ratios calibkit / peer and the pass/fail of the project's targets.

Synthetic data (default): Gaussian, Laplace, Student-t(3), ReLU(Gaussian) with rare large spikes;
``--batches`` batches of ``--numel`` elements each. ``--checkpoint PATH`` adds activations recorded
with forward hooks (model input and every ``nn.ReLU`` output) from a trained calibkit CIFAR model
on ``--ckpt-batches`` calibration batches.

Usage::

    python benchmarks/observers.py                      # synthetic, 16 x 1M per distribution
    python benchmarks/observers.py --checkpoint runs/float.pt --data-dir /path/to/cifar10
    python benchmarks/observers.py --quick              # 4 x 256k, for a smoke run
    python benchmarks/observers.py --threads 1          # on a shared/busy machine: steadier timings

Peers: ``torch.ao.quantization.HistogramObserver`` (qint8, per_tensor_symmetric) and, if
``nvidia-modelopt`` is installed (``pip install calibkit[bench]``), ModelOpt's ``HistogramCalibrator``
(methods entropy, mse, percentile; one shared histogram collection) and ``MaxCalibrator``.
Not a test: the numbers depend on the machine and its load. On a machine whose cores are busy with
other work, torch's intra-op threads stall each other; ``--threads 1`` gives steadier comparisons.
"""

from __future__ import annotations

import argparse
import inspect
import math
import time
import warnings

import torch

from calibkit.quant import native
from calibkit.quant.observers import get_observer_class
from calibkit.quant.numerics import quantize_dequantize, scale_from_amax

BITS = 8
CALIBKIT = ["min_max", "percentile", "mse", "kl", "mix"]


# ---------------------------------------------------------------- data
def synthetic_batches(name: str, batches: int, numel: int, seed: int) -> list[torch.Tensor]:
    """``batches`` float32 tensors of ``numel`` values from distribution ``name`` (reproducible)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        if name == "gaussian":
            x = torch.randn(numel, generator=g)
        elif name == "laplace":
            u = torch.rand(2, numel, generator=g)  # in [0, 1): -log1p(-u) is a finite Exp(1) sample
            x = torch.log1p(-u[1]) - torch.log1p(-u[0])
        elif name == "student_t3":
            z = torch.randn(4, numel, generator=g)
            x = z[0] / (z[1:] ** 2).mean(0).sqrt()
        elif name == "relu_spikes":
            x = torch.randn(numel, generator=g).relu_()
            n_spikes = max(1, numel // 50_000)  # 0.002 %: beyond the 99.99th percentile
            idx = torch.randint(0, numel, (n_spikes,), generator=g)
            x[idx] = 60.0 + 40.0 * torch.rand(n_spikes, generator=g)
        else:
            raise ValueError(f"unknown distribution {name!r}")
        out.append(x.contiguous())
    return out


def checkpoint_activations(path: str, batches: int, batch_size: int, data_dir: str | None,
                           seed: int) -> dict[str, list]:
    """Activations of a trained calibkit model: the input and every ``nn.ReLU`` output, per batch."""
    from calibkit.cifar.checkpoint import load_checkpoint
    from calibkit.cifar.data import calibration_batches, load_cifar10

    model, _ = load_checkpoint(path)
    model.eval()
    ds = load_cifar10(data_dir)
    images = calibration_batches(ds, batches, batch_size, seed=seed)
    acts: dict[str, list] = {"input": [x.float() for x in images]}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ReLU):
            acts[name] = []
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, name=name: acts[name].append(o.detach().float().clone())))
    with torch.no_grad():
        for x in images:
            model(x)
    for h in hooks:
        h.remove()
    return {f"act:{k}": v for k, v in acts.items() if v}


# ---------------------------------------------------------------- methods
class Method:
    """A calibration method: ``collect(x)`` per batch, ``finish() -> amax``; timings recorded."""

    family = "peer"

    def __init__(self, label: str):
        self.label, self.collect_s, self.search_s, self.note = label, 0.0, 0.0, ""

    def run(self, data: list[torch.Tensor]) -> float:
        for x in data:
            t0 = time.perf_counter()
            self.collect(x)
            self.collect_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        amax = float(self.finish())
        self.search_s += time.perf_counter() - t0
        return amax


class CalibkitMethod(Method):
    family = "calibkit"

    def __init__(self, name: str, averaging_constant: float, kernel: bool = True):
        super().__init__(name if kernel else f"{name} (torch ops)")
        self.kernel = kernel
        self.obs = get_observer_class(name)(bits=BITS, averaging_constant=averaging_constant)  # other params: defaults
        self.inner_search_s = 0.0
        if name == "kl":  # kl searches inside forward: time them separately from the collection
            search = self.obs._search

            def timed_search():
                t0 = time.perf_counter()
                search()
                self.inner_search_s += time.perf_counter() - t0
            self.obs._search = timed_search

    def run(self, data):
        with native.switched(self.kernel):
            amax = super().run(data)
        self.collect_s -= self.inner_search_s
        self.search_s += self.inner_search_s
        return amax

    def collect(self, x):
        self.obs(x)

    def finish(self):
        return self.obs.get_amax()


class TorchHistogram(Method):
    def __init__(self):
        super().__init__("torch HistogramObserver")
        from torch.ao.quantization import HistogramObserver
        self.obs = HistogramObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)

    def collect(self, x):
        self.obs(x)

    def finish(self):
        scale, _ = self.obs.calculate_qparams()
        return float(scale) * (127 - (-128)) / 2  # symmetric qint8: scale = amax / 127.5


def modelopt_methods() -> tuple[list, str]:
    """ModelOpt calibrators, or ``([], why)`` when they cannot be used."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from modelopt.torch.quantization.calib import HistogramCalibrator, MaxCalibrator
            from modelopt.torch.quantization.calib import histogram as mo_hist
            from modelopt.torch.quantization.tensor_quant import FakeTensorQuantFunction
    except Exception as e:  # noqa: BLE001 - report any import failure in the table
        return [], f"nvidia-modelopt unavailable ({type(e).__name__}: {e}); pip install 'calibkit[bench]'"
    note = ""
    params = list(inspect.signature(FakeTensorQuantFunction.forward).parameters)
    if len(params) > 3 and params[3] == "bias" and mo_hist.fake_tensor_quant == FakeTensorQuantFunction.apply:
        # ModelOpt 0.47 calls fake_tensor_quant(centers, amax, num_bits, unsigned) positionally, but the
        # function's third argument is now `bias`: num_bits lands in bias and the mse result is garbage.
        mo_hist.fake_tensor_quant = lambda x, amax, num_bits, unsigned: FakeTensorQuantFunction.apply(
            x, amax, None, num_bits, unsigned)
        note = "ModelOpt mse: call of fake_tensor_quant patched (0.47 passes num_bits as `bias`)"

    class SharedHistogram:
        """One ModelOpt histogram collection shared by the three histogram methods."""

        def __init__(self):
            self.cal = HistogramCalibrator(num_bits=BITS, unsigned=False, num_bins=2048)
            self.collect_s, self.done = 0.0, False

    class ModelOptHist(Method):
        def __init__(self, method: str, shared: SharedHistogram):
            super().__init__(f"ModelOpt {method}")
            self.method, self.shared = method, shared

        def run(self, data):
            if not self.shared.done:
                for x in data:
                    t0 = time.perf_counter()
                    self.shared.cal.collect(x)
                    self.shared.collect_s += time.perf_counter() - t0
                self.shared.done = True
            self.collect_s = self.shared.collect_s
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                amax = float(self.shared.cal.compute_amax(self.method))
            self.search_s = time.perf_counter() - t0
            return amax

    class ModelOptMax(Method):
        def __init__(self):
            super().__init__("ModelOpt max")
            self.cal = MaxCalibrator(num_bits=BITS, axis=None, unsigned=False)

        def collect(self, x):
            self.cal.collect(x)

        def finish(self):
            return self.cal.compute_amax()

    def factory():
        shared = SharedHistogram()
        return [ModelOptMax(), ModelOptHist("percentile", shared), ModelOptHist("mse", shared),
                ModelOptHist("entropy", shared)]
    return [factory], note


# ---------------------------------------------------------------- measurement
def sqnr_all(data: list[torch.Tensor], amax: float) -> float:
    scale = scale_from_amax(amax, BITS)
    signal = noise = 0.0
    for x in data:
        signal += float((x.double() ** 2).sum())
        noise += float(((quantize_dequantize(x, scale, BITS) - x).double() ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def bench_one(name: str, data: list[torch.Tensor], mo_factory, repeat: int, c: float) -> list[dict]:
    """Run every method on ``data``; calibkit and torch methods ``repeat`` times (fresh state each
    time, the fastest run is kept: the machine may be shared), ModelOpt once (its searches dominate)."""
    makers = [lambda n=n: CalibkitMethod(n, c) for n in CALIBKIT] + [TorchHistogram]
    if native.available():  # the same kl observer without the compiled counting kernel, for its speed-up
        makers.insert(CALIBKIT.index("kl") + 1, lambda: CalibkitMethod("kl", c, kernel=False))
    rows = []
    for make in makers:
        runs = []
        for _ in range(repeat):
            m = make()
            amax = m.run(data)
            runs.append((m.collect_s + m.search_s, m, amax))
        _, m, amax = min(runs, key=lambda r: r[0])
        rows.append(_row(name, m, amax, data))
    for m in (mo_factory() if mo_factory is not None else []):
        rows.append(_row(name, m, m.run(data), data))
    return rows


def _row(name: str, m: Method, amax: float, data: list[torch.Tensor]) -> dict:
    return dict(dist=name, method=m.label, family=m.family, collect_ms=1e3 * m.collect_s / len(data),
                search_ms=1e3 * m.search_s, total_s=m.collect_s + m.search_s, amax=amax, sqnr=sqnr_all(data, amax))


def print_table(rows: list[dict]) -> None:
    head = (f"{'distribution':<30}{'method':<26}{'collect ms/batch':>17}{'search ms':>11}{'total s':>9}"
            f"{'amax':>10}{'SQNR dB':>9}")
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        if last is not None and r["dist"] != last:
            print()
        last = r["dist"]
        print(f"{r['dist']:<30}{r['method']:<26}{r['collect_ms']:>17.2f}{r['search_ms']:>11.1f}{r['total_s']:>9.3f}"
              f"{r['amax']:>10.4g}{r['sqnr']:>9.2f}")


def check_targets(rows: list[dict]) -> list[str]:
    """The project's targets, per distribution; returns printable lines."""
    lines = []
    for dist in dict.fromkeys(r["dist"] for r in rows):
        by = {r["method"]: r for r in rows if r["dist"] == dist}
        peers = [r for r in rows if r["dist"] == dist and r["family"] == "peer"]
        best_peer = max(peers, key=lambda r: r["sqnr"])
        ho = by["torch HistogramObserver"]
        out = [f"{dist}:"]
        for m in ("percentile", "mse"):
            ratio = by[m]["total_s"] / ho["total_s"]
            out.append(f"{m}/HistObs time {ratio:.2f} {'ok' if ratio <= 1 else 'MISSED'}")
        if "ModelOpt entropy" in by:
            ratio = by["kl"]["total_s"] / by["ModelOpt entropy"]["total_s"]
            out.append(f"kl/ModelOpt-entropy time {ratio:.3f} {'ok' if ratio <= 0.1 else 'MISSED'}")
        if "kl (torch ops)" in by:
            out.append(f"kl kernel/torch-ops time {by['kl']['total_s'] / by['kl (torch ops)']['total_s']:.2f}")
        for m in ("mse", "mix"):
            d = by[m]["sqnr"] - best_peer["sqnr"]
            out.append(f"{m} SQNR - best peer ({best_peer['method']}) {d:+.2f} dB {'ok' if d >= -0.1 else 'MISSED'}")
        lines.append("  ".join(out))
    return lines


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=16, help="batches per synthetic distribution (default 16)")
    ap.add_argument("--numel", type=int, default=1_000_000, help="elements per synthetic batch (default 1M)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dists", default="gaussian,laplace,student_t3,relu_spikes")
    ap.add_argument("--checkpoint", default=None, help="trained calibkit checkpoint: add its recorded activations")
    ap.add_argument("--data-dir", default=None, help="CIFAR-10 location for --checkpoint (see calibkit.cifar.data)")
    ap.add_argument("--ckpt-batches", type=int, default=16)
    ap.add_argument("--ckpt-batch-size", type=int, default=128)
    ap.add_argument("--no-modelopt", action="store_true", help="skip the ModelOpt peers (their entropy search is slow)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each calibkit/torch method; the fastest is kept")
    ap.add_argument("--averaging-constant", type=float, default=None,
                    help="c of the calibkit observers (default 2 / (batches + 1): the guide's advice, c ~ 0.01 "
                         "for >100 steps and larger for few steps; the peers pool all batches)")
    ap.add_argument("--quick", action="store_true", help="4 batches of 256k elements")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.numel = 4, 1 << 18
    if args.threads:
        torch.set_num_threads(args.threads)

    mo_factories, mo_note = ([], "skipped (--no-modelopt)") if args.no_modelopt else modelopt_methods()
    mo_factory = mo_factories[0] if mo_factories else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; bits={BITS}; "
          f"synthetic: {args.batches} x {args.numel} elements per distribution; "
          f"calibkit/torch times: fastest of {args.repeat} runs, ModelOpt: 1 run; calibkit c = "
          f"{args.averaging_constant if args.averaging_constant is not None else '2/(batches+1)'}")
    if mo_note:
        print("note:", mo_note)
    print("calibkit compiled histogram kernel:", f"on ({native.library_path()})" if native.available()
          else "off (torch ops; see calibkit.quant.native)")
    datasets = {d: synthetic_batches(d, args.batches, args.numel, args.seed + i)
                for i, d in enumerate(args.dists.split(",")) if d}
    if args.checkpoint:
        datasets.update(checkpoint_activations(args.checkpoint, args.ckpt_batches, args.ckpt_batch_size,
                                               args.data_dir, args.seed))
    rows = []
    t0 = time.perf_counter()
    for name, data in datasets.items():
        c = args.averaging_constant if args.averaging_constant is not None else 2 / (len(data) + 1)
        rows += bench_one(name, data, mo_factory, args.repeat, c)
        print(f"  [{name} done, {time.perf_counter() - t0:.0f} s]", flush=True)
    print()
    print_table(rows)
    print("\ntargets (time ratio calibkit/peer, SQNR difference):")
    for line in check_targets(rows):
        print(" ", line)
    if mo_factory is None:
        print("  ModelOpt targets not measured:", mo_note)
    return rows


if __name__ == "__main__":
    main()
