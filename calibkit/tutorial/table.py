"""The one table type of the tutorial, and the one writer of results.

* :class:`Table`: rows of dicts that print as text, render as HTML in Jupyter and save as CSV (+ JSON).
* :func:`save_rows`: rows (or ``{key: row}``) -> ``<name>.csv`` + ``<name>.json``; :func:`save_json`: any result
  (dicts, lists, numbers, strings, tensors, dataclasses) -> JSON. Both write non-finite floats as ``null`` (an empty
  CSV cell), so every file is valid JSON / plain CSV.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["Table", "save_rows", "save_json", "jsonable"]


def jsonable(v: Any) -> Any:
    """``v`` with non-finite floats as ``None``, tuples as lists, keys as strings, tensors / arrays as lists and
    dataclasses as dicts."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if hasattr(v, "tolist") and callable(v.tolist):  # torch tensors, numpy arrays and scalars
        return jsonable(v.tolist())
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return jsonable(dataclasses.asdict(v))
    return v


def _all_columns(rows: Sequence[Mapping]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _write_csv(path: Path, rows: Sequence[Mapping], columns: Sequence[str]) -> Path:
    """The one CSV writer: raw values, lists / dicts as JSON text, ``None`` and non-finite floats as empty cells."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            r = jsonable(dict(r))
            w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return path


def save_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as JSON (see :func:`jsonable`; non-finite floats as ``null``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(obj), indent=1))
    return path


def save_rows(rows: Sequence[Mapping] | Mapping[str, Mapping], output_dir: str | Path, name: str) -> dict[str, Path]:
    """Write ``rows`` (list of flat dicts) as ``<output_dir>/<name>.csv`` and ``<name>.json``.

    A mapping ``{key: dict}`` is written as rows with the key in a first column ``"key"``. The CSV has every
    column any row has; lists in cells are JSON text there. Returns ``{"csv": path, "json": path}``.
    """
    if isinstance(rows, Mapping):
        rows = [{"key": k, **dict(v)} for k, v in rows.items()]
    rows = [dict(r) for r in rows]
    out = Path(output_dir)
    csv_path = _write_csv(out / f"{name}.csv", rows, _all_columns(rows))
    return {"csv": csv_path, "json": save_json(rows, out / f"{name}.json")}


class Table:
    """A small table (list of row dicts) that prints as text, renders as HTML in Jupyter and saves as CSV / JSON.

    Args:
        rows: list of dicts; ``columns``: keys to show, in order (default: every key of the rows, in order of
        appearance); formats: per-column format spec (e.g. ``{"sqnr": ".2f"}``); title: optional caption;
        float_format: format of the other float columns (default ``.4g``).
    """

    def __init__(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                 formats: Mapping[str, str] | None = None, title: str = "", *, float_format: str = ".4g"):
        self.rows = [dict(r) for r in rows]
        self.columns = list(columns) if columns is not None else _all_columns(self.rows)
        self.formats = dict(formats or {})
        self.title = title
        self.float_format = float_format

    def _cell(self, col: str, v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if math.isinf(v):
                return "inf" if v > 0 else "-inf"
            return format(v, self.formats.get(col, self.float_format))
        if col in self.formats and isinstance(v, int) and not isinstance(v, bool):
            return format(v, self.formats[col])
        return str(v)

    def cells(self) -> list[list[str]]:
        return [[self._cell(c, r.get(c)) for c in self.columns] for r in self.rows]

    def to_text(self) -> str:
        cells = self.cells()
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(self.columns)]

        def line(vals):
            return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))

        out = [self.title] if self.title else []
        out += [line(self.columns), line(["-" * w for w in widths])] + [line(r) for r in cells]
        return "\n".join(out)

    __str__ = to_text

    def __repr__(self) -> str:
        return self.to_text()

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in self.cells())
        cap = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def to_csv(self, path: str | Path) -> Path:
        """Write the raw values (not the formatted cells) of the shown columns to ``path``; returns it."""
        return _write_csv(Path(path), self.rows, self.columns)

    def save(self, output_dir: str | Path, name: str) -> dict[str, Path]:
        """:func:`save_rows` of this table's rows (every key, not only the shown columns)."""
        return save_rows(self.rows, output_dir, name)
