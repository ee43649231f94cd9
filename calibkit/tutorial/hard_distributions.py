"""Two of the guide's "hard distributions" measured on real, briefly trained CIFAR models (notebook 05).

* **Wide range -> weight decay** (docs/methods.md#percentile-tuning): small float models of the smoke recipe
  (:func:`calibkit.cifar.train.train`, the one training loop) are trained with the same seed and steps at several
  weight decays. For each: the float accuracy, the activation range and the quantized accuracy (the default
  qconfig: ``mse`` activations, ``min_max`` per-channel weights) at 8 bits and at a lower activation width.
  The range of one activation is its *spread* ``max|x| / std(x)`` over the calibration batches (float tensors):
  the uniform grid has to cover ``max|x|``, so a value one standard deviation in size gets about
  ``2**(bits-1) * std / max|x|`` steps; a wide, spread-out range is a large spread. The model's range is the
  median of the spread over its activation quantizers (the model input excluded; it is the same for every model).
* **LayerNorm, larger percentile steps**: a small CIFAR ResNet with a LayerNorm over the channels after stage 2
  (:class:`LayerNormResNet`) gives a real LayerNorm output, which ``prepare`` quantizes like any other leaf op
  (``"norm.ln.out"``). With every other activation on the default qconfig, that one quantizer gets the
  ``percentile`` observer and the percentile moves in the guide's small steps (99.99 -> 99.98 -> 99.97) and in
  larger ones (99.99 -> 99.9 -> 99 -> 98); per step the clip, the layer's isolated SQNR
  (``10 log10(sum x^2 / sum (x - q(x))^2)`` over the float LayerNorm outputs of the calibration batches) and the
  accuracy. The kit's alternative (notebook 03's gallery: give such an op its own observer or bit width instead
  of tuning the percentile) is measured beside them.

One function runs each experiment and returns rows (:func:`weight_decay_rows`, :func:`layernorm_rows`), one turns
the rows into the guide-check record (:func:`weight_decay_record`, :func:`layernorm_record`). Sizes per profile:
:data:`SIZES`.
"""

from __future__ import annotations

import statistics
from typing import Sequence

import torch
from torch import nn

from calibkit.analysis.activation_stats import activation_quantizers
from calibkit.analysis.error_stats import clip_threshold
from calibkit.analysis.overrides import apply_overrides
from calibkit.checks import check_int
from calibkit.cifar.models import CifarResNet
from calibkit.cifar.train import profile_settings, train
from calibkit.quant.calibrate import calibrate, evaluate
from calibkit.quant.fake_quantize import FakeQuantState, named_quantizers, set_fake_quantize
from calibkit.quant.numerics import quantize_dequantize, sqnr_db
from calibkit.quant.prepare import prepare
from calibkit.quant.qconfig import get_default_qconfig
from calibkit.tutorial.guide_checks import accuracy_noise, guide_check, judge
from calibkit.tutorial.settings import mean

__all__ = ["SIZES", "ChannelLayerNorm", "LayerNormResNet", "train_small_model", "activation_spreads",
           "weight_decay_rows", "weight_decay_record", "layernorm_quantizer", "layernorm_rows", "layernorm_record"]

#: Sizes per profile. Every model: the smoke width (16, 32, 32) and recipe of notebook 01, ``train_images``
#: training images for ``epochs`` epochs (smoke: ~8 s a model on 2 CPU cores with bf16; full: ~45 s).
SIZES = {
    "full": dict(train_images=20000, epochs=4,
                 weight_decays=[0.0, 1.3e-3, 1e-2],   # 1.3e-3: notebook 01's recipe
                 train_seeds=[0, 1],                  # the drop's noise: its spread over training seeds
                 low_bits=4,                          # the lower activation width (8 bits shows little)
                 calib_seeds=[0, 1],                  # the LayerNorm sweep's noise: spread over calibration seeds
                 ln_bits=4,                           # the LayerNorm quantizer's width in the sweep (others 8)
                 small_steps=[99.99, 99.98, 99.97], large_steps=[99.99, 99.9, 99.0, 98.0]),
    "smoke": dict(train_images=8000, epochs=2, weight_decays=[0.0, 1.3e-3, 1e-2], train_seeds=[0], low_bits=4,
                  calib_seeds=[0], ln_bits=4, small_steps=[99.99, 99.98, 99.97], large_steps=[99.99, 99.9, 99.0, 98.0]),
}

