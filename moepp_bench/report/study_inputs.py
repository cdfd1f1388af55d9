"""Find and read the result files of a study: every *.json under the result directories, classified by its
"schema" (never by its name), checked against the schema versions this report reads, and loaded whole before
anything is drawn or written.

A routing-stats run is its summary.json (schema moepp-bench/routing-stats) plus the CSV tables beside it.
JSON files inside a checkpoint directory (config.json, tokenizer.json, ...) are not results and are skipped;
any other JSON without a known schema is refused, so a report never silently leaves a run out.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BenchError
from .files import SCHEMA_PREFIX

# kind -> highest schema_version this report reads
KNOWN_SCHEMAS = {
    "throughput": 1, "throughput_stages": 1, "paper_table": 1, "paper_table_stages": 1,
    "flops": 1, "comm": 1, "comm_predict": 1, "routing-stats": 1,
    "training": 1, "train-log": 1,  # written beside a checkpoint by `train`
}
# Columns a document's rows must have for the report to use them.
REQUIRED_COLUMNS = {
    "throughput": ("model", "preset", "tau", "tokens", "dtype", "backend", "pass", "ffn_slot_fraction",
                   "time_ms_median", "tokens_per_s", "speedup", "ideal_speedup", "efficiency"),
    "throughput_stages": ("model", "preset", "tau", "tokens", "dtype", "backend", "stage", "time_ms"),
    "flops": ("model", "preset", "tau", "tokens", "pass", "component", "flops", "bytes"),
    "comm": ("model", "preset", "world_size", "tau", "top_k", "d_model", "bytes_per_element", "n_ffn", "n_zc",
             "rho", "dtype", "bytes_per_token_measured", "bytes_per_token_balance"),
    "comm_predict": ("model", "preset", "world_size", "tau", "top_k", "d_model", "bytes_per_element", "n_ffn",
                     "n_zc", "rho", "dtype", "bytes_per_token_balance"),
    "routing-stats": ("layer", "mean_ffn_experts"),
    "training": (),
    "train-log": (),
}
REQUIRED_COLUMNS["paper_table"] = REQUIRED_COLUMNS["throughput"]
REQUIRED_COLUMNS["paper_table_stages"] = REQUIRED_COLUMNS["throughput_stages"]
ROUTING_TABLES = ("ffn_per_token", "routing_score_hist", "routing_scores", "imbalance")
ROUTING_OPTIONAL_TABLES = ("ffn_per_token_no_residual", "layer_correlation", "expert_load")
ROUTING_SUMMARY_KEYS = ("top_k", "n_experts", "n_ffn", "expert_types", "tau", "rho", "k_rho", "tokens")
# CSV columns that hold names, never numbers (a task may be called "2024").
TEXT_COLUMNS = {"task", "token", "expert_type", "type_a", "type_b", "rank", "gating_residual", "experts"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclass
class ResultDoc:
    """One result file: its envelope, rows, the other top-level keys, and (routing-stats) the CSV tables."""

    kind: str
    path: Path
    label: str  # the path shown in the report, relative to its result directory's parent
    provenance: dict
    rows: list[dict]
    extra: dict = field(default_factory=dict)
    tables: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.path.parent


@dataclass
class Study:
    """Everything read from a set of result directories (one side of a comparison)."""

    name: str  # "" for a plain report, "A" / "B" with --compare
    roots: list[Path]
    docs: list[ResultDoc]

    def of(self, *kinds: str) -> list[ResultDoc]:
        return [d for d in self.docs if d.kind in kinds]

    @property
    def kinds(self) -> set[str]:
        return {d.kind for d in self.docs}


def is_checkpoint_dir(path: Path) -> bool:
    """config.json beside weights: a model checkpoint (ours, the official format, or a training run)."""
    if not (path / "config.json").is_file():
        return False
    return any(p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json") for p in path.iterdir())


def find_json_files(root: Path, exclude: list[Path]) -> list[Path]:
    """Every *.json under root (or root itself), skipping hidden entries (temporary and staging files) and the
    excluded directories (the report's own output)."""
    if root.is_file():
        return [root]
    found = []
    excluded = {p.resolve() for p in exclude}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in excluded)
        found += [here / f for f in sorted(filenames) if f.endswith(".json") and not f.startswith(".")]
    return found


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BenchError(f"{path}: not a readable JSON file ({reason}); remove it or rerun the command that "
                         f"wrote it") from None


