"""Consoles: tables and data go to stdout, progress and messages to stderr."""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Iterable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from .files import rows_to_csv

stdout = Console()
stderr = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: float | None, *extra_fields: str) -> Iterator[Progress]:
    """A Rich progress bar on stderr; yields the Progress with one task (id 0) already added."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    columns += [TextColumn("{task.fields[%s]}" % f) for f in extra_fields]
    with Progress(*columns, console=stderr, transient=False) as progress:
        progress.add_task(description, total=total, **{f: "" for f in extra_fields})
        yield progress


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 0.01 and value != 0 else f"{value:.3f}".rstrip("0").rstrip(".")
    return "-" if value is None else str(value)


def rich_table(rows: list[dict], columns: Iterable[str], title: str | None = None) -> Table:
    table = Table(title=title, header_style="bold")
    columns = list(columns)
    for col in columns:
        table.add_column(col, justify="right" if rows and isinstance(rows[0].get(col), (int, float)) else "left")
    for row in rows:
        table.add_row(*(_fmt(row.get(c)) for c in columns))
    return table


def emit(rows: list[dict], columns: Iterable[str], fmt: str, title: str | None = None, document: dict | None = None):
    """Print rows to stdout as a Rich table, CSV, or JSON (the result document when given)."""
    columns = list(columns)
    if fmt == "table":
        stdout.print(rich_table(rows, columns, title))
    elif fmt == "csv":
        print(rows_to_csv(rows, columns), end="")
    elif fmt == "json":
        print(json.dumps(document if document is not None else rows, indent=2))
    else:
        raise ValueError(f"unknown format {fmt!r}; use table, json or csv")