_WIDTH = (16, 32, 32)


class ChannelLayerNorm(nn.Module):
    """``nn.LayerNorm`` over the channels of an ``[N, C, H, W]`` map (each pixel normalized over its C values),
    as in ConvNeXt / MLP-Mixer blocks: ``ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.ln = nn.LayerNorm(check_int("channels", channels, 1))

    def forward(self, x):
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LayerNormResNet(CifarResNet):
    """:class:`~calibkit.cifar.models.CifarResNet` with a :class:`ChannelLayerNorm` between stage 2 and stage 3
    (``stem -> stage1 -> stage2 -> norm -> stage3 -> head``); its output quantizer is ``"norm.ln.out"``."""

    def __init__(self, width=_WIDTH, num_classes: int = 10):
        super().__init__(width=width, num_classes=num_classes)
        self.norm = ChannelLayerNorm(self.config["width"][1])

    def forward(self, x):
        x = self.stage2(self.stage1(self.stem(x)))
        x = self.stage3(self.norm(x))
        return self.fc(self.flatten(self.pool(x)))


def train_small_model(data, weight_decay: float | None, seed: int, train_images: int, epochs: int,
                      layer_norm: bool = False, progress: bool = False, **recipe) -> tuple[nn.Module, float]:
    """A smoke-size float model (width 16/32/32, notebook 01's smoke recipe) trained on ``train_images`` training
    images of ``data`` (an ``ImageTensors``; class-balanced subset drawn with ``seed``) for ``epochs`` epochs with
    ``weight_decay`` (None: the recipe's); the init and data order are seeded by ``seed``. ``layer_norm``: a
    :class:`LayerNormResNet`.
    ``recipe``: other :func:`~calibkit.cifar.train.train` keywords replacing the smoke recipe's.
    Returns ``(model in eval mode, training seconds)``."""
    check_int("train_images", train_images, 128)
    cfg = profile_settings("smoke")
    kw = {k: v for k, v in cfg.items() if k not in ("width", "epochs", "num_train", "num_test", "eval_every")}
    kw.update(recipe, **({} if weight_decay is None else {"weight_decay": weight_decay}))
    subset = data.subset(train=train_images, test=100, seed=seed)
    torch.manual_seed(seed)
    model = LayerNormResNet(_WIDTH) if layer_norm else CifarResNet(_WIDTH)
    hist = train(model, subset, epochs, seed=seed, eval_every=0, progress=progress, **kw)
    return model.eval(), hist["train_seconds"]


def _default_qconfig(bits: int, averaging_constant: float):
    return get_default_qconfig(activation_kwargs={"averaging_constant": averaging_constant}, activation_bits=bits)


def activation_spreads(prepared: nn.Module, batches, progress: bool = False) -> tuple[float, dict[str, dict]]:
    """Calibrate ``prepared`` on ``batches`` and measure, per activation quantizer (the model input excluded),
    ``amax = max|x|``, ``std`` and ``spread = amax / std`` of the float tensor it sees. Returns
    ``(calibration seconds, {name: {"amax", "std", "spread"}})``."""
    sums: dict[str, tuple] = {}   # name -> (sum x, sum x^2, count, max|x|)

    def hook(name):
        def record(module, inputs, out):
            x = inputs[0].detach().double()
            s1, s2, n, amax = sums.get(name, (0.0, 0.0, 0, 0.0))
            sums[name] = (s1 + float(x.sum()), s2 + float((x * x).sum()), n + x.numel(),
                          max(amax, float(x.abs().max())))
        return record

    handles = [fq.register_forward_hook(hook(n)) for n, fq in activation_quantizers(prepared).items() if n != "input"]
    try:
        seconds = calibrate(prepared, batches, progress=progress)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, (s1, s2, n, amax) in sums.items():
        std = max(s2 / n - (s1 / n) ** 2, 0.0) ** 0.5
        out[name] = {"amax": amax, "std": std, "spread": amax / std if std > 0 else float("inf")}
    return seconds, out


def _quantized_accuracy(model, bits, averaging_constant, calib, images, labels) -> tuple[float, dict]:
    """Accuracy of ``model`` with the default qconfig at ``bits`` activation bits, and its activation spreads."""
    prepared = prepare(model, _default_qconfig(bits, averaging_constant), (calib[0][:2],))
    layers = activation_spreads(prepared, calib)[1]
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    return evaluate(prepared, images, labels, progress=False), layers


def weight_decay_rows(data, calib, images, labels, weight_decays: Sequence[float], train_seeds: Sequence[int],
                      train_images: int, epochs: int, low_bits: int = 4, averaging_constant: float = 0.01,
                      progress: bool = False, **recipe) -> list[dict]:
    """Train one small model per weight decay and training seed (:func:`train_small_model`) and measure it: one row
    each with ``weight_decay``, ``train_seed``, ``train_seconds``, ``float_accuracy``, the range
    (``spread_median`` / ``spread_max`` over the activation quantizers, ``amax_max``: the largest ``max|x|``),
    ``accuracy_8`` / ``accuracy_low`` (default qconfig at 8 / ``low_bits`` activation bits, ``averaging_constant``
    on every activation observer, calibrated on ``calib``) and the drops ``drop_8`` / ``drop_low`` (float minus
    quantized, on ``images`` / ``labels``)."""
    rows = []
    for wd in weight_decays:
        for seed in train_seeds:
            model, seconds = train_small_model(data, wd, seed, train_images, epochs, progress=progress, **recipe)
            fa = evaluate(model, images, labels, progress=False)
            a8, layers = _quantized_accuracy(model, 8, averaging_constant, calib, images, labels)
            alow, _ = _quantized_accuracy(model, low_bits, averaging_constant, calib, images, labels)
            spreads = [v["spread"] for v in layers.values()]
            rows.append({"weight_decay": wd, "train_seed": seed, "train_seconds": seconds, "float_accuracy": fa,
                         "spread_median": statistics.median(spreads), "spread_max": max(spreads),
                         "amax_max": max(v["amax"] for v in layers.values()), "low_bits": low_bits,
                         "accuracy_8": a8, "accuracy_low": alow, "drop_8": fa - a8, "drop_low": fa - alow})
    return rows


def _by_decay(rows, key):
    out: dict[float, list] = {}
    for r in rows:
        out.setdefault(r["weight_decay"], []).append(r[key])
    return out


def weight_decay_record(rows: Sequence[dict], num_images: int) -> dict:
    """The ``wide_range_weight_decay`` record: the smallest vs the largest weight decay. The rule predicts that the
    larger one narrows the range (a smaller median spread) and shrinks the drop at the lower activation width,
    ``difference = drop_low(smallest) - drop_low(largest) > 0``. Noise: the largest spread of a drop over training
    seeds, at least one binomial standard error of the quantized accuracy on ``num_images`` images.
    ``judge`` gives the verdict; an "agrees" whose range did not narrow becomes "inconclusive"."""
    drops, spreads = _by_decay(rows, "drop_low"), _by_decay(rows, "spread_median")
    quant = [r["accuracy_low"] for r in rows]
    lo, hi = min(drops), max(drops)
    difference = mean(drops[lo]) - mean(drops[hi])
    noise = max([max(d) - min(d) for d in drops.values()] + [accuracy_noise([mean(quant)], num_images)])
    narrowed = mean(spreads[hi]) < mean(spreads[lo])
    verdict = judge(difference, noise, "positive")
    if verdict == "agrees" and not narrowed:
        verdict = "inconclusive"
    bits = rows[0]["low_bits"]
    per = _by_decay(rows, "float_accuracy")
    measured = "; ".join(
        f"wd {wd:g}: float {100 * mean(per[wd]):.1f} %, spread {mean(spreads[wd]):.1f}, "
        f"drop 8-bit {100 * mean(_by_decay(rows, 'drop_8')[wd]):+.2f} / {bits}-bit {100 * mean(drops[wd]):+.2f} points"
        for wd in drops)
    note = (f"range = median over the activation quantizers of max|x|/std on the calibration batches; judged on the "
            f"{bits}-bit drop (the 8-bit drops are in the measured column): drop(wd {lo:g}) - drop(wd {hi:g}) = "
            f"{100 * difference:+.2f} points vs noise {100 * noise:.2f} (spread over {len(rows) // len(drops)} "
            f"training seed(s), at least one binomial SE on {num_images} images); range "
            f"{'narrowed' if narrowed else 'did not narrow'} "
            f"({mean(spreads[lo]):.1f} -> {mean(spreads[hi]):.1f})")
    return guide_check("wide_range_weight_decay", measured, verdict, note)


def layernorm_quantizer(prepared: nn.Module, model: nn.Module) -> str:
    """The name of the quantizer on the output of ``model``'s (only) ``nn.LayerNorm`` in ``prepared``: ``prepare``
    treats LayerNorm as a float leaf op and quantizes its output as ``"<module>.out"``. ``ValueError`` when
    ``model`` has no or several LayerNorms, or ``prepared`` no such quantizer."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    if len(names) != 1:
        raise ValueError(f"model has {len(names)} nn.LayerNorm modules ({names}): expected exactly one")
    name = f"{names[0]}.out"
    if name not in named_quantizers(prepared):
        raise ValueError(f"prepared model has no quantizer {name!r} on the LayerNorm output")
    return name


def _layernorm_outputs(model: nn.Module, batches) -> torch.Tensor:
    """The float outputs of ``model``'s LayerNorm on ``batches``, flattened."""
    ln = next(m for m in model.modules() if isinstance(m, nn.LayerNorm))
    seen = []
    handle = ln.register_forward_hook(lambda m, i, out: seen.append(out.detach().flatten().float()))
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        handle.remove()
    return torch.cat(seen)


def _ln_point(prepared, name, spec, batches, values, images, labels) -> dict:
    """Give quantizer ``name`` its own ``spec``, recalibrate it alone, and measure clip, isolated SQNR, accuracy."""
    apply_overrides(prepared, {name: spec}, batches, progress=False)
    fq = named_quantizers(prepared)[name]
    xq = quantize_dequantize(values, fq.scale.to(values.device), fq.bits)
    return {"clip": float(clip_threshold(fq)), "sqnr_db": float(sqnr_db(values, xq)),
            "accuracy": evaluate(prepared, images, labels, progress=False)}


def layernorm_rows(model: nn.Module, calib_sets: dict, images, labels, small_steps: Sequence[float],
                   large_steps: Sequence[float], bits: int = 8, averaging_constant: float = 0.01) -> list[dict]:
    """The percentile paths on the LayerNorm output of ``model`` (a trained :class:`LayerNormResNet`), per
    calibration seed (``calib_sets``: ``{seed: batches}``).

    Every activation gets the default qconfig at 8 bits (``averaging_constant``); the LayerNorm output quantizer
    then gets, at ``bits``, the ``percentile`` observer at each of ``small_steps`` (path ``"small"``) and
    ``large_steps`` (path ``"large"``), and the kit's alternatives (path ``"alternative"``: its own ``mse``
    observer at ``bits``, and ``mse`` at twice the bits, at most 16). Rows: ``seed``, ``path``, ``setting``,
    ``percentile`` (None for the alternatives), ``bits``, ``clip``, ``sqnr_db``, ``accuracy``; plus
    ``max_abs`` (the largest |x| of the LayerNorm output on that calibration set)."""
    rows = []
    for seed, batches in calib_sets.items():
        prepared = prepare(model, _default_qconfig(8, averaging_constant), (batches[0][:2],))
        calibrate(prepared, batches, progress=False)
        set_fake_quantize(prepared, FakeQuantState.VALIDATION)
        name = layernorm_quantizer(prepared, model)
        values = _layernorm_outputs(model, batches)
        points = [(path, f"percentile {p:g}", p, {"observer": "percentile", "percentile": p, "bits": bits,
                                                  "averaging_constant": averaging_constant})
                  for path, steps in (("small", small_steps), ("large", large_steps)) for p in steps]
        for b in dict.fromkeys((bits, min(2 * bits, 16))):
            points.append(("alternative", f"own observer: mse, {b} bits", None,
                           {"observer": "mse", "bits": b, "averaging_constant": averaging_constant}))
        for path, setting, p, spec in points:
            rows.append({"seed": seed, "path": path, "setting": setting, "percentile": p, "bits": spec["bits"],
                         "max_abs": float(values.abs().max()),
                         **_ln_point(prepared, name, spec, batches, values, images, labels)})
    return rows


def _step_changes(rows, path, key):
    """Per seed, ``|key(step i+1) - key(step i)|`` along ``path``; the mean over seeds per step."""
    by_seed: dict = {}
    for r in rows:
        if r["path"] == path:
            by_seed.setdefault(r["seed"], []).append(r[key])
    per_seed = [[abs(b - a) for a, b in zip(v, v[1:])] for v in by_seed.values()]
    return [sum(c) / len(c) for c in zip(*per_seed)]


def layernorm_record(rows: Sequence[dict], num_images: int) -> dict:
    """The ``layernorm_bigger_steps`` record. The rule predicts that the small steps change nothing (the largest
    accuracy change between neighbouring small steps inside the noise: ``judge(..., expect="none")``) while the
    larger steps do (the largest change between neighbouring large steps beyond it: ``expect="positive"``). Both
    hold: "agrees"; small steps change the accuracy: "disagrees"; neither changes it: "inconclusive". Noise: the
    largest :func:`~calibkit.tutorial.guide_checks.accuracy_noise` of one setting over the calibration seeds."""
    settings: dict = {}
    for r in rows:
        settings.setdefault(r["setting"], []).append(r["accuracy"])
    noise = max(accuracy_noise(a, num_images) for a in settings.values())
    small, large = _step_changes(rows, "small", "accuracy"), _step_changes(rows, "large", "accuracy")
    v_small, v_large = judge(max(small), noise, "none"), judge(max(large), noise, "positive")
    verdict = ("agrees" if v_large == "agrees" else "inconclusive") if v_small == "agrees" else "disagrees"
    seed0 = [r for r in rows if r["seed"] == rows[0]["seed"]]
    fmt = lambda r: f"{r['setting']}: clip {r['clip']:.3g}, {r['sqnr_db']:.1f} dB, {100 * r['accuracy']:.1f} %"
    measured = f"{seed0[0]['bits']}-bit LayerNorm output (max|x| {seed0[0]['max_abs']:.3g}): " + "; ".join(
        fmt(r) for r in seed0 if not (r["path"] == "large" and r["percentile"] == seed0[0]["percentile"]))
    clip_s, clip_l = _step_changes(rows, "small", "clip"), _step_changes(rows, "large", "clip")
    note = (f"largest accuracy change per step: small steps {100 * max(small):.2f} points, larger steps "
            f"{100 * max(large):.2f} points, vs noise {100 * noise:.2f} (spread over {len(_seeds(rows))} "
            f"calibration seed(s), at least one binomial SE on {num_images} images); largest clip change per step: "
            f"small {max(clip_s):.3g}, larger {max(clip_l):.3g}; measured at seed {rows[0]['seed']}")
    return guide_check("layernorm_bigger_steps", measured, verdict, note)


def _seeds(rows) -> list:
    return sorted({r["seed"] for r in rows})
