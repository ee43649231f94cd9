"""The guide's rules on calibration data and the averaging constant, measured with ``min_max`` (notebook 02).

Every experiment calibrates with ``min_max`` replayed from :class:`~calibkit.tutorial.workflow.MinMaxTrace`
recordings (one forward pass per calibration set, any averaging constant and number of steps replayed exactly) and
evaluates on a fixed labelled set; accuracies are fractions, rows are flat dicts, and one ``*_record`` function
per rule turns the rows into a :func:`calibkit.tutorial.guide_checks.guide_check` record whose verdict comes from
:func:`~calibkit.tutorial.guide_checks.judge`. Accuracies are means over the evaluated activation bit widths
(as :func:`~calibkit.tutorial.workflow.choose_min_max` averages them); the noise of a difference is its spread over
calibration seeds and at least one binomial standard error (:func:`~calibkit.tutorial.guide_checks.difference_noise`).
Calibration sets (``BatchesFn``: ``(num_batches, batch_size, seed) -> batches``) in
:mod:`calibkit.tutorial.data_sets`. See docs/methods.md#calibration-data and
docs/methods.md#choosing-batch-size-and-averaging-constant.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from calibkit.checks import check_int
from calibkit.devices import model_device
from calibkit.quant.calibrate import calibrate, evaluate
from calibkit.quant.fake_quantize import FakeQuantState, named_quantizers, set_fake_quantize
from calibkit.quant.observers import check_averaging_constant
from calibkit.quant.prepare import prepare
from calibkit.tutorial.guide_checks import accuracy_noise, combine_verdicts, difference_noise, guide_check, judge
from calibkit.tutorial.settings import (BatchesFn, QuantSetting, batches_fn, check_batches, example_inputs_of, mean,
                                        positive_ints)
from calibkit.tutorial.workflow import MinMaxTrace

__all__ = ["SIZES", "SCALE_TOLERANCE", "record_traces",
           "averaging_constant_rows", "averaging_constant_record", "data_amount_record", "calibration_set_rows",
           "SET_RULES", "set_rules_records", "batch_size_record", "fake_quant_rows", "fake_quant_record"]

#: Sizes of notebook 02's guide experiments per profile. The calibration batch size and averaging constant are the
#: ones the notebook chose; accuracies are on the notebook's slider subset (2000 test images in full, 300 in smoke),
#: at 6-bit activations (8-bit per-channel weights): at 8 bits min_max's choices move a healthy model by less than
#: the noise, at 6 bits a badly chosen range costs visibly. Full: about 6 minutes on 2 CPU cores (measured smoke
#: timings scaled; docs/methods.md#calibration-data).
SIZES = {
    "full": dict(
        seeds=(0, 1),                           # calibration seeds: the noise is their spread (>= binomial)
        bits=(6,),                              # activation bit widths every accuracy is averaged over
        constants=(0.01, 0.1, 0.5),             # averaging constants (the sweep's: its seed-0 rows are reused)
        constant_steps=(2, 16, 128),            # few / some / many steps (guide: 0.5 at 2, 0.01 beyond 100)
        curve_steps=(1, 2, 4, 8, 16, 32, 64, 128),  # the data-amount curve reaches at least these steps
        set_steps=16,                           # steps of the flip / mosaic / augmentation sets
        noisy_batch_sizes=(32, 256),            # small vs large batch, the same number of steps
        noisy_steps=16,
        noise=dict(noise_fraction=0.1, noise_std=0.1, outlier_fraction=0.01),  # data_sets.corrupt
        fake_quant_batches=8,                   # calibration batches of the fake-quant comparison
    ),
    "smoke": dict(
        seeds=(0,), bits=(6,), constants=(0.01, 0.1, 0.5), constant_steps=(2, 16, 128),
        curve_steps=(1, 2, 4, 8, 16, 32, 64, 128), set_steps=8, noisy_batch_sizes=(16, 64), noisy_steps=8,
        noise=dict(noise_fraction=0.1, noise_std=0.1, outlier_fraction=0.01), fake_quant_batches=4,
    ),
}

#: relative scale difference below which two calibrations count as giving the same scales (float32 round-off)
SCALE_TOLERANCE = 1e-6

# -- noise and verdicts ------------------------------------------------------------------------------------------


def _per_seed(rows: Sequence[Mapping], **match) -> dict:
    """``{seed: accuracy averaged over the matching rows' bit widths}``."""
    by: dict = {}
    for r in rows:
        if all(r[k] == v for k, v in match.items()):
            by.setdefault(r["seed"], []).append(r["accuracy"])
    if not by:
        raise ValueError(f"no rows with {match}")
    return {s: mean(v) for s, v in sorted(by.items())}


def _contrast(rows: Sequence[Mapping], num_images: int, a: Mapping, b: Mapping) -> dict:
    """``acc(a) - acc(b)`` (means over seeds and bit widths) with its noise (:func:`~calibkit.tutorial.guide_checks.
    difference_noise`)."""
    pa, pb = _per_seed(rows, **a), _per_seed(rows, **b)
    if set(pa) != set(pb):
        raise ValueError(f"rows {dict(a)} and {dict(b)} have different seeds: {sorted(pa)} vs {sorted(pb)}")
    ma, mb = mean(pa.values()), mean(pb.values())
    return {"a": ma, "b": mb, "diff": ma - mb, "noise": difference_noise(list(pa.values()), list(pb.values()), num_images)}


def _pts(x: float) -> str:
    return f"{100 * x:+.2f} pts"


def _judged(parts: Mapping[str, dict]) -> tuple[str, str]:
    """The combined verdict of several differences (each :func:`judge` d against its noise) and their text."""
    verdicts = {k: judge(p["diff"], p["noise"]) for k, p in parts.items()}
    text = "; ".join(f"{k}: {v} (noise {100 * parts[k]['noise']:.2f} pts)" for k, v in verdicts.items())
    return combine_verdicts(list(verdicts.values())), text


def _basis(rows: Sequence[Mapping], num_images: int) -> str:
    return (f"{len({r['seed'] for r in rows})} calibration seed(s), activation bits "
            f"{sorted({r['activation_bits'] for r in rows}, reverse=True)}, {num_images} images; noise = the seed "
            f"spread of the difference, at least one binomial standard error")


# -- the averaging constant and the amount of data (one recording per seed) ---------------------------------------


def record_traces(model: nn.Module, data, batch_size: int, num_batches: int, seeds: Sequence[int],
                  progress: bool = False) -> dict[int, MinMaxTrace]:
    """``{seed: MinMaxTrace}`` of ``num_batches`` calibration batches of ``batch_size`` per seed (``data``: an
    ``ImageTensors`` or a ``BatchesFn``; flips on), shared by :func:`averaging_constant_rows` and
    :func:`calibkit.tutorial.workflow.steps_curve`."""
    check_int("batch_size", batch_size, 1)
    check_int("num_batches", num_batches, 1)
    seeds = [check_int("seeds", s, 0) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty: give at least one calibration seed")
    get = batches_fn(data, model_device(model))
    return {s: MinMaxTrace.record(model, get(num_batches, batch_size, s), progress=progress) for s in seeds}


def averaging_constant_rows(traces: Mapping[int, MinMaxTrace], val_images: torch.Tensor, val_labels: torch.Tensor,
                            constants: Sequence[float], steps: Sequence[int], bits: Sequence[int],
                            known: Sequence[Mapping] = (), progress: bool = False) -> list[dict]:
    """Accuracy of ``min_max`` for every averaging constant x steps x activation bits x seed (``traces``: seed ->
    recording of at least ``max(steps)`` batches). Rows ``{"seed", "steps", "averaging_constant",
    "activation_bits", "accuracy"}``. ``known``: rows with those keys already measured on the same recordings and
    images (e.g. the min_max sweep's at this batch size, with its seed): taken over instead of evaluated again."""
    cs = [check_averaging_constant(c) for c in constants]
    steps, bits = positive_ints("steps", steps), positive_ints("bits", bits)
    if not cs or not traces:
        raise ValueError("constants and traces must not be empty")
    done = {(r["seed"], r["steps"], r["averaging_constant"], r["activation_bits"]): r["accuracy"] for r in known}
    rows = []
    total = len(traces) * len(steps) * len(cs) * len(bits)
    with tqdm(total=total, desc="averaging constant", disable=not progress, leave=False) as bar:
        for seed, trace in traces.items():
            for st in steps:
                for c in cs:
                    for b in bits:
                        acc = done.get((seed, st, c, b))
                        if acc is None:
                            acc = evaluate(trace.apply(c, st, b), val_images, val_labels, progress=False)
                        rows.append({"seed": seed, "steps": st, "averaging_constant": c, "activation_bits": b,
                                     "accuracy": acc})
                        bar.update(1)
    return rows


def averaging_constant_record(rows: Sequence[Mapping], num_images: int, large: float = 0.5,
                              small: float = 0.01) -> dict:
    """``avg_constant_vs_steps``: at the fewest steps the rule predicts ``acc(c=large) - acc(c=small) > 0``, at the
    most steps ``acc(small) - acc(large) > 0``; each judged against its noise, combined by
    :func:`~calibkit.tutorial.guide_checks.combine_verdicts`. ``measured`` also gives the best constant at every step count."""
    steps = sorted({r["steps"] for r in rows})
    cs = sorted({r["averaging_constant"] for r in rows})
    if large not in cs or small not in cs:
        raise ValueError(f"rows must contain the constants large={large} and small={small}, have {cs}")
    parts = []
    for st in steps:
        acc = {c: mean(_per_seed(rows, steps=st, averaging_constant=c).values()) for c in cs}
        best = max(cs, key=lambda c: (acc[c], -c))
        parts.append(f"{st} steps: best c {best:g} ({100 * acc[best]:.2f} %)")
    few = _contrast(rows, num_images, dict(steps=steps[0], averaging_constant=large),
                    dict(steps=steps[0], averaging_constant=small))
    many = _contrast(rows, num_images, dict(steps=steps[-1], averaging_constant=small),
                     dict(steps=steps[-1], averaging_constant=large))
    verdict, judged = _judged({"few steps": few, "many steps": many})
    measured = ("; ".join(parts) + f". c={large:g} - c={small:g} at {steps[0]} steps: {_pts(few['diff'])}; "
                f"c={small:g} - c={large:g} at {steps[-1]} steps: {_pts(many['diff'])}")
    note = f"{judged}. Accuracies are means over {_basis(rows, num_images)}."
    return guide_check("avg_constant_vs_steps", measured, verdict, note)


def data_amount_record(rows: Sequence[Mapping], num_images: int, min_steps: int = 8) -> dict:
    """``data_amount_10_100_steps`` from :func:`~calibkit.tutorial.workflow.steps_curve` rows.

    ``acc(s)``: mean over seeds and bit widths; noise: the largest :func:`accuracy_noise` over the step counts.
    The gain stops at the first step count after which every further gain is inside the noise. Verdict: the total
    gain ``acc(last) - acc(first)`` is judged against the noise; when it is positive beyond the noise the rule
    agrees if the gain stops at ``min_steps`` (the curve's power of two next to 10) or later, and disagrees if it
    stops earlier (fewer steps suffice)."""
    steps = sorted({r["steps"] for r in rows})
    per = {s: _per_seed(rows, steps=s) for s in steps}
    acc = {s: mean(per[s].values()) for s in steps}
    noise = max(accuracy_noise(list(per[s].values()), num_images) for s in steps)
    stop = next(s for i, s in enumerate(steps) if all(acc[t] - acc[s] <= noise for t in steps[i + 1:]))
    gain = acc[steps[-1]] - acc[steps[0]]
    verdict = judge(gain, noise)
    if verdict == "agrees" and stop < min_steps:
        verdict = "disagrees"
    half = steps[len(steps) // 2]
    measured = (", ".join(f"{s}: {100 * acc[s]:.2f} %" for s in steps) + f"; the gain stops at {stop} steps; "
                f"{steps[0]}->{half} steps {_pts(acc[half] - acc[steps[0]])}, {half}->{steps[-1]} steps "
                f"{_pts(acc[steps[-1]] - acc[half])}")
    note = (f"total gain {_pts(gain)} against noise {100 * noise:.2f} pts ({len(per[steps[0]])} seed(s), activation "
            f"bits {sorted({r['activation_bits'] for r in rows}, reverse=True)}, {num_images} images); 'agrees' needs "
            f"a gain beyond the noise that stops at >= {min_steps} steps, a stop before that means fewer steps "
            f"suffice ('disagrees'), a gain inside the noise is 'inconclusive'.")
    return guide_check("data_amount_10_100_steps", measured, verdict, note)


# -- calibration sets: flips, mosaic, training augmentation, noisy data -------------------------------------------


def calibration_set_rows(model: nn.Module, sets: Mapping[str, BatchesFn], val_images: torch.Tensor,
                         val_labels: torch.Tensor, batch_sizes: Sequence[int], steps: int, averaging_constant: float,
                         seeds: Sequence[int], bits: Sequence[int], progress: bool = False) -> list[dict]:
    """``min_max`` (``averaging_constant``, ``steps`` batches) calibrated on each set of ``sets`` (name ->
    ``BatchesFn``, e.g. from :mod:`calibkit.tutorial.data_sets`) at every batch size and seed, evaluated at every
    activation bit width. Rows ``{"set", "batch_size", "seed", "steps", "images", "activation_bits", "accuracy",
    "log2_amax"}``; ``log2_amax`` is the mean over activation quantizers of ``log2(amax)`` (sets that widen the
    ranges have a larger one)."""
    c = check_averaging_constant(averaging_constant)
    steps = check_int("steps", steps, 1)
    batch_sizes, bits = positive_ints("batch_sizes", batch_sizes), positive_ints("bits", bits)
    seeds = [check_int("seeds", s, 0) for s in seeds]
    if not sets or not seeds:
        raise ValueError("sets and seeds must not be empty")
    rows = []
    with tqdm(total=len(sets) * len(batch_sizes) * len(seeds), desc="calibration sets", disable=not progress,
              leave=False) as bar:
        for name, get in sets.items():
            for bs in batch_sizes:
                for seed in seeds:
                    trace = MinMaxTrace.record(model, get(steps, bs, seed))
                    amax = torch.stack(list(trace.amax(c, steps).values()))
                    log2_amax = float(torch.log2(amax.clamp_min(1e-12)).mean())
                    for b in bits:
                        acc = evaluate(trace.apply(c, steps, b), val_images, val_labels, progress=False)
                        rows.append({"set": name, "batch_size": bs, "seed": seed, "steps": steps, "images": bs * steps,
                                     "activation_bits": b, "accuracy": acc, "log2_amax": log2_amax})
                    bar.update(1)
    return rows


#: rule id -> (the reference set, the other set, what the rule predicts for acc(reference) - acc(other))
SET_RULES = {
    "flip_ok": ("flips", "no flips", "none"),
    "no_mosaic": ("flips", "mosaic", "positive"),
    "inference_preprocessing": ("flips", "training augmentation", "positive"),
}


def set_rules_records(rows: Sequence[Mapping], num_images: int) -> list[dict]:
    """``flip_ok``, ``no_mosaic`` and ``inference_preprocessing`` from :func:`calibration_set_rows` rows with the
    sets of :data:`SET_RULES` (one batch size): ``acc(reference) - acc(other)`` judged against its noise, ``expect``
    as the rule predicts ("none": no difference beyond the noise)."""
    records = []
    for id, (ref, other, expect) in SET_RULES.items():
        d = _contrast(rows, num_images, {"set": ref}, {"set": other})
        amax = {s: mean(r["log2_amax"] for r in rows if r["set"] == s) for s in (ref, other)}
        measured = (f"{ref}: {100 * d['a']:.2f} %, {other}: {100 * d['b']:.2f} %, difference {_pts(d['diff'])}; "
                    f"mean activation range {other} / {ref}: x{2 ** (amax[other] - amax[ref]):.3f}")
        note = (f"the rule predicts {'no difference' if expect == 'none' else 'a positive difference'}; noise "
                f"{100 * d['noise']:.2f} pts; min_max, {rows[0]['steps']} x {rows[0]['batch_size']} images; "
                f"{_basis(rows, num_images)}.")
        records.append(guide_check(id, measured, judge(d["diff"], d["noise"], expect), note))
    return records


def batch_size_record(rows: Sequence[Mapping], num_images: int) -> dict:
    """``batch_size_noisy_data`` from :func:`calibration_set_rows` rows of the sets ``"clean"`` and ``"noisy"`` at a
    small and a large batch size (same steps): the rule predicts ``acc(large) - acc(small) > 0`` on clean data and
    ``acc(small) - acc(large) > 0`` on noisy data; both judged against their noise, combined by
    :func:`~calibkit.tutorial.guide_checks.combine_verdicts`."""
    small, large = min(r["batch_size"] for r in rows), max(r["batch_size"] for r in rows)
    if small == large:
        raise ValueError("rows need two batch sizes")
    clean = _contrast(rows, num_images, dict(set="clean", batch_size=large), dict(set="clean", batch_size=small))
    noisy = _contrast(rows, num_images, dict(set="noisy", batch_size=small), dict(set="noisy", batch_size=large))
    verdict, judged = _judged({"clean": clean, "noisy": noisy})
    measured = (f"clean: batch {large} {100 * clean['a']:.2f} %, batch {small} {100 * clean['b']:.2f} % "
                f"(large - small {_pts(clean['diff'])}); noisy: batch {small} {100 * noisy['a']:.2f} %, batch {large} "
                f"{100 * noisy['b']:.2f} % (small - large {_pts(noisy['diff'])}); {rows[0]['steps']} steps each")
    note = f"{judged}. Same number of steps, so the large batches see more images; {_basis(rows, num_images)}."
    return guide_check("batch_size_noisy_data", measured, verdict, note)


# -- the fake-quant setting -----------------------------------------------------------------------------------------


def _scales(prepared: nn.Module) -> dict[str, torch.Tensor]:
    return {n: q.scale.detach().clone() for n, q in named_quantizers(set_fake_quantize(
        prepared, FakeQuantState.VALIDATION)).items()}


@torch.no_grad()
def fake_quant_rows(model: nn.Module, batches: Sequence[torch.Tensor], averaging_constant: float = 0.01,
                    example_inputs=None) -> list[dict]:
    """The scales ``min_max`` calibration finds under three fake-quant settings, one row per quantizer.

    ``calibrate``: :func:`calibkit.quant.calibrate.calibrate` (CALIBRATION: observers see float tensors);
    ``left_on``: the same after switching every quantizer's fake quantization on first (``calibrate`` sets
    CALIBRATION itself, so the flag a user leaves does not matter); ``applied``: fake quantization applied while
    observing (CALIBRATION's observers with QAT's rounding, eval mode), so downstream observers see quantized
    tensors. Rows ``{"name", "kind", "scale", "rel_left_on", "rel_applied"}``: the largest relative difference
    ``|s' - s| / s`` over the quantizer's channels."""
    batches = check_batches(batches)
    qconfig = QuantSetting("fake-quant").qconfig("min_max", averaging_constant=check_averaging_constant(
        averaging_constant))
    ex = example_inputs_of(example_inputs, batches)
    runs = {}
    for setting in ("calibrate", "left_on", "applied"):
        prepared = prepare(model, qconfig, ex)
        if setting == "applied":
            set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
        for q in named_quantizers(prepared).values():
            q.enable_fake_quant(setting != "calibrate")
        if setting == "applied":
            device = model_device(prepared)
            for b in batches:
                prepared(b.to(device))
        else:
            calibrate(prepared, batches, progress=False)
        runs[setting] = _scales(prepared)
    rows = []
    quantizers = named_quantizers(prepared)
    for name, s in runs["calibrate"].items():
        rel = {k: float(((runs[k][name] - s).abs() / s).max()) for k in ("left_on", "applied")}
        rows.append({"name": name, "kind": quantizers[name].kind, "scale": float(s.max()),
                     "rel_left_on": rel["left_on"], "rel_applied": rel["applied"]})
    return rows


def fake_quant_record(rows: Sequence[Mapping], tolerance: float = SCALE_TOLERANCE) -> dict:
    """``fake_quant_no_effect``: the largest relative scale difference between calibrating in CALIBRATION and
    calibrating with fake quantization applied while observing, judged with ``expect="none"`` against
    ``tolerance`` (float32 round-off); ``measured`` also gives the flag-left-on comparison."""
    applied = max(r["rel_applied"] for r in rows)
    left_on = max(r["rel_left_on"] for r in rows)
    moved = [r for r in rows if r["rel_applied"] > tolerance]
    first = moved[0]["name"] if moved else "-"
    measured = (f"largest relative scale difference over {len(rows)} quantizers: fake quantization applied while "
                f"observing {applied:.3g} ({len(moved)} quantizers beyond {tolerance:g}, the first in execution "
                f"order: {first}); fake-quant flag left on before calibrate(): {left_on:.3g}")
    note = (f"tolerance {tolerance:g} relative (float32 round-off). The kit's only fake-quant setting is whether "
            f"quantizers round while observing: calibrate() always turns rounding off (CALIBRATION), so a flag left "
            f"on changes nothing; applied while observing, each quantizer's rounding changes the tensors the "
            f"observers after it see, so their scales move (the model input and weights see the same data either way).")
    return guide_check("fake_quant_no_effect", measured, judge(applied, tolerance, "none"), note)
