"""The raw numbers behind each plot, as CSV: written beside the plot, read back to redraw it."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path


def write_csv(rows: Sequence[dict], path: str | Path, columns: Iterable[str] | None = None) -> Path:
    """Write ``rows`` (dicts) to ``path``; columns: ``columns`` or the first row's keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(columns) if columns is not None else (list(rows[0]) if rows else [])
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k)) for k in cols})
    return path


def _cell(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return "" if v is None else v


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows as dicts of strings (callers convert the columns they use)."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def num(value) -> float:
    """A cell as a float (``""``/None -> NaN)."""
    if value is None or value == "":
        return math.nan
    return float(value)
