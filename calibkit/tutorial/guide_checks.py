"""The calibration guide's rules, each measured in a notebook and judged from the numbers of the run.

Every notebook that measures a rule writes one record per rule into its ``metrics.json`` under ``guide_checks``::

    {"id": "flip_ok", "rule": "<the guide's rule in one sentence>", "measured": "<the numbers>",
     "verdict": "agrees" | "disagrees" | "inconclusive", "note": "<why, including the noise>"}

:data:`RULES` lists the 20 ids, the notebook that measures each and the rule in the kit's words
(docs/methods.md#the-guide-measured). A verdict is never written in advance: :func:`judge` turns a
measured difference and its noise into one, and :func:`accuracy_noise` gives the noise of an accuracy (the spread
over calibration seeds, and never less than one binomial standard error of the images it was measured on).
:func:`collect` gathers the records of every notebook under one output root, for notebook 04's table and the
runner's summary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["RULES", "VERDICTS", "KEYS", "guide_check", "judge", "accuracy_noise", "difference_noise",
           "combine_verdicts", "describe", "check_records", "collect", "verdict_table"]

VERDICTS = ("agrees", "disagrees", "inconclusive")
KEYS = ("id", "rule", "measured", "verdict", "note")

#: id -> (notebook that measures it, the guide's rule in one sentence)
RULES: dict[str, tuple[str, str]] = {
    "avg_constant_vs_steps": ("02", "The averaging constant should be large (up to 0.5) with very few calibration "
                                    "steps and about 0.01 with more than 100 steps."),
    "batch_size_noisy_data": ("02", "Use large calibration batches, but smaller ones when the data are noisy or "
                                    "contain outliers."),
    "flip_ok": ("02", "Horizontal flips in the calibration data do no harm."),
    "no_mosaic": ("02", "Mosaic-style augmentation must not be used for calibration data."),
    "inference_preprocessing": ("02", "Calibration data should get the inference-time preprocessing, not the "
                                      "training augmentation."),
    "data_amount_10_100_steps": ("02", "10-100 or more calibration steps are needed; more data helps with "
                                       "diminishing returns."),
    "fake_quant_no_effect": ("02", "The fake-quantization setting has no effect on the scales calibration finds "
                                   "(observers see the float tensors)."),
    "long_tail_99_9": ("03", "A layer with an ultra-long tail wants a lower percentile such as 99.9."),
    "mse_stride_time_only": ("03", "mse's stride trades calibration time for a little accuracy."),
    "kl_update_interval": ("03", "kl's update_interval saves time; an interval longer than the calibration steps "
                                 "gives no scale and must be an error."),
    "percentile_tuning_gain": ("04", "Tuning percentile and bins alternately, narrowing the step, gains accuracy "
                                     "(about 10 points in the guide's example)."),
    "bins_2048_enough": ("04", "2048 histogram bins are enough; more bins change little."),
    "percentile_highest_ceiling": ("04", "A tuned percentile has the highest accuracy ceiling of the methods."),
    "mix_no_tuning": ("04", "mix needs no tuning: it depends less on its settings than the other methods on theirs."),
    "default_mse_min_max": ("04", "The recommended default is mse for activations and min_max for weights."),
    "rank_table": ("04", "Speed, accuracy and ease-of-use ranks as in the guide's method table."),
    "wide_range_weight_decay": ("05", "A very wide, spread-out activation range cannot be fixed by calibration; "
                                      "fix it in float training, e.g. with weight decay."),
    "layernorm_bigger_steps": ("05", "On LayerNorm-like outputs with a few dense spikes, the percentile must move "
                                     "in larger steps to change anything."),
    "fix_scales_when_good": ("06", "Fixing the activation scales during QAT helps when calibration is already close "
                                   "to float and hurts when it is poor."),
    "calibration_helps_qat": ("06", "QAT should start from a calibrated model."),
}


def guide_check(id: str, measured: str, verdict: str, note: str) -> dict:
    """One record for :data:`RULES` ``[id]``; the rule sentence is filled in. Unknown ids or verdicts and empty
    texts raise ``ValueError`` naming the argument."""
    if id not in RULES:
        raise ValueError(f"id={id!r} is not a guide rule: use one of {sorted(RULES)}")
    if verdict not in VERDICTS:
        raise ValueError(f"verdict={verdict!r} is not allowed: use one of {VERDICTS}")
    for name, text in (("measured", measured), ("note", note)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name}={text!r} must be a non-empty string")
    return {"id": id, "rule": RULES[id][1], "measured": measured, "verdict": verdict, "note": note}


def judge(difference: float, noise: float, expect: str = "positive") -> str:
    """The verdict on a rule that predicts the sign of ``difference``.

    ``expect``: ``"positive"`` (the rule predicts ``difference > 0``), ``"negative"``, or ``"none"`` (the rule
    predicts no difference). With ``|difference| <= noise`` the data cannot tell a sign: ``"inconclusive"`` for a
    signed prediction, ``"agrees"`` for ``"none"``; outside the noise the sign decides.
    """
    if expect not in ("positive", "negative", "none"):
        raise ValueError(f"expect={expect!r} is not allowed: use 'positive', 'negative' or 'none'")
    if not (math.isfinite(difference) and math.isfinite(noise)) or noise < 0:
        raise ValueError(f"difference={difference!r} and noise={noise!r} must be finite, noise >= 0")
    inside = abs(difference) <= noise
    if expect == "none":
        return "agrees" if inside else "disagrees"
    if inside:
        return "inconclusive"
    return "agrees" if (difference > 0) == (expect == "positive") else "disagrees"


def accuracy_noise(accuracies: Sequence[float], num_images: int) -> float:
    """The noise of an accuracy (a fraction): the spread (max - min) of ``accuracies`` measured with different
    calibration seeds, and at least one binomial standard error ``sqrt(p (1 - p) / num_images)`` at their mean
    ``p`` -- with one seed the spread is unknown and only the binomial part remains."""
    accuracies = [float(a) for a in accuracies]
    if not accuracies:
        raise ValueError("accuracies is empty: give at least one accuracy")
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images={num_images!r} is out of range: use an integer >= 1")
    p = sum(accuracies) / len(accuracies)
    return max(max(accuracies) - min(accuracies), math.sqrt(max(p * (1 - p), 0.0) / num_images))


def difference_noise(a: Sequence[float], b: Sequence[float], num_images_a: int, num_images_b: int | None = None) -> float:
    """The noise of ``mean(a) - mean(b)``, two accuracies measured with one or more calibration seeds on
    ``num_images_a`` / ``num_images_b`` images (default: the same number): the seed-to-seed spread of the
    difference ``max - min`` of ``a_i - b_i`` when both hold one value per seed (same length > 1), else the larger
    spread of ``a`` and of ``b``; and never less than the larger binomial standard error of the two accuracies
    (:func:`accuracy_noise` of each mean). Paired on the same images, the binomial part is an upper bound."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    if not a or not b:
        raise ValueError("a and b must not be empty")
    if len(a) == len(b) > 1:
        d = [x - y for x, y in zip(a, b)]
        spread = max(d) - min(d)
    else:
        spread = max(max(a) - min(a), max(b) - min(b))
    nb = num_images_a if num_images_b is None else num_images_b
    return max(spread, accuracy_noise([sum(a) / len(a)], num_images_a), accuracy_noise([sum(b) / len(b)], nb))


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """One verdict for a rule with several parts: ``disagrees`` if any part disagrees, ``agrees`` if every part
    agrees, else ``inconclusive``."""
    verdicts = list(verdicts)
    if not verdicts or any(v not in VERDICTS for v in verdicts):
        raise ValueError(f"verdicts={verdicts!r}: give one or more of {VERDICTS}")
    if "disagrees" in verdicts:
        return "disagrees"
    return "agrees" if all(v == "agrees" for v in verdicts) else "inconclusive"