def _parse_cell(column: str, text: str):
    if text == "":
        return None
    if column in TEXT_COLUMNS:
        return text
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if text in ("True", "False"):
        return text == "True"
    return text


def read_csv_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return [{k: _parse_cell(k, v) for k, v in row.items()} for row in csv.DictReader(fh)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BenchError(f"{path}: cannot read this routing-stats table ({exc}); rerun routing-stats") from None


def _routing_tables(summary_path: Path) -> dict[str, list[dict]]:
    run_dir = summary_path.parent
    tables = {}
    for name in ROUTING_TABLES + ROUTING_OPTIONAL_TABLES:
        path = run_dir / f"{name}.csv"
        if path.is_file():
            tables[name] = read_csv_rows(path)
        elif name in ROUTING_TABLES:
            raise BenchError(f"{summary_path}: routing-stats summary without {name}.csv beside it; copy the whole "
                             f"routing-stats output directory")
    return tables


def _label(path: Path, root: Path) -> str:
    base = root if root.is_dir() else root.parent
    try:
        return str(path.relative_to(base.parent if base.parent != base else base))
    except ValueError:
        return str(path)


def read_document(path: Path, root: Path) -> ResultDoc | None:
    """The result in `path`, or None for a non-result JSON inside a checkpoint directory; BenchError for anything
    the report cannot read."""
    doc = _load_json(path)
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if not isinstance(schema, str):
        if is_checkpoint_dir(path.parent):
            return None
        raise BenchError(f"{path}: not a moepp-bench result (no \"schema\" key); move it out of the result "
                         f"directory or give the run directories themselves")
    kind = schema[len(SCHEMA_PREFIX):] if schema.startswith(SCHEMA_PREFIX) else None
    if kind not in KNOWN_SCHEMAS:
        raise BenchError(f"{path}: unknown result schema {schema!r}; this report reads "
                         f"{', '.join(SCHEMA_PREFIX + k for k in KNOWN_SCHEMAS)}; move the file out of the result "
                         f"directory")
    version = doc.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BenchError(f"{path}: schema {schema!r} without a valid schema_version ({version!r}); rerun the "
                         f"command that wrote it")
    if version > KNOWN_SCHEMAS[kind]:
        raise BenchError(f"{path}: schema {schema!r} version {version} is newer than this moepp-bench reads "
                         f"(version {KNOWN_SCHEMAS[kind]}); upgrade moepp-bench to report on it")
    rows = doc.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise BenchError(f"{path}: schema {schema!r} without a list of rows; rerun the command that wrote it")
    for column in REQUIRED_COLUMNS[kind]:
        missing = [i for i, r in enumerate(rows) if column not in r]
        if missing:
            raise BenchError(f"{path}: row {missing[0]} has no column {column!r}, which {schema!r} rows need; "
                             f"rerun the command that wrote it")
    extra = {k: v for k, v in doc.items() if k not in ("schema", "schema_version", "provenance", "rows")}
    if kind == "routing-stats":
        absent = [k for k in ROUTING_SUMMARY_KEYS if k not in extra]
        if absent:
            raise BenchError(f"{path}: routing-stats summary without {absent[0]!r}; rerun routing-stats")
    tables = _routing_tables(path) if kind == "routing-stats" else {}
    provenance = doc.get("provenance") if isinstance(doc.get("provenance"), dict) else {}
    return ResultDoc(kind, path, _label(path, root), provenance, rows, extra, tables)


def read_study(paths: list[Path], name: str = "", exclude: list[Path] | None = None) -> Study:
    """Read every result under `paths`; BenchError (before anything is written) for a missing or empty
    directory and for any file the report cannot use."""
    docs: list[ResultDoc] = []
    seen: set[Path] = set()
    side = f"{name}: " if name else ""
    for root in paths:
        if not root.exists():
            raise BenchError(f"{side}{root}: no such result directory")
        if root.is_file() and root.suffix != ".json":
            raise BenchError(f"{side}{root}: a result directory (or a result .json file) is expected")
        found = 0
        for path in find_json_files(root, exclude or []):
            key = path.resolve()
            if key in seen:
                continue
            seen.add(key)
            doc = read_document(path, root)
            if doc is not None:
                docs.append(doc)
                found += 1
        if not found:
            raise BenchError(f"{side}{root}: no moepp-bench result files in it (JSON files with a \"schema\"); "
                             f"run throughput, flops, comm or routing-stats with --out there first")
    return Study(name, list(paths), docs)
