"""The one table type of the tutorial: rows of dicts that print as text, render as HTML in Jupyter and save as CSV."""

from __future__ import annotations

import csv
import html
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["Table"]


class Table:
    """A small table (list of row dicts) that prints as text, renders as HTML in Jupyter and saves as CSV.

    Args:
        rows: list of dicts; ``columns``: keys to show, in order (default: keys of the first row);
        formats: per-column format spec (e.g. ``{"sqnr": ".2f"}``); floats default to ``.4g``;
        title: optional caption.
    """

    def __init__(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                 formats: Mapping[str, str] | None = None, title: str = ""):
        self.rows = [dict(r) for r in rows]
        self.columns = list(columns) if columns is not None else (list(self.rows[0]) if self.rows else [])
        self.formats = dict(formats or {})
        self.title = title

    def _cell(self, col: str, v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if math.isinf(v):
                return "inf" if v > 0 else "-inf"
            return format(v, self.formats.get(col, ".4g"))
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
        """Write the raw values (not the formatted cells) to ``path``; returns it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.rows)
        return path
