"""The guide's two QAT rules, measured on the kit's model (notebook 06; docs/methods.md#fixed-or-free-feature-map-scales).

* ``fix_scales_when_good``: fixing the activation (feature-map) scales during QAT helps when calibration is already
  close to float and hurts when it is poor. :func:`fixed_free_rows` runs QAT with fixed and with free scales from
  two calibrated starts (a good and a poor activation observer) for every bit width and seed; :func:`fixed_free_record`
  classifies each start with the kit's own rule (:func:`calibkit.quant.qat.recommend_fixed_scales`: a start is
  *good* when calibration keeps all but ``threshold`` of the float model's above-chance accuracy) and expects
  ``fixed - free > 0`` from a good start and ``< 0`` from a poor one.
* ``calibration_helps_qat``: QAT should start from a calibrated model. The kit refuses QAT without scales
  (``train_qat`` raises ``CalibrationError``), so the *uncalibrated* start is what QAT without a calibration step
  amounts to: the activation observers see only the first training batch (the ``images`` images ``train_qat``'s
  seeded stream draws first, without augmentation) and then follow the training batches (free scales).
  :func:`uncalibrated_rows` runs it; :func:`calibration_helps_record` compares it with the calibrated good start,
  free scales, same seeds and budget.

Rows are flat dicts (accuracies are fractions, on the same evaluation images for every run); a seed sets both the
calibration set and the QAT data order. The noise of a difference is its spread over seeds and at least one
binomial standard error (:func:`calibkit.tutorial.guide_checks.difference_noise`); verdicts come from
:func:`calibkit.tutorial.guide_checks.judge`, one per start and bit width, combined with
:func:`~calibkit.tutorial.guide_checks.combine_verdicts`.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from calibkit.checks import check_int, check_number
from calibkit.devices import model_device
from calibkit.quant import qat
from calibkit.quant.calibrate import calibrate, evaluate
from calibkit.quant.fake_quantize import FakeQuantState, set_fake_quantize
from calibkit.quant.numerics import check_bits
from calibkit.quant.observers import check_averaging_constant
from calibkit.quant.prepare import prepare
from calibkit.quant.qconfig import QConfig, get_default_qconfig
from calibkit.tutorial.guide_checks import combine_verdicts, difference_noise, guide_check, judge
from calibkit.tutorial.settings import check_batches, mean

__all__ = ["SIZES", "QatBench", "fixed_free_rows", "uncalibrated_rows", "fixed_free_summary", "fixed_free_record",
           "calibration_helps_summary", "calibration_helps_record"]

#: Sizes of notebook 06's guide experiments per profile. Every run of the grid trains ``steps`` QAT steps of the
#: notebook's batch size (128) -- a smaller budget than the notebook's four main runs (full: 2 epochs = 782 steps;
#: smoke: 8 steps) -- and is evaluated on ``eval_images`` validation images, class-balanced (``balanced_subset``).
SIZES = {
    "full": dict(
        seeds=(0, 1),             # calibration set and QAT data order; the noise is the spread over them
        bits=(8, 4),              # activation bit widths (weights: the notebook's weight_bits)
        steps=20,                 # QAT steps per grid run (20 x 128 = 2560 images, 0.05 epoch): 20 runs ~15 min
        eval_images=2000,         # binomial noise ~0.6 points at 90 %
        uncalibrated_images=128,  # the "uncalibrated" start: scales from the first training batch only
    ),
    "smoke": dict(seeds=(0, 1), bits=(8, 4), steps=8, eval_images=1000, uncalibrated_images=128),
}


@dataclass(frozen=True)
class QatBench:
    """What every QAT run of the experiments shares: the float ``model``, the training data (``train_images`` /
    ``train_labels``, with ``augment`` and ``preprocess`` as :func:`calibkit.quant.qat.train_qat` takes them), the
    evaluation data (model-ready), the budget (``steps`` of ``batch_size`` at peak ``lr``), the activation observers'
    ``averaging_constant`` (calibration and free scales), the weight bit width and the tracing inputs."""

    model: nn.Module
    train_images: torch.Tensor
    train_labels: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor
    example_inputs: tuple
    steps: int
    batch_size: int = 128
    lr: float = 0.005
    averaging_constant: float = 0.01
    weight_bits: int = 8
    augment: Callable | None = None
    preprocess: Callable | None = None

    def __post_init__(self):
        if len(self.train_images) != len(self.train_labels) or len(self.train_labels) == 0:
            raise ValueError(f"train_images ({len(self.train_images)}) and train_labels ({len(self.train_labels)}) "
                             "must be non-empty and of equal length")
        if len(self.eval_images) != len(self.eval_labels) or len(self.eval_labels) == 0:
            raise ValueError(f"eval_images ({len(self.eval_images)}) and eval_labels ({len(self.eval_labels)}) "
                             "must be non-empty and of equal length")
        check_int("steps", self.steps, 1)
        check_int("batch_size", self.batch_size, 1, len(self.train_labels))
        check_number("lr", self.lr, 0, low_open=True)
        check_averaging_constant(self.averaging_constant)
        check_bits(self.weight_bits, "weight_bits")

    @property
    def num_images(self) -> int:
        return len(self.eval_labels)

    def qconfig(self, observer: str, bits: int) -> QConfig:
        """``observer`` on ``bits``-bit activations (with :attr:`averaging_constant`), min_max per-channel weights."""
        return get_default_qconfig(observer, activation_kwargs={"averaging_constant": self.averaging_constant},
                                   activation_bits=bits, weight_bits=self.weight_bits)

    def calibrated(self, observer: str, bits: int, batches) -> tuple[nn.Module, float]:
        """A prepared copy of the model calibrated on ``batches``, in VALIDATION, and its accuracy (PTQ)."""
        m = prepare(self.model, self.qconfig(observer, bits), self.example_inputs)
        calibrate(m, check_batches(batches), progress=False)
        set_fake_quantize(m, FakeQuantState.VALIDATION)
        return m, self.accuracy(m)

    def accuracy(self, model: nn.Module) -> float:
        return float(evaluate(model, self.eval_images, self.eval_labels, progress=False))

    def train(self, calibrated: nn.Module, fix: bool, seed: int) -> tuple[float, float]:
        """QAT of a copy of ``calibrated`` (fixed or free activation scales, QAT seed ``seed``): its accuracy and
        training seconds."""
        m = deepcopy(calibrated)
        h = qat.train_qat(m, self.train_images, self.train_labels, fix_feature_map_scales=fix,
                          epochs=self.steps * self.batch_size / len(self.train_labels), batch_size=self.batch_size,
                          lr=self.lr, augment=self.augment, preprocess=self.preprocess, seed=seed, progress=False)
        return self.accuracy(m), h["seconds"]

    def first_batch(self, seed: int, images: int) -> torch.Tensor:
        """The first ``images`` training images ``train_qat`` with ``seed`` draws (before augmentation), preprocessed."""
        idx = torch.randperm(len(self.train_labels), generator=torch.Generator().manual_seed(int(seed)))[:images]
        x = self.train_images[idx].to(model_device(self.model))
        return x if self.preprocess is None else self.preprocess(x)


def _check_grid(bits: Sequence[int], seeds: Sequence[int]) -> tuple[list[int], list[int]]:
    bits, seeds = [check_bits(b, "bits") for b in bits], [check_int("seeds", s, 0) for s in seeds]
    if not bits or not seeds:
        raise ValueError(f"bits={bits!r} and seeds={seeds!r} must not be empty")
    return bits, seeds


def fixed_free_rows(bench: QatBench, starts: Mapping[str, str], calib_sets: Mapping[int, Sequence],
                    bits: Sequence[int] = (8, 4), progress: bool = True) -> list[dict]:
    """QAT with fixed and with free activation scales from every start (``{name: activation observer}``, e.g.
    ``{"well": "mse", "poor": "min_max"}``), calibrated on ``calib_sets[seed]``, for every bit width and seed (the
    QAT seed too). Rows: ``start``, ``observer``, ``bits``, ``seed``, ``mode`` (``"fixed"`` / ``"free"``), ``ptq``
    (the calibrated start's accuracy), ``qat`` (after QAT), ``steps``, ``averaging_constant`` (the activation
    observers', in calibration and with free scales), ``seconds`` (QAT training)."""
    bits, seeds = _check_grid(bits, list(calib_sets))
    if not starts:
        raise ValueError("starts is empty: give {name: activation observer}")
    rows = []
    with tqdm(total=len(bits) * len(seeds) * len(starts) * 2, desc="QAT fixed / free", disable=not progress) as bar:
        for b in bits:
            for seed in seeds:
                for start, observer in starts.items():
                    m, ptq = bench.calibrated(observer, b, calib_sets[seed])
                    for mode in ("fixed", "free"):
                        acc, seconds = bench.train(m, mode == "fixed", seed)
                        rows.append(dict(start=start, observer=observer, bits=b, seed=seed, mode=mode, ptq=ptq,
                                         qat=acc, steps=bench.steps, averaging_constant=bench.averaging_constant, seconds=seconds))
                        bar.update()
    return rows


def uncalibrated_rows(bench: QatBench, observer: str, seeds: Sequence[int], bits: Sequence[int] = (8, 4),
                      images: int = 128, progress: bool = True) -> list[dict]:
    """QAT without a calibration step: ``observer`` on the activations sets every scale from the first ``images``
    training images of the QAT stream of ``seed`` (one calibration batch: the model's first training batch when
    ``images`` is the batch size), then the scales stay free. Rows as :func:`fixed_free_rows`, ``start``
    ``"uncalibrated"``, ``mode`` ``"free"``."""
    bits, seeds = _check_grid(bits, seeds)
    check_int("images", images, 1, len(bench.train_labels))
    rows = []
    for b in tqdm(bits, desc="QAT uncalibrated", disable=not progress):
        for seed in seeds:
            m, ptq = bench.calibrated(observer, b, [bench.first_batch(seed, images)])
            acc, seconds = bench.train(m, False, seed)
            rows.append(dict(start="uncalibrated", observer=observer, bits=b, seed=seed, mode="free", ptq=ptq,
                             qat=acc, steps=bench.steps, averaging_constant=bench.averaging_constant, seconds=seconds))
    return rows


# -- summaries and records ----------------------------------------------------------------------------------------


def _per_seed(rows: Sequence[Mapping], key: str, **match) -> dict:
    got = {r["seed"]: r[key] for r in rows if all(r[k] == v for k, v in match.items())}
    if not got:
        raise ValueError(f"no rows with {match}")
    return dict(sorted(got.items()))


def _contrast(rows: Sequence[Mapping], num_images: int, a: Mapping, b: Mapping) -> dict:
    """Mean QAT accuracies of the rows matching ``a`` and ``b`` over their common seeds, their difference and its
    noise (:func:`~calibkit.tutorial.guide_checks.difference_noise`, paired by seed)."""
    pa, pb = _per_seed(rows, "qat", **a), _per_seed(rows, "qat", **b)
    if set(pa) != set(pb):
        raise ValueError(f"rows {dict(a)} and {dict(b)} have different seeds: {sorted(pa)} vs {sorted(pb)}")
    ma, mb = mean(pa.values()), mean(pb.values())
    return dict(a=ma, b=mb, diff=ma - mb, noise=difference_noise(list(pa.values()), list(pb.values()), num_images),
                seeds=len(pa))


def _bits_of(rows: Sequence[Mapping]) -> list[int]:
    return sorted({r["bits"] for r in rows}, reverse=True)


def fixed_free_summary(rows: Sequence[Mapping], float_accuracy: float, chance_accuracy: float, num_images: int,
                       threshold: float = qat.DEFAULT_GAP_THRESHOLD) -> list[dict]:
    """One row per bit width and start of :func:`fixed_free_rows`: the mean PTQ accuracy, its ``gap`` and the
    kit's class of the start (``"good"`` when :func:`~calibkit.quant.qat.recommend_fixed_scales` says fix, else
    ``"poor"``), the mean fixed and free QAT accuracies, ``diff`` = fixed - free with its ``noise``, what the guide
    ``expect``\\ s from that class (``positive`` from a good start, ``negative`` from a poor one) and the verdict."""
    check_int("num_images", num_images, 1)
    out = []
    for b in _bits_of(rows):
        for start in dict.fromkeys(r["start"] for r in rows if r["bits"] == b):
            ptq = mean(_per_seed(rows, "ptq", bits=b, start=start, mode="fixed").values())
            rec = qat.recommend_fixed_scales(ptq, float_accuracy, chance_accuracy, threshold)
            c = _contrast(rows, num_images, dict(bits=b, start=start, mode="fixed"), dict(bits=b, start=start, mode="free"))
            expect = "positive" if rec.choice == "fixed" else "negative"
            observer = next(r["observer"] for r in rows if r["start"] == start)
            out.append(dict(bits=b, start=start, observer=observer, ptq=ptq,
                            gap=qat.relative_gap(ptq, float_accuracy, chance_accuracy),
                            rule="good" if rec.choice == "fixed" else "poor", fixed=c["a"], free=c["b"],
                            diff=c["diff"], noise=c["noise"], seeds=c["seeds"], expect=expect,
                            verdict=judge(c["diff"], c["noise"], expect)))
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def _pts(x: float) -> str:
    return f"{100 * x:+.2f} pts"


def fixed_free_record(rows: Sequence[Mapping], float_accuracy: float, chance_accuracy: float, num_images: int,
                      threshold: float = qat.DEFAULT_GAP_THRESHOLD, nominal: Sequence[str] = ("well", "poor")) -> dict:
    """The ``fix_scales_when_good`` record of :func:`fixed_free_rows`: one verdict per start and bit width
    (:func:`fixed_free_summary`), per bit width and overall combined (any disagreement: disagrees; all agree:
    agrees; else inconclusive). ``nominal``: the start meant to be good and the one meant to be poor, whose class by
    the kit's rule the note checks."""
    summary = fixed_free_summary(rows, float_accuracy, chance_accuracy, num_images, threshold)
    parts, per_bits, checks = [], [], []
    for b in _bits_of(rows):
        here = [s for s in summary if s["bits"] == b]
        parts.append(f"{b} bits: " + "; ".join(
            f"{s['start']} ({s['observer']}, PTQ {_pct(s['ptq'])}, gap {s['gap']:.3f} -> {s['rule']}): fixed "
            f"{_pct(s['fixed'])}, free {_pct(s['free'])}, fixed - free {_pts(s['diff'])} (noise {100 * s['noise']:.2f})"
            f" -> {s['verdict']}" for s in here))
        per_bits.append(f"{b} bits {combine_verdicts([s['verdict'] for s in here])}")
        for s, want in zip((next((s for s in here if s["start"] == n), None) for n in nominal), ("good", "poor")):
            if s is not None:
                checks.append(f"the {s['start']} start at {b} bits is {s['rule']} by the rule"
                              + ("" if s["rule"] == want else f" (meant to be {want})"))
    steps = sorted({r["steps"] for r in rows})
    constants = sorted({r["averaging_constant"] for r in rows})
    note = (f"Per bit width: {', '.join(per_bits)}. A start's class comes from qat.recommend_fixed_scales (gap = share "
            f"of the float model's above-chance accuracy lost by calibration, good when <= {threshold}; float "
            f"{_pct(float_accuracy)}, chance {_pct(chance_accuracy)}): {'; '.join(checks)}. The guide expects fixed > "
            "free from a good start and fixed < free from a poor one; 'inconclusive' when |fixed - free| is within "
            f"the noise: the spread of the difference over {summary[0]['seeds']} seed(s) (calibration set and QAT data "
            f"order), at least one binomial standard error on {num_images} images. Each run: "
            f"{'/'.join(map(str, steps))} QAT steps, a smaller budget than the notebook's main runs; activation averaging "
            f"constant {'/'.join(map(str, constants))} (calibration, and how far each training batch moves a free scale).")
    return guide_check("fix_scales_when_good", " | ".join(parts), combine_verdicts([s["verdict"] for s in summary]),
                       note)


def calibration_helps_summary(rows: Sequence[Mapping], num_images: int, calibrated: str = "well",
                              mode: str = "free") -> list[dict]:
    """Per bit width: the ``calibrated`` start's QAT (``mode`` scales) vs the ``"uncalibrated"`` start's (free),
    mean PTQ and QAT accuracies over the common seeds, ``diff`` = calibrated - uncalibrated with its ``noise`` and
    the verdict (the guide expects ``diff > 0``)."""
    check_int("num_images", num_images, 1)
    out = []
    for b in _bits_of([r for r in rows if r["start"] == "uncalibrated"]):
        a, u = dict(bits=b, start=calibrated, mode=mode), dict(bits=b, start="uncalibrated", mode="free")
        c = _contrast(rows, num_images, a, u)
        out.append(dict(bits=b, ptq_calibrated=mean(_per_seed(rows, "ptq", **a).values()),
                        ptq_uncalibrated=mean(_per_seed(rows, "ptq", **u).values()), calibrated=c["a"],
                        uncalibrated=c["b"], diff=c["diff"], noise=c["noise"], seeds=c["seeds"],
                        verdict=judge(c["diff"], c["noise"], "positive")))
    if not out:
        raise ValueError("rows hold no 'uncalibrated' start: add uncalibrated_rows(...)")
    return out


def calibration_helps_record(rows: Sequence[Mapping], num_images: int, calibrated: str = "well", mode: str = "free",
                             images: int = 128, calibration_images: int | None = None) -> dict:
    """The ``calibration_helps_qat`` record from :func:`fixed_free_rows` + :func:`uncalibrated_rows` rows (one
    verdict per bit width, combined as in :func:`fixed_free_record`); ``images``: the uncalibrated start's batch,
    ``calibration_images``: the size of each calibration set (said in the note when given)."""
    summary = calibration_helps_summary(rows, num_images, calibrated, mode)
    observer = next(r["observer"] for r in rows if r["start"] == "uncalibrated")
    per_bits = ", ".join(f"{s['bits']} bits {s['verdict']}" for s in summary)
    measured = " | ".join(
        f"{s['bits']} bits: PTQ calibrated {_pct(s['ptq_calibrated'])} vs uncalibrated {_pct(s['ptq_uncalibrated'])};"
        f" after QAT {_pct(s['calibrated'])} vs {_pct(s['uncalibrated'])}, calibrated - uncalibrated "
        f"{_pts(s['diff'])} (noise {100 * s['noise']:.2f}) -> {s['verdict']}" for s in summary)
    size = "" if calibration_images is None else f" of {calibration_images} images"
    c = sorted({r["averaging_constant"] for r in rows if r["start"] == "uncalibrated"})
    note = (f"Calibrated: the {calibrated} start ({observer} activations on the notebook's calibration sets{size}), "
            f"{mode} scales during QAT. Uncalibrated: the kit refuses QAT without scales, so the observers see only "
            f"the first {images} training images of the QAT stream (what QAT without a calibration step sets its scales "
            "from), then follow the training batches (free). Same seeds (calibration set and QAT data order), "
            "steps and learning rate. 'inconclusive' when the difference is within the noise: its spread over "
            f"{summary[0]['seeds']} seed(s), at least one binomial standard error on {num_images} images. Free scales "
            f"move with the averaging constant {'/'.join(map(str, c))}, so the start is forgotten faster the larger "
            f"it is. Per bit width: {per_bits}.")
    return guide_check("calibration_helps_qat", measured, combine_verdicts([s["verdict"] for s in summary]), note)