_WORDS = {"agrees": "the numbers agree with the guide", "disagrees": "the numbers contradict the guide",
          "inconclusive": "the numbers cannot tell (a difference inside the noise, or only part of the rule holds)",
          "not run": "not measured yet"}


def describe(record: Mapping) -> str:
    """A record in words, for printing under its experiment: the rule, the verdict, the numbers and the note."""
    return (f"{record['id']} -- guide: {record['rule']}\n  verdict: {record['verdict'].upper()}: "
            f"{_WORDS[record['verdict']]}\n  measured: {record['measured']}\n  note: {record['note']}")


def check_records(records: Sequence[Mapping], notebook: str) -> list[str]:
    """The problems of a notebook's ``guide_checks`` list (empty when it is right): every id of ``notebook`` in
    :data:`RULES` exactly once, no other ids, the five keys, an allowed verdict, non-empty texts."""
    problems, want = [], [i for i, (nb, _) in RULES.items() if nb == notebook]
    ids = [r.get("id") for r in records]
    if sorted(ids) != sorted(want):
        problems.append(f"notebook {notebook}: ids {sorted(ids)} != {sorted(want)}")
    for r in records:
        if tuple(sorted(r)) != tuple(sorted(KEYS)):
            problems.append(f"{r.get('id')}: keys {sorted(r)} != {sorted(KEYS)}")
        if r.get("verdict") not in VERDICTS:
            problems.append(f"{r.get('id')}: verdict {r.get('verdict')!r} not in {VERDICTS}")
        for k in ("measured", "note", "rule"):
            if not isinstance(r.get(k), str) or not r.get(k, "").strip():
                problems.append(f"{r.get('id')}: {k} is empty")
    return problems


def collect(output_root: str | Path) -> list[dict]:
    """Every rule of :data:`RULES` in order, with the record the notebooks under ``output_root`` wrote (each in
    ``<root>/<NN>_*/metrics.json``) and its ``notebook``; a rule whose notebook has not run (or wrote no record)
    gets ``verdict`` ``"not run"``."""
    root, found = Path(output_root), {}
    for path in sorted(root.glob("[0-9][0-9]_*/metrics.json")):
        try:
            records = json.loads(path.read_text()).get("guide_checks", [])
        except (OSError, ValueError, AttributeError):
            continue
        for r in records if isinstance(records, list) else []:
            if isinstance(r, dict) and r.get("id") in RULES:
                found[r["id"]] = r
    rows = []
    for id, (nb, rule) in RULES.items():
        r = found.get(id) or {"id": id, "rule": rule, "measured": "-", "verdict": "not run",
                              "note": f"notebook {nb} has not written this check under {root}"}
        rows.append({"notebook": nb, **{k: r[k] for k in KEYS}})
    return rows


def verdict_table(rows: Sequence[Mapping]) -> dict[str, int]:
    """How many rows have each verdict (``agrees``, ``disagrees``, ``inconclusive``, ``not run``)."""
    counts = {v: 0 for v in (*VERDICTS, "not run")}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    return counts
