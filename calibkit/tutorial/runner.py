"""Execute the tutorial notebooks in order through papermill and summarize their metrics.

Used by ``make tutorial`` (default "full" parameters) and by the notebook regression tests ("smoke").
Each notebook gets ``profile`` and ``output_dir = <output_root>/<notebook stem>``; notebooks after
01 also get ``checkpoint_path = <output_root>/01_train_float/model.pt`` (the float model that
notebook 01 trained), and ``live_widgets = False`` (no browser is attached). Only parameters a
notebook declares in its ``parameters`` cell are passed.

Command line::

    python -m calibkit.tutorial.runner --profile full --output-root outputs/full [--only 03]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from calibkit.tutorial import guide_checks
from calibkit.tutorial.table import save_rows

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
CHECKPOINT_NOTEBOOK = "01_train_float"


def list_notebooks(notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """Tutorial notebooks (``NN_*.ipynb``) in execution order."""
    return sorted(p for p in Path(notebook_dir).glob("[0-9][0-9]_*.ipynb"))


def notebook_parameters(nb_path: Path, profile: str, output_root: Path, extra: dict | None = None) -> dict:
    """The papermill parameters for one notebook (only those its ``parameters`` cell declares)."""
    import papermill as pm

    declared = set(pm.inspect_notebook(str(nb_path)))
    output_root = Path(output_root).resolve()
    wanted = {
        "profile": profile,
        "output_dir": str(output_root / nb_path.stem),
        "checkpoint_path": str(output_root / CHECKPOINT_NOTEBOOK / "model.pt"),
        "live_widgets": False,  # papermill has no browser: widget cells render once, statically
        **(extra or {}),
    }
    return {k: v for k, v in wanted.items() if k in declared}


def run_notebook(nb_path: Path, profile: str, output_root: Path, extra: dict | None = None,
                 cell_timeout: int | None = None, kernel: str = "python3") -> dict:
    """Execute one notebook; returns ``{"notebook", "executed", "seconds", "metrics"}``.

    The executed copy is written to ``<output_root>/<stem>/<stem>.executed.ipynb``; the notebook
    must write ``metrics.json`` into its ``output_dir`` (a missing file raises ``RuntimeError``).
    """
    import papermill as pm

    nb_path = Path(nb_path).resolve()
    out_dir = Path(output_root).resolve() / nb_path.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / f"{nb_path.stem}.executed.ipynb"
    params = notebook_parameters(nb_path, profile, output_root, extra)
    t0 = time.perf_counter()
    pm.execute_notebook(str(nb_path), str(executed), parameters=params, kernel_name=kernel,
                        cwd=str(nb_path.parent), execution_timeout=cell_timeout, progress_bar=False)
    seconds = time.perf_counter() - t0
    metrics_path = out_dir / "metrics.json"
    if not metrics_path.exists():
        raise RuntimeError(f"{nb_path.name} ran but wrote no metrics.json into {out_dir}")
    return {"notebook": nb_path.name, "executed": str(executed), "seconds": seconds,
            "metrics": json.loads(metrics_path.read_text())}


def interactive_parameters(stem: str, profile: str | None = None, output_dir: str | None = None,
                           checkpoint_path: str | None = None, live_widgets: bool | None = None):
    """``(profile, output_dir, checkpoint_path, live_widgets)`` of a notebook opened by hand, where its parameters
    are left at None: ``$CALIBKIT_PROFILE`` (else ``"full"``); ``<root>/<stem>`` and ``<root>/01_train_float/model.pt``
    under ``$CALIBKIT_OUTPUT_ROOT`` (else ``../outputs/<profile>``); ``$CALIBKIT_LIVE_WIDGETS`` (``0``, ``false``
    or ``no``: off; else on). Values that papermill (or the user) set are kept."""
    profile = profile or os.environ.get("CALIBKIT_PROFILE", "full")
    root = os.environ.get("CALIBKIT_OUTPUT_ROOT", f"../outputs/{profile}")
    output_dir = output_dir or os.path.join(root, stem)
    checkpoint_path = checkpoint_path or os.path.join(root, CHECKPOINT_NOTEBOOK, "model.pt")
    if live_widgets is None:
        live_widgets = os.environ.get("CALIBKIT_LIVE_WIDGETS", "1").strip().lower() not in ("0", "false", "no")
    return profile, output_dir, checkpoint_path, bool(live_widgets)


def update_summary(path: Path, results: list[dict]) -> dict:
    """Write ``{notebook: {"seconds", "metrics"}}`` for ``results`` into the JSON file ``path``, keeping the
    entries of notebooks not in ``results`` (re-running one notebook with ``--only`` does not drop the
    others); an unreadable old file is replaced. Returns the summary written, in notebook order."""
    path = Path(path)
    try:
        summary = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(summary, dict):
            summary = {}
    except (OSError, ValueError):
        summary = {}
    summary.update({r["notebook"]: {"seconds": r["seconds"], "metrics": r["metrics"]} for r in results})
    summary = dict(sorted(summary.items()))
    path.write_text(json.dumps(summary, indent=2))
    return summary


def _scalar_summary(metrics: dict, limit: int = 8) -> str:
    items = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
             if isinstance(v, (int, float, str)) and not isinstance(v, bool) and (not isinstance(v, float) or math.isfinite(v))]
    return ", ".join(items[:limit])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="full", choices=["full", "smoke"])
    ap.add_argument("--output-root", default=None, help="default: outputs/<profile> in the repository")
    ap.add_argument("--only", nargs="*", default=None, help="notebook number prefixes to run, e.g. 01 03")
    ap.add_argument("--cell-timeout", type=int, default=None, help="seconds per cell (default: none)")
    args = ap.parse_args(argv)
    root = Path(args.output_root or NOTEBOOK_DIR.parent / "outputs" / args.profile).resolve()
    notebooks = [p for p in list_notebooks() if not args.only or p.name[:2] in args.only]
    results = []
    for nb in notebooks:
        print(f"[calibkit] running {nb.name} (profile={args.profile}) ...", flush=True)
        res = run_notebook(nb, args.profile, root, cell_timeout=args.cell_timeout)
        print(f"[calibkit]   done in {res['seconds']:.0f} s -> {res['executed']}", flush=True)
        results.append(res)
    update_summary(root / "summary.json", results)
    print("\n[calibkit] tutorial finished. Executed notebooks, figures and metrics are under", root)
    for r in results:
        print(f"  {r['notebook']:<32} {r['seconds']:7.0f} s  {_scalar_summary(r['metrics'])}")
    print(f"  summary of all metrics: {root / 'summary.json'}")
    rows = write_guide_table(root)
    counts = guide_checks.verdict_table(rows)
    print(f"  the guide's rules, measured: {', '.join(f'{n} {v}' for v, n in counts.items() if n)} "
          f"-> {root / 'guide_checks.csv'}")
    return 0


def write_guide_table(root: Path) -> list[dict]:
    """Every guide check the notebooks under ``root`` wrote (:func:`calibkit.tutorial.guide_checks.collect`), saved
    as ``guide_checks.csv`` / ``.json`` in ``root``; returns the rows."""
    rows = guide_checks.collect(root)
    save_rows(rows, root, "guide_checks")
    return rows


if __name__ == "__main__":
    sys.exit(main())
