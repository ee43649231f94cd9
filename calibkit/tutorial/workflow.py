"""The measurements behind notebook 02: the calibration workflow and the ``min_max`` first pass.

Everything here is a plain function over a float model, calibration batches and a labelled validation set
(normalized float ``[N, 3, H, W]`` images, int64 ``[N]`` labels); accuracies are fractions in [0, 1], times are
wall-clock seconds, rows are lists of flat dicts (:class:`calibkit.tutorial.table.Table`, ``save_rows``).

* :func:`calibrate_and_evaluate`: prepare -> calibrate -> VALIDATION -> accuracy, in one call
  (docs/methods.md#calibration-workflow).
* :func:`quantizer_table`: one row per quantizer of a prepared model (observer, bits, state, scale).
* :class:`MinMaxTrace`: records the per-batch min / max of every activation quantizer once, then replays
  ``min_max`` calibration for any averaging constant and any number of leading steps *bit for bit* (same float32
  operations as the observer), so a sweep costs one forward pass per batch size.
* :func:`sweep_min_max` / :func:`steps_curve` / :func:`choose_min_max`: accuracy over batch size x averaging
  constant x steps, accuracy against the number of calibration steps, and the choice
  (docs/methods.md#choosing-batch-size-and-averaging-constant).
"""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from calibkit.checks import check_int
from calibkit.devices import model_device
from calibkit.quant.batches import batch_input
from calibkit.quant.calibrate import calibrate, evaluate
from calibkit.quant.fake_quantize import FakeQuantState, named_quantizers, set_fake_quantize
from calibkit.quant.numerics import check_bits, scale_from_amax
from calibkit.quant.observers import check_averaging_constant
from calibkit.quant.prepare import prepare
from calibkit.quant.qconfig import QConfig
from calibkit.tutorial.settings import (QuantSetting, batches_fn, check_batches, example_inputs_of, mean,
                                        positive_ints)

__all__ = ["calibrate_and_evaluate", "quantizer_table", "MinMaxTrace", "sweep_min_max", "steps_curve",
           "choose_min_max"]


def calibrate_and_evaluate(model: nn.Module, qconfig: QConfig, calib: Sequence[torch.Tensor], val_images: torch.Tensor,
                           val_labels: torch.Tensor, example_inputs=None, overrides: Mapping | None = None,
                           eval_batch_size: int = 500, progress: bool = False) -> dict:
    """Prepare a copy of ``model`` with ``qconfig``, calibrate it on ``calib`` and measure accuracy.

    Args:
        model: float model in eval mode (not modified: ``prepare`` works on a copy).
        qconfig / overrides: as for :func:`calibkit.quant.prepare.prepare`.
        calib: calibration batches (normalized float ``[B, 3, H, W]`` tensors).
        val_images / val_labels: validation set (normalized float ``[N, ...]`` / int64 ``[N]``).
        example_inputs: for tracing (default: the first two images of ``calib[0]``).
    Returns ``{"accuracy": float in [0, 1], "calib_seconds": float, "prepared": the model in VALIDATION}``.
    """
    calib = check_batches(calib)
    prepared = prepare(model, qconfig, example_inputs_of(example_inputs, calib), overrides=overrides)
    seconds = calibrate(prepared, calib, progress=progress)
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    acc = evaluate(prepared, val_images, val_labels, eval_batch_size, progress=progress)
    return {"accuracy": acc, "calib_seconds": seconds, "prepared": prepared}


def quantizer_table(prepared: nn.Module) -> list[dict]:
    """One row per quantizer of a prepared model, in execution order.

    Columns: ``name``, ``kind`` (activation / weight), ``observer`` (name), ``bits``, ``granularity``
    (``"per-tensor"`` or ``"per-channel(axis k)"``), ``state`` (last ``FakeQuantState`` set, or ``None``),
    ``observing`` / ``fake_quant`` (current flags), ``steps`` (batches observed), ``scale`` and ``amax``
    (largest over channels; ``None`` until the scale is computed, i.e. before VALIDATION).
    """
    rows = []
    for name, fq in named_quantizers(prepared).items():
        obs = fq.observer
        ready = bool(torch.isfinite(fq.scale).all()) and bool((fq.scale > 0).all())
        qmin_qmax = (2 ** fq.bits - 1) / 2
        rows.append({
            "name": name, "kind": fq.kind, "observer": obs.name or type(obs).__name__, "bits": fq.bits,
            "granularity": "per-tensor" if fq.ch_axis is None else f"per-channel(axis {fq.ch_axis})",
            "state": fq.state.name if fq.state is not None else None, "observing": fq.observing,
            "fake_quant": fq.fake_quantizing, "steps": int(obs.steps),
            "scale": float(fq.scale.max()) if ready else None,
            "amax": float(fq.scale.max()) * qmin_qmax if ready else None,
        })
    return rows


