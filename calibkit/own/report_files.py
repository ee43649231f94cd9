"""The files of a method comparison: ``report.json``, ``report.md`` and PNG plots, written all or nothing.

:func:`write_report` writes every file into a fresh temporary folder beside ``out`` and moves it into place with
one ``os.replace`` only when all are complete: a failure part way leaves no ``out`` (or the old one, untouched).
``out`` must not exist, be an empty folder, or ``overwrite=True``.

* ``report.json``: :meth:`calibkit.own.compare.Comparison.as_dict` plus ``meta`` (model spec, data, command);
* ``report.md``: the method table and each method's worst ops as Markdown tables;
* ``accuracy.png``: top-1 per method against the float model; ``worst_ops.png``: the worst quantizers' isolated
  SQNR per method. Drawn with matplotlib's object API (``matplotlib.figure.Figure``: no pyplot, no global
  backend), so writing a report from a notebook leaves its inline plots alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from calibkit.own.compare import WORST_KEYS, Comparison

__all__ = ["write_report", "check_out_dir", "markdown_report", "REPORT_FILES"]

REPORT_FILES = ("report.json", "report.md", "accuracy.png", "worst_ops.png")


def check_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """``out`` as a path if a report may be written there (absent, an empty folder, or ``overwrite``), else
    ``FileExistsError`` naming it. Call it before the long work so a bad ``out`` fails first."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out={str(out)!r} is a file: give a folder for the report")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"out={str(out)!r} is not empty: choose a new folder or pass --overwrite")
    return out


def _table(rows: list[dict], columns: list[str], fmt: dict[str, str]) -> list[str]:
    def cell(r, c):
        v = r.get(c)
        return "n/a" if v is None else format(v, fmt[c]) if c in fmt and isinstance(v, (int, float)) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return lines + ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]


def markdown_report(comparison: Comparison, meta: dict | None = None) -> str:
    """The comparison as Markdown: the method table (float first) and the worst ops of each method."""
    c, meta = comparison, dict(meta or {})
    rows = [{"method": "float", "top1_%": 100 * c.float_top1, "top5_%": 100 * c.float_top5}] + c.rows()
    fmt = {"top1_%": ".2f", "top5_%": ".2f", "drop_points": "+.2f", "calibration_seconds": ".2f"}
    lines = ["# Calibration methods compared", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta.items()]
    lines += [f"- calibration images: {c.calib_images}, evaluation images: {c.eval_images}",
              f"- settings: {', '.join(f'{k}={v}' for k, v in c.settings.items())}",
              f"- best top-1: **{c.best()}**", "", "## Accuracy and calibration time", ""]
    lines += _table(rows, ["method", "top1_%", "top5_%", "drop_points", "calibration_seconds"], fmt)
    wfmt = {"isolated_sqnr_db": ".2f", "accumulated_sqnr_db": ".2f", "clip_ratio": ".2e"}
    for m, r in c.methods.items():
        lines += ["", f"## Worst ops of {m} (isolated SQNR, dB; higher is better)", ""]
        lines += _table(r.worst_ops, list(WORST_KEYS), wfmt)
    return "\n".join(lines) + "\n"


def _plot_accuracy(c: Comparison, path: Path) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 3.2), dpi=100)
    ax = fig.add_subplot()
    names = list(c.methods)
    ax.bar(names, [100 * c.methods[m].top1 for m in names], color="tab:blue")
    ax.axhline(100 * c.float_top1, color="black", ls="--", label=f"float {100 * c.float_top1:.2f}%")
    lo = min([100 * c.methods[m].top1 for m in names] + [100 * c.float_top1])
    ax.set_ylim(max(0.0, lo - 5), min(100.0, 100 * c.float_top1 + 3))
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"top-1 per method ({c.eval_images} images)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def _plot_worst(c: Comparison, path: Path) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 1.2 + 0.9 * len(c.methods)), dpi=100)
    axes = fig.subplots(len(c.methods), 1, squeeze=False)[:, 0]
    for ax, (m, r) in zip(axes, c.methods.items()):
        ops = [o for o in r.worst_ops if o["isolated_sqnr_db"] is not None]
        ax.barh([o["name"] for o in ops][::-1], [o["isolated_sqnr_db"] for o in ops][::-1], color="tab:red")
        ax.set_title(m, fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("isolated SQNR (dB), worst ops")
    fig.tight_layout()
    fig.savefig(path)


def write_report(comparison: Comparison, out: str | Path, meta: dict | None = None, overwrite: bool = False) -> Path:
    """Write :data:`REPORT_FILES` for ``comparison`` into ``out`` all or nothing (module docstring); returns
    ``out``."""
    out = check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        payload = {**comparison.as_dict(), "meta": dict(meta or {})}
        (tmp / "report.json").write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
        (tmp / "report.md").write_text(markdown_report(comparison, meta))
        _plot_accuracy(comparison, tmp / "accuracy.png")
        _plot_worst(comparison, tmp / "worst_ops.png")
        old = None
        if out.exists():  # an empty folder, or overwrite: set it aside, then drop it once the new one is in
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "report")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
