"""Three knobs of the calibration guide, measured on the tutorial's model (notebook 03): a lower percentile on the
layer with the longest tail (docs/methods.md#percentile), mse's ``stride`` (docs/methods.md#mse) and kl's
``update_interval`` (docs/methods.md#kl).

Many calibrations share one float pass. In CALIBRATION the network computes in float, so an activation's observer
sees the same tensor whatever observer the other activations use. :func:`calibration_passes` runs the calibration
batches through a prepared *carrier* model (``calibrate``; its own observers are ``min_max``) and feeds every
activation's input also to one fresh observer per :class:`Config`, timing each call. A config's clips are those a
separate ``calibrate`` with that config reaches, bit for bit (tests/test_guide_knobs.py). :func:`clip_model` turns
clips into a quantized model: the carrier (weights calibrated, ``min_max`` per channel) with the activations
overridden by name (:func:`calibkit.analysis.overrides.override_quantizers`) to ``fixed_scale`` quantizers at the
clips and the config's bit width.

Calibration time of a config = the pass's own time (forward + the carrier's ``min_max`` observers, which every
method pays) + the config's observer time (its calls and its final ``get_amax``). Two configs of one pass share
the forward, so the time one saves over another is their paired observer-time difference, one sample per pass:
the median over the passes, timing noise = their spread (max - min). The noise of a difference of two accuracies
is ``hypot`` of their :func:`~calibkit.tutorial.guide_checks.accuracy_noise`. Verdicts:
:func:`calibkit.tutorial.guide_checks.judge`.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from calibkit.analysis.activation_stats import activation_quantizers
from calibkit.analysis.overrides import override_quantizers
from calibkit.analysis.selection import quantizers_enabled_only
from calibkit.quant.calibrate import calibrate, evaluate
from calibkit.quant.fake_quantize import FakeQuantState, set_fake_quantize
from calibkit.quant.numerics import quantize_dequantize, scale_from_amax, sqnr_db
from calibkit.quant.prepare import prepare
from calibkit.quant.qconfig import QuantSpec, get_default_qconfig
from calibkit.tutorial.guide_checks import accuracy_noise, combine_verdicts, guide_check, judge

__all__ = ["SIZES", "Config", "Passes", "calibration_passes", "clip_model", "layer_input", "long_tail_configs",
           "stride_configs", "interval_configs", "long_tail_rows", "long_tail_check", "stride_rows", "stride_check",
           "interval_rows", "interval_check", "spread"]

#: Sizes per profile. seeds: calibration seeds, added to the notebook's seed (0 = the notebook's calibration
#: set); repeats: timed passes per seed (every pass is one timing sample); eval_images: accuracy on this many
#: slider images, class-balanced (``balanced_subset``), the same images for every config, so the comparisons are
#: paired (the ~26 evaluations of the full model fit the full profile's budget, with its 2 passes, only on half
#: of the 2000: ~4 minutes in all); bits: activation widths of the long-tail check (8, and 4 where a clip matters
#: more); knob_bits: the width of the stride and update_interval checks (where a clip difference shows in
#: accuracy); intervals: kl update_interval values (None = the number of calibration steps); sqnr_images: images
#: (class-balanced) on which the long-tail layer's SQNR is measured.
SIZES = {
    "full": dict(seeds=[0, 1], repeats=1, eval_images=1000, bits=[8, 4], knob_bits=4, percentiles=[99.9, 99.99],
                 strides=[1, 2, 5, 10], intervals=[1, 2, 4, None], sqnr_images=256),
    "smoke": dict(seeds=[0], repeats=3, eval_images=300, bits=[8, 4], knob_bits=4, percentiles=[99.9, 99.99],
                  strides=[1, 2, 5, 10], intervals=[1, 2, 4, None], sqnr_images=128),
}


@dataclass(frozen=True)
class Config:
    """One activation calibration: ``method`` with ``params`` (``(key, value)`` pairs) at ``bits``, on every
    activation (``layer=None``) or on one, by quantizer name."""

    method: str
    bits: int
    params: tuple = ()
    layer: str | None = None

    def spec(self, averaging_constant: float) -> QuantSpec:
        return QuantSpec(self.method, self.bits, None, {**dict(self.params), "averaging_constant": averaging_constant})

    @property
    def label(self) -> str:
        p = ", ".join(f"{k}={v:g}" for k, v in self.params)
        return f"{self.method}({p}) {self.bits}-bit" + (f" on {self.layer}" if self.layer else "")


def long_tail_configs(layer: str, bits: Sequence[int], percentiles: Sequence[float]) -> list[Config]:
    """mse (the default, every activation) and each percentile on ``layer`` alone, at every width."""
    return [c for b in bits for c in [Config("mse", b, (("stride", 1),))]
            + [Config("percentile", b, (("percentile", p), ("bins", 2048)), layer) for p in percentiles]]


def stride_configs(strides: Sequence[int], bits: int) -> list[Config]:
    return [Config("mse", bits, (("stride", s),)) for s in strides]


def interval_configs(intervals: Sequence[int | None], steps: int, bits: int) -> list[Config]:
    """kl at each ``update_interval`` (``None``: ``steps``), bins 2048."""
    intervals = dict.fromkeys(steps if u is None else u for u in intervals)  # None may repeat one of them
    return [Config("kl", bits, (("bins", 2048), ("update_interval", u))) for u in intervals]


@dataclass
class Passes:
    """What :func:`calibration_passes` measured: ``clips[seed][config] = {name: amax}``; per config the samples
    (one per pass) of ``seconds`` (calibration time) and ``observer_seconds``; ``base_seconds`` per pass; the
    calibrated carrier of each seed (``models``); ``steps``: calibration batches per pass."""

    configs: list
    clips: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    observer_seconds: dict = field(default_factory=dict)
    base_seconds: list = field(default_factory=list)
    models: dict = field(default_factory=dict)
    steps: int = 0
    accuracies: dict = field(default_factory=dict)  # (seed, bits, clips, images) -> accuracy: each model once


def _one_pass(carrier: nn.Module, batches: list, configs: list, c: float, progress: bool):
    """One timed ``calibrate`` of ``carrier`` feeding every config's observers: ``(clips, observer seconds, base
    seconds)``. The configs take turns in a rotating order, so none always runs first on a fresh tensor."""
    acts = activation_quantizers(carrier)
    observers = {cfg: {n: cfg.spec(c).create_observer().eval() for n in ([cfg.layer] if cfg.layer else acts)}
                 for cfg in configs}
    spent, calls = {cfg: 0.0 for cfg in configs}, {n: 0 for n in acts}

    def feeder(name):
        def feed(module, args):
            turn, calls[name] = calls[name] % len(configs), calls[name] + 1
            for cfg in configs[turn:] + configs[:turn]:
                if name in observers[cfg]:
                    t0 = time.perf_counter()
                    observers[cfg][name](args[0].detach())
                    spent[cfg] += time.perf_counter() - t0
        return feed

    hooks = [q.register_forward_pre_hook(feeder(n)) for n, q in acts.items()]
    try:
        wall = calibrate(carrier, batches, progress=progress, reset=True)
    finally:
        for h in hooks:
            h.remove()
    base = wall - sum(spent.values())
    clips = {}
    for cfg in configs:
        t0 = time.perf_counter()
        clips[cfg] = {n: float(ob.get_amax()) for n, ob in observers[cfg].items()}
        spent[cfg] += time.perf_counter() - t0
    return clips, spent, base


def calibration_passes(model: nn.Module, calib_sets: Mapping[int, list], configs: Sequence[Config],
                       averaging_constant: float, repeats: int = 1, example_inputs=None,
                       progress: bool = False) -> Passes:
    """Calibrate every config on each seed's batches (``calib_sets``: ``{seed: batches}``, all the same length) in
    ``repeats`` shared passes per seed (module docstring). The clips of repeated passes must be identical
    (``RuntimeError`` otherwise: calibration is deterministic)."""
    configs = list(dict.fromkeys(configs))
    steps = {len(b) for b in calib_sets.values()}
    if len(steps) != 1 or repeats < 1:
        raise ValueError(f"calib_sets must hold batches of one length (got {sorted(steps)}) and repeats >= 1 "
                         f"(got {repeats})")
    out = Passes(configs, steps=steps.pop())
    qconfig = get_default_qconfig("min_max", activation_kwargs={"averaging_constant": averaging_constant})
    for seed, batches in calib_sets.items():
        carrier = prepare(model, qconfig, example_inputs or (batches[0][:2],))
        for _ in range(repeats):
            clips, spent, base = _one_pass(carrier, batches, configs, averaging_constant, progress)
            if out.clips.get(seed, clips) != clips:
                raise RuntimeError(f"seed {seed}: a repeated calibration pass gave other clips")
            out.clips[seed] = clips
            out.base_seconds.append(base)
            for cfg in configs:
                out.observer_seconds.setdefault(cfg, []).append(spent[cfg])
                out.seconds.setdefault(cfg, []).append(base + spent[cfg])
        out.models[seed] = carrier
    return out


def clip_model(carrier: nn.Module, clips: Mapping[str, float], bits: int) -> nn.Module:
    """A copy of the calibrated ``carrier`` whose named activations are ``fixed_scale`` quantizers at ``clips``
    (``{name: amax}``) and ``bits`` (a per-op override by name), in VALIDATION."""
    model = copy.deepcopy(carrier)
    override_quantizers(model, {n: QuantSpec("fixed_scale", bits, None, {"amax": a}) for n, a in clips.items()})
    return set_fake_quantize(model, FakeQuantState.VALIDATION)


def layer_input(carrier: nn.Module, name: str, images: torch.Tensor) -> torch.Tensor:
    """The float tensor the activation quantizer ``name`` sees on ``images`` (every quantizer off)."""
    seen = []
    hook = activation_quantizers(carrier)[name].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        with quantizers_enabled_only(carrier, []), torch.no_grad():
            carrier(images)
    finally:
        hook.remove()
    return seen[0]


def spread(xs: Sequence[float]) -> float:
    return max(xs) - min(xs)


def _accuracy(passes: Passes, seed: int, clips: Mapping[str, float], bits: int, images, labels) -> float:
    """Accuracy of :func:`clip_model`; a model already evaluated on the same images is not evaluated again."""
    key = (seed, bits, tuple(sorted(clips.items())), id(images), id(labels))
    if key not in passes.accuracies:
        passes.accuracies[key] = evaluate(clip_model(passes.models[seed], clips, bits), images, labels, progress=False)
    return passes.accuracies[key]


def _time_fields(passes: Passes, cfg: Config) -> dict:
    s, o = passes.seconds[cfg], passes.observer_seconds[cfg]
    return {"calib_seconds": statistics.median(s), "calib_seconds_spread": spread(s),
            "observer_seconds": statistics.median(o), "observer_seconds_spread": spread(o), "passes": len(s),
            "observer_seconds_all": list(o)}


def long_tail_rows(passes: Passes, layer: str, images, labels, layer_x: torch.Tensor, bits: Sequence[int],
                   percentiles: Sequence[float]) -> list[dict]:
    """Per width and variant (mse everywhere; each percentile on ``layer`` alone, mse elsewhere): the layer's clip
    and SQNR on ``layer_x`` (its float input on unseen images), and the accuracy per seed."""
    rows = []
    for b in bits:
        default = Config("mse", b, (("stride", 1),))
        variants = {"mse (default)": default}
        variants.update({f"percentile {p:g}": Config("percentile", b, (("percentile", p), ("bins", 2048)), layer)
                         for p in percentiles})
        for variant, cfg in variants.items():
            accs, clip = [], None
            for seed, clips in passes.clips.items():
                merged = {**clips[default], **clips[cfg]}
                clip = merged[layer] if clip is None else clip
                accs.append(_accuracy(passes, seed, merged, b, images, labels))
            x_hat = quantize_dequantize(layer_x, scale_from_amax(clip, b), b)
            rows.append({"bits": b, "variant": variant, "layer": layer, "clip_seed0": clip,
                         "layer_sqnr_db": sqnr_db(layer_x, x_hat), "accuracies": accs,
                         "accuracy": sum(accs) / len(accs)})
    return rows


def _noise(row: Mapping, num_images: int) -> float:
    return accuracy_noise(row["accuracies"], num_images)


def long_tail_check(rows: Sequence[Mapping], num_images: int) -> dict:
    """The record: at the lowest width, does percentile 99.9 beat 99.99 and the default by more than the noise?"""
    low = min(r["bits"] for r in rows)
    by = {(r["bits"], r["variant"]): r for r in rows}
    parts, measured, notes = [], [], []
    for b in sorted({r["bits"] for r in rows}, reverse=True):
        lo, hi, default = by[b, "percentile 99.9"], by[b, "percentile 99.99"], by[b, "mse (default)"]
        verdicts = [judge(lo["accuracy"] - other["accuracy"], math.hypot(_noise(lo, num_images), _noise(other, num_images)))
                    for other in (hi, default)]
        if b == low:
            parts = verdicts
        measured.append(f"{b}-bit: 99.9 {100 * lo['accuracy']:.2f} % ({lo['layer_sqnr_db']:.1f} dB), 99.99 "
                        f"{100 * hi['accuracy']:.2f} % ({hi['layer_sqnr_db']:.1f} dB), mse {100 * default['accuracy']:.2f} % "
                        f"({default['layer_sqnr_db']:.1f} dB)")
        notes.append(f"{b}-bit: 99.9 vs 99.99 {verdicts[0]}, vs mse {verdicts[1]}")
    n_seeds = len(rows[0]["accuracies"])
    note = (f"layer {rows[0]['layer']}; accuracy (mean over {n_seeds} calibration seed(s), {num_images} test images) "
            f"and the layer's SQNR; verdict at {low} bits, where a clip matters most: 99.9 must beat both by more than "
            f"the noise (hypot of each accuracy's accuracy_noise: seed spread, at least one binomial s.e.); "
            + "; ".join(notes))
    return guide_check("long_tail_99_9", "; ".join(measured), combine_verdicts(parts), note)


def stride_rows(passes: Passes, strides: Sequence[int], bits: int, images, labels) -> list[dict]:
    """Per stride: calibration and observer time (median, spread over the passes) and accuracy per seed."""
    rows = []
    for s, cfg in zip(strides, stride_configs(strides, bits)):
        accs = [_accuracy(passes, seed, clips[cfg], bits, images, labels) for seed, clips in passes.clips.items()]
        rows.append({"stride": s, "bits": bits, "accuracies": accs, "accuracy": sum(accs) / len(accs),
                     **_time_fields(passes, cfg)})
    return rows


def _time_and_accuracy(first: Mapping, last: Mapping, num_images: int) -> tuple[float, float, float, str, str]:
    """Time saved by ``last`` (paired per pass, module docstring) and accuracy it costs, with their verdicts."""
    paired = [a - b for a, b in zip(first["observer_seconds_all"], last["observer_seconds_all"])]
    saved, time_noise = statistics.median(paired), spread(paired)
    cost = first["accuracy"] - last["accuracy"]
    acc_noise = math.hypot(_noise(first, num_images), _noise(last, num_images))
    return saved, time_noise, cost, judge(saved, time_noise), judge(cost, acc_noise, expect="none")


def stride_check(rows: Sequence[Mapping], num_images: int) -> dict:
    """The record: stride 1 vs the largest stride; time saved beyond its noise and accuracy cost within noise."""
    first, last = rows[0], rows[-1]
    saved, time_noise, cost, t_verdict, a_verdict = _time_and_accuracy(first, last, num_images)
    measured = "; ".join(f"stride {r['stride']}: {r['calib_seconds']:.3f} s (+-{r['calib_seconds_spread']:.3f}), "
                         f"observers {r['observer_seconds']:.3f} s, {100 * r['accuracy']:.2f} %" for r in rows)
    note = (f"{rows[0]['bits']}-bit activations; stride {first['stride']} vs {last['stride']}: {saved:+.4f} s saved "
            f"of {first['calib_seconds']:.3f} s ({t_verdict}: paired per pass, noise = spread over {first['passes']} "
            f"passes: {time_noise:.4f} s), accuracy cost "
            f"{100 * cost:+.2f} points ({a_verdict}: within the accuracy noise counts as small); the verdict agrees "
            "only if both parts agree, disagrees if either disagrees")
    return guide_check("mse_stride_time_only", measured, combine_verdicts([t_verdict, a_verdict]), note)


def interval_rows(passes: Passes, intervals: Sequence[int | None], bits: int, images, labels) -> list[dict]:
    """Per update_interval: searches, batches left out, time (median, spread) and accuracy per seed."""
    rows = []
    for cfg in interval_configs(intervals, passes.steps, bits):
        u = dict(cfg.params)["update_interval"]
        accs = [_accuracy(passes, seed, clips[cfg], bits, images, labels) for seed, clips in passes.clips.items()]
        rows.append({"update_interval": u, "bits": bits, "searches": passes.steps // u, "left_out": passes.steps % u,
                     "accuracies": accs, "accuracy": sum(accs) / len(accs), **_time_fields(passes, cfg)})
    return rows


def interval_check(rows: Sequence[Mapping], num_images: int, error_message: str | None) -> dict:
    """The record: update_interval 1 vs the largest saves time beyond its noise, and an interval above the steps
    raised an error naming it (``error_message``: the text caught, ``None`` if nothing was raised)."""
    first, last = rows[0], rows[-1]
    saved, time_noise, cost, t_verdict, a_verdict = _time_and_accuracy(first, last, num_images)
    error_ok = error_message is not None and "update_interval" in error_message
    measured = "; ".join(f"update_interval {r['update_interval']} ({r['searches']} searches): {r['calib_seconds']:.3f} s "
                         f"(+-{r['calib_seconds_spread']:.3f}), {100 * r['accuracy']:.2f} %" for r in rows)
    measured += f"; interval above the steps: {'error: ' + error_message if error_ok else 'no error'}"
    note = (f"{rows[0]['bits']}-bit activations; interval {first['update_interval']} vs {last['update_interval']}: "
            f"{saved:+.4f} s saved of {first['calib_seconds']:.3f} s ({t_verdict}: paired per pass, noise = spread over "
            f"{first['passes']} passes: {time_noise:.4f} s); accuracy "
            f"change {100 * -cost:+.2f} points ({'within' if a_verdict == 'agrees' else 'outside'} the accuracy "
            "noise, reported, not judged: the rule names no accuracy effect); the error part "
            f"{'agrees' if error_ok else 'disagrees'}; the verdict agrees only if time and error agree")
    return guide_check("kl_update_interval", measured, combine_verdicts([t_verdict, "agrees" if error_ok else "disagrees"]), note)