def _activation_quantizers(prepared: nn.Module) -> dict:
    return {n: q for n, q in named_quantizers(prepared).items() if q.kind != "weight"}


def _record_min_max(prepared: nn.Module, batches: list, progress: bool):
    """Run ``batches`` through ``prepared`` in CALIBRATION; per activation quantizer the float32 batch min and
    max of its input (``{name: [B]}`` each), and the forward seconds of every batch."""
    acts = _activation_quantizers(prepared)
    mins, maxs = {n: [] for n in acts}, {n: [] for n in acts}

    def hook(name):
        def pre(module, args):
            lo, hi = torch.aminmax(args[0].detach().to(torch.float32))
            mins[name].append(lo.cpu())
            maxs[name].append(hi.cpu())
        return pre

    handles = [q.register_forward_pre_hook(hook(n)) for n, q in acts.items()]
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    device = model_device(prepared)
    seconds = []
    try:
        for i, b in enumerate(tqdm(batches, desc="record min/max", disable=not progress, leave=False)):
            t0 = time.perf_counter()
            prepared(batch_input(b, i).to(device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - t0)
    finally:
        for h in handles:
            h.remove()
    for q in acts.values():
        q.enable_observer(False)
    return {n: torch.stack(v) for n, v in mins.items()}, {n: torch.stack(v) for n, v in maxs.items()}, seconds


class MinMaxTrace:
    """Per-batch min / max of every activation quantizer, recorded once; ``min_max`` replayed from it.

    :meth:`record` runs the batches through a ``min_max``-prepared copy of the model once (float
    computation, as in CALIBRATION) and keeps, per activation quantizer, the float32 batch min and
    max (``mins[name]``, ``maxs[name]``: ``[B]``) and, per batch, the forward wall time
    (``batch_seconds``). Weight quantizers are calibrated by the same pass (weights are constant,
    so the averaging constant does not matter for them).

    :meth:`amax` reproduces ``MinMaxObserver(averaging_constant=c)`` after the first ``steps``
    batches bit for bit (the first batch sets min and max, then ``v <- v + c * (v_batch - v)`` in
    float32, ``amax = max(|min|, |max|)``; docs/methods.md#averaging-constant); :meth:`apply` loads those
    scales (``bits`` may differ from the recording) so the model can be evaluated in VALIDATION without
    re-running calibration.
    """

    def __init__(self, prepared: nn.Module, mins: dict[str, torch.Tensor], maxs: dict[str, torch.Tensor],
                 batch_seconds: list[float], batch_size: int):
        self.prepared, self.mins, self.maxs = prepared, mins, maxs
        self.batch_seconds, self.batch_size = list(batch_seconds), batch_size
        self.num_batches = len(self.batch_seconds)

    @classmethod
    @torch.no_grad()
    def record(cls, model: nn.Module, batches: Sequence[torch.Tensor], activation_bits: int = 8, weight_bits: int = 8,
               per_channel_weights: bool = True, example_inputs=None, progress: bool = False) -> "MinMaxTrace":
        """Record the trace of ``batches`` (list of normalized float tensors) on a prepared copy of ``model``."""
        batches = check_batches(batches)
        setting = QuantSetting("trace", activation_bits, weight_bits, per_channel_weights)
        prepared = prepare(model, setting.qconfig("min_max"), example_inputs_of(example_inputs, batches))
        mins, maxs, seconds = _record_min_max(prepared, batches, progress)
        return cls(prepared, mins, maxs, seconds, int(batch_input(batches[0], 0).shape[0]))

    def _check_steps(self, steps: int) -> int:
        return check_int("steps", steps, 1, self.num_batches, why=" (more than the recorded batches)")

    def amax(self, averaging_constant: float = 0.01, steps: int | None = None) -> dict[str, torch.Tensor]:
        """``{name: float32 [] amax}`` that ``min_max`` with ``averaging_constant`` reaches after ``steps``
        batches (default: all recorded)."""
        c = check_averaging_constant(averaging_constant)
        steps = self._check_steps(self.num_batches if steps is None else steps)
        out = {}
        for name in self.mins:
            lo, hi = self.mins[name][0].clone(), self.maxs[name][0].clone()
            for k in range(1, steps):
                lo = lo + c * (self.mins[name][k] - lo)
                hi = hi + c * (self.maxs[name][k] - hi)
            out[name] = torch.maximum(lo.abs(), hi.abs())
        return out

    def apply(self, averaging_constant: float = 0.01, steps: int | None = None, bits: int | None = None) -> nn.Module:
        """Load the replayed activation scales (``bits``: activation bit width, default as recorded) into
        the trace's prepared model and put it into VALIDATION; returns it."""
        acts = _activation_quantizers(self.prepared)
        if bits is not None:
            check_bits(bits)
        for name, a in self.amax(averaging_constant, steps).items():
            q = acts[name]
            if bits is not None:
                q.bits = q.observer.bits = bits
            q.load_scale(scale_from_amax(a, q.bits))
        return set_fake_quantize(self.prepared, FakeQuantState.VALIDATION)

    def seconds(self, steps: int | None = None) -> float:
        """Forward wall time of the first ``steps`` batches in the recording pass (seconds)."""
        return float(sum(self.batch_seconds[:self._check_steps(self.num_batches if steps is None else steps)]))


def _bits_list(activation_bits) -> list[int]:
    bits_list = [activation_bits] if isinstance(activation_bits, int) else list(activation_bits)
    for b in bits_list:
        check_bits(b, "activation_bits")
    return bits_list


def sweep_min_max(model: nn.Module, data, val_images: torch.Tensor, val_labels: torch.Tensor,
                  batch_sizes: Sequence[int] = (32, 128, 512), averaging_constants: Sequence[float] = (0.01, 0.1, 0.5),
                  steps: Sequence[int] = (2, 32), activation_bits: Sequence[int] | int = 8, weight_bits: int = 8,
                  seed: int = 0, example_inputs=None, eval_batch_size: int = 500, progress: bool = False) -> list[dict]:
    """Validation accuracy of ``min_max`` calibration over batch size x averaging constant x steps.

    Args:
        data: ``ImageTensors`` (batches drawn with :func:`calibkit.cifar.data.calibration_batches`, flips on) or
            a callable ``(num_batches, batch_size, seed) -> list of batches``.
        batch_sizes: images per calibration batch. averaging_constants: values of c in [0, 1].
        steps: numbers of calibration batches (include a few-steps case such as 2 and a many-steps case).
        activation_bits: one bit width or several (every grid point is evaluated at each).
        seed: calibration data seed. For one batch size, fewer steps use the leading batches of the
            larger run (the data are nested).
    Returns rows ``{"activation_bits", "batch_size", "averaging_constant", "steps", "images", "accuracy",
    "seconds"}`` where ``seconds`` is the forward time of those ``steps`` batches in the recording pass
    (see :class:`MinMaxTrace`; every c shares one pass per batch size).
    """
    batch_sizes, steps = positive_ints("batch_sizes", batch_sizes), positive_ints("steps", steps)
    cs = [check_averaging_constant(c) for c in averaging_constants]
    if not cs:
        raise ValueError("averaging_constants is empty: give at least one value in [0, 1]")
    bits_list = _bits_list(activation_bits)
    get = batches_fn(data, model_device(model))
    rows = []
    bar = tqdm(total=len(batch_sizes) * len(steps) * len(cs) * len(bits_list), desc="min_max sweep",
               disable=not progress, leave=False)
    for bs in batch_sizes:
        trace = MinMaxTrace.record(model, get(max(steps), bs, seed), bits_list[0], weight_bits,
                                   example_inputs=example_inputs)
        for bits in bits_list:
            for st in steps:
                for c in cs:
                    acc = evaluate(trace.apply(c, st, bits), val_images, val_labels, eval_batch_size, progress=False)
                    rows.append({"activation_bits": bits, "batch_size": bs, "averaging_constant": c, "steps": st,
                                 "images": bs * st, "accuracy": acc, "seconds": trace.seconds(st)})
                    bar.update(1)
    bar.close()
    return rows


def _given_trace(traces: Mapping[int, MinMaxTrace], seed: int, batch_size: int, weight_bits: int) -> MinMaxTrace:
    """``traces[seed]``, checked against the curve's batch size and weight bit width."""
    if seed not in traces:
        raise ValueError(f"traces has no recording for seed {seed} (it has seeds {sorted(traces)})")
    trace = traces[seed]
    wbits = {q.bits for q in named_quantizers(trace.prepared).values() if q.kind == "weight"}
    if trace.batch_size != batch_size or wbits != {weight_bits}:
        raise ValueError(f"traces[{seed}] was recorded at batch size {trace.batch_size} with {sorted(wbits)}-bit weights, "
                         f"not batch_size={batch_size}, weight_bits={weight_bits}")
    return trace


def steps_curve(model: nn.Module, data, val_images: torch.Tensor, val_labels: torch.Tensor, batch_size: int = 128,
                averaging_constant: float = 0.01, steps: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                activation_bits: Sequence[int] | int = 8, weight_bits: int = 8, seeds: Sequence[int] = (0,),
                example_inputs=None, eval_batch_size: int = 500, progress: bool = False,
                traces: Mapping[int, MinMaxTrace] | None = None) -> list[dict]:
    """Accuracy of ``min_max`` calibration against the number of calibration steps (batches).

    One recording of ``max(steps)`` batches per seed, replayed for each prefix length. Rows
    ``{"activation_bits", "seed", "steps", "images", "accuracy", "seconds"}``. Several ``seeds`` show
    how much of the curve is data noise. ``traces``: ``{seed: MinMaxTrace}`` recorded beforehand (at
    ``batch_size`` and ``weight_bits``, at least ``max(steps)`` batches) to reuse instead of recording again.
    """
    steps = sorted(set(positive_ints("steps", steps)))
    check_averaging_constant(averaging_constant)
    bits_list = _bits_list(activation_bits)
    get = batches_fn(data, model_device(model))
    rows = []
    for seed in seeds:
        trace = _given_trace(traces, seed, batch_size, weight_bits) if traces is not None else MinMaxTrace.record(
            model, get(max(steps), batch_size, seed), bits_list[0], weight_bits, example_inputs=example_inputs)
        for bits in bits_list:
            for st in tqdm(steps, desc=f"steps curve seed {seed}", disable=not progress, leave=False):
                acc = evaluate(trace.apply(averaging_constant, st, bits), val_images, val_labels, eval_batch_size,
                               progress=False)
                rows.append({"activation_bits": bits, "seed": seed, "steps": st, "images": batch_size * st,
                             "accuracy": acc, "seconds": trace.seconds(st)})
    return rows


def choose_min_max(rows: Sequence[Mapping], steps: int | None = None, activation_bits: int | None = None) -> dict:
    """Pick batch size and averaging constant from :func:`sweep_min_max` rows.

    Only rows with ``steps`` (default: the largest in the sweep) are considered; for each (batch size,
    c) the accuracy is averaged over the remaining rows (bit widths, unless ``activation_bits`` selects
    one). The best mean wins; exact ties go to the larger batch size, then the smaller c.
    Returns ``{"batch_size", "averaging_constant", "steps", "accuracy"}``.
    """
    rows = [r for r in rows if activation_bits is None or r["activation_bits"] == activation_bits]
    if not rows:
        raise ValueError("rows is empty (or no row has the requested activation_bits)")
    steps = max(r["steps"] for r in rows) if steps is None else steps
    sel = [r for r in rows if r["steps"] == steps]
    if not sel:
        raise ValueError(f"steps={steps} is not in the sweep: use one of {sorted({r['steps'] for r in rows})}")
    groups: dict[tuple, list[float]] = {}
    for r in sel:
        groups.setdefault((r["batch_size"], r["averaging_constant"]), []).append(r["accuracy"])
    (bs, c), accs = max(groups.items(), key=lambda kv: (mean(kv[1]), kv[0][0], -kv[0][1]))
    return {"batch_size": bs, "averaging_constant": c, "steps": steps, "accuracy": mean(accs)}
