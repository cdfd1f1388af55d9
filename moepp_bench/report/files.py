"""Result files: rows as CSV and as JSON with provenance, written atomically (temporary name, then rename).

Every JSON result file has the same envelope, so `moepp-bench report` can recognise it by content:
    {"schema": "moepp-bench/<kind>", "schema_version": N, "provenance": {...}, "rows": [...], ...}
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

SCHEMA_PREFIX = "moepp-bench/"


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write a file so that readers see either the old content or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are for everyone who can read the dir
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def rows_to_csv(rows: list[dict], columns: Iterable[str] | None = None) -> str:
    columns = list(columns) if columns is not None else _columns(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buf.getvalue()


def _columns(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def result_document(kind: str, version: int, rows: list[dict], provenance: dict, **extra) -> dict:
    return _clean({"schema": SCHEMA_PREFIX + kind, "schema_version": version, "provenance": provenance,
                   "rows": rows, **extra})


def write_results(out_dir: str | os.PathLike, kind: str, version: int, rows: list[dict], provenance: dict,
                  columns: Iterable[str] | None = None, **extra) -> tuple[Path, Path]:
    """DIR/<kind>.csv and DIR/<kind>.json; both are complete or absent."""
    out = Path(out_dir)
    doc = result_document(kind, version, rows, provenance, **extra)
    csv_path = write_atomic(out / f"{kind}.csv", rows_to_csv(rows, columns))
    json_path = write_atomic(out / f"{kind}.json", json.dumps(doc, indent=2) + "\n")
    return csv_path, json_path


def read_result(path: str | os.PathLike) -> dict:
    """Read a result JSON and check its envelope; raises ValueError with a one-line reason."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON result file ({exc})") from None
    if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith(SCHEMA_PREFIX):
        raise ValueError(f"{path}: not a moepp-bench result (no 'schema' starting with {SCHEMA_PREFIX!r})")
    return doc
