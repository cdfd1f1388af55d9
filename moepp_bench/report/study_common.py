"""What the report's sections share: number formats, tables that move constant settings into their caption,
the rows of each side, and the grid of panels a figure is drawn from."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from .study_compare import merged_rows
from .study_document import Block, Column, Figure, Para, Table
from .study_figures import Panel, draw_grid
from .study_inputs import ResultDoc, Study

RUN = "_run"  # the result file a row came from, when a side holds several of its kind


# Formatting ----------------------------------------------------------------------------------------------------
def sig(value: float, digits: int = 4) -> str:
    """Significant digits without exponent notation (table cells stay readable)."""
    if value == 0:
        return "0"
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def tau_text(value) -> str:
    return "-" if value is None else f"{value:g}"


def sortable(key: tuple) -> tuple:
    return tuple((v is None, v if isinstance(v, (int, float)) else 0, str(v)) for v in key)


def compact(columns: list[Column], rows: list[dict], settings: tuple[str, ...], caption: str) -> Table:
    """A table without the setting columns that hold one value in every row; those go into the caption."""
    fixed, kept = [], []
    for col in columns:
        values = {str(r.get(col.key)) for r in rows}
        if col.key in settings and len(values) == 1 and rows:
            value = rows[0].get(col.key)
            if value not in (None, ""):
                fixed.append(f"{col.header} {value if not isinstance(value, float) else f'{value:g}'}")
        else:
            kept.append(col)
    if fixed:
        caption = f"{caption} ({'; '.join(fixed)})" if caption else "; ".join(fixed)
    return Table(kept, rows, caption)


# Rows per side -------------------------------------------------------------------------------------------------
def side_rows(study: Study, kind: str, compare: bool) -> list[dict]:
    """A side's rows of one kind; each tagged with its file when the side holds several (never with --compare,
    where rows merge and a setting measured twice is refused)."""
    if compare:
        return [{**r, RUN: ""} for r in merged_rows(study, kind)]
    docs = study.of(kind)
    return [{**r, RUN: run_tag(d) if len(docs) > 1 else ""} for d in docs for r in d.rows]


def run_tag(doc: ResultDoc) -> str:
    """A run's directory as the report shows it (its file name is the same for every run of a kind)."""
    parent = Path(doc.label).parent.as_posix()
    return doc.label if parent in ("", ".") else parent


def build_grid(per_side: list[list[dict]], key: Callable[[dict], tuple],
               make: Callable[[tuple, list[dict]], Panel | None]) -> list[list[Panel | None]]:
    keys = sorted({key(r) for rows in per_side for r in rows}, key=sortable)
    grid = []
    for k in keys:
        row = []
        for rows in per_side:
            mine = [r for r in rows if key(r) == k]
            row.append(make(k, mine) if mine else None)
        if any(p is not None for p in row):
            grid.append(row)
    return grid


def run_prefix(run: str) -> str:
    return f"{run}: " if run else ""


def one_sided(studies: list[Study], kind: str) -> Para | None:
    """With --compare, a kind only one side holds: said in words instead of an empty ratio table."""
    have = [s.name for s in studies if s.of(kind)]
    if len(studies) > 1 and len(have) == 1:
        return Para(f"Only {have[0]} holds {kind} results; they are shown on its side only, without ratios.")
    return None


def present(per_side: list[list[dict]]) -> list[dict]:
    """The rows of the first side that has any (the only one, when one_sided)."""
    return next((rows for rows in per_side if rows), [])


def figure_blocks(grid, sides, draw, fig_dir: Path, stem: str, caption: str, **kw) -> list[Block]:
    if not grid:
        return []
    filled = [c for c in range(len(sides)) if any(row[c] is not None for row in grid)]
    if len(sides) > 1 and len(filled) == 1:  # one side has none of these: draw it alone, not beside blanks
        grid, sides = [[row[filled[0]]] for row in grid], [sides[filled[0]]]
    png = draw_grid(grid, sides, draw, fig_dir, stem, **kw)
    return [Figure(png, caption)]
