"""--compare A B: which results of A and B describe the same setting, the refusals when they cannot be compared,
and the ratio rows (B / A) for the settings both measured."""

from __future__ import annotations

from ..errors import BenchError
from .study_inputs import ResultDoc, Study

# What identifies a row's setting, per kind: rows of A and B with equal keys are compared.
ROW_KEYS = {
    "throughput": ("model", "preset", "tokens", "tau", "dtype", "backend", "pass", "routing"),
    "throughput_stages": ("model", "preset", "tokens", "tau", "dtype", "backend", "stage"),
    "flops": ("model", "preset", "checkpoint_shape", "layer", "tau", "tokens", "dtype", "backend", "routing", "pass",
              "component"),
    "comm": ("model", "preset", "world_size", "tau", "tokens_per_rank", "dtype", "routing"),
    "comm_predict": ("model", "preset", "world_size", "tau", "tokens_per_rank", "dtype"),
}
ROW_KEYS["paper_table"] = ROW_KEYS["throughput"]
ROW_KEYS["paper_table_stages"] = ROW_KEYS["throughput_stages"]
COMPARED_KINDS = (*ROW_KEYS, "routing-stats")


def row_key(kind: str, row: dict) -> tuple:
    return tuple(_key_value(row, f) for f in ROW_KEYS[kind])


def _key_value(row: dict, field: str):
    if field == "checkpoint_shape":  # two checkpoints of one shape are comparable; their paths differ
        return "checkpoint" if row.get("checkpoint") else None
    return row.get(field)


def _fmt_values(values) -> str:
    shown = sorted(values, key=lambda v: (v is None, str(v)))
    return ", ".join("-" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in shown)


def merged_rows(study: Study, kind: str) -> list[dict]:
    """All rows of one kind on one side; two rows for one setting cannot be compared, so they are refused."""
    seen: dict[tuple, ResultDoc] = {}
    rows = []
    for doc in study.of(kind):
        for row in doc.rows:
            key = row_key(kind, row)
            if key in seen and seen[key] is not doc:
                raise BenchError(f"--compare: {study.name} holds two {kind} results for the same setting "
                                 f"({seen[key].label} and {doc.label}); give one run per setting on each side")
            seen[key] = doc
            rows.append(row)
    return rows


def routing_pairs(a: Study, b: Study) -> list[tuple[ResultDoc, ResultDoc]]:
    """Routing-stats runs of A and B side by side: by checkpoint name, or the one run of each side."""
    ra, rb = a.of("routing-stats"), b.of("routing-stats")
    if not ra or not rb:
        return []
    if len(ra) == 1 and len(rb) == 1:
        pairs = [(ra[0], rb[0])]
    else:
        names_a = [d.extra.get("checkpoint_name") for d in ra]
        names_b = [d.extra.get("checkpoint_name") for d in rb]
        if len(set(names_a)) != len(names_a) or len(set(names_b)) != len(names_b) or set(names_a) != set(names_b):
            raise BenchError(f"--compare: cannot pair the routing-stats runs of A ({_fmt_values(names_a)}) and B "
                             f"({_fmt_values(names_b)}); give one routing run per side, or runs of the same "
                             f"checkpoints")
        by_name = {d.extra.get("checkpoint_name"): d for d in rb}
        pairs = [(d, by_name[d.extra.get("checkpoint_name")]) for d in ra]
    for da, db in pairs:
        for field in ("top_k", "n_experts", "expert_types"):
            if da.extra.get(field) != db.extra.get(field):
                raise BenchError(f"--compare: routing runs {da.label} and {db.label} have different expert layouts "
                                 f"({field}: {da.extra.get(field)} vs {db.extra.get(field)}); compare checkpoints "
                                 f"of one architecture")
        if len(da.rows) != len(db.rows):
            raise BenchError(f"--compare: routing runs {da.label} and {db.label} have {len(da.rows)} and "
                             f"{len(db.rows)} MoE layers; compare checkpoints of one architecture")
    return pairs


def check_comparable(a: Study, b: Study) -> None:
    """Refuse (BenchError, one line) anything that would make the side-by-side figures or the ratios wrong."""
    common = [k for k in COMPARED_KINDS if k in a.kinds and k in b.kinds]
    if not common:
        raise BenchError(f"--compare: A and B have no kind of result in common (A: "
                         f"{_fmt_values(a.kinds) or 'none'}; B: {_fmt_values(b.kinds) or 'none'}); compare "
                         f"directories written by the same commands")
    for kind in common:
        if kind == "routing-stats":
            routing_pairs(a, b)
            continue
        rows_a, rows_b = merged_rows(a, kind), merged_rows(b, kind)
        presets_a = {r.get("preset") for r in rows_a}
        presets_b = {r.get("preset") for r in rows_b}
        if presets_a != presets_b:
            raise BenchError(f"--compare: A's {kind} results are for preset {_fmt_values(presets_a)} and B's for "
                             f"{_fmt_values(presets_b)}; compare runs of the same preset")
        keys_a = {row_key(kind, r) for r in rows_a}
        keys_b = {row_key(kind, r) for r in rows_b}
        if not keys_a & keys_b:
            fields = ROW_KEYS[kind]
            differing = [(i, f) for i, f in enumerate(fields)
                         if {k[i] for k in keys_a} != {k[i] for k in keys_b}]
            detail = "; ".join(f"{f}: A {_fmt_values({k[i] for k in keys_a})}, B {_fmt_values({k[i] for k in keys_b})}"
                               for i, f in differing[:2])
            raise BenchError(f"--compare: the {kind} results of A and B share no setting ({detail}); rerun one "
                             f"side with the other's settings")


def ratio_rows(kind: str, rows_a: list[dict], rows_b: list[dict], values: tuple[str, ...]) -> list[dict]:
    """One row per setting both sides measured: the key columns, then value_a, value_b and value_ratio (B/A)."""
    by_key_b = {row_key(kind, r): r for r in rows_b}
    out = []
    for ra in rows_a:
        rb = by_key_b.get(row_key(kind, ra))
        if rb is None:
            continue
        row = {f: ra.get(f) for f in ROW_KEYS[kind] if f != "checkpoint_shape"}
        for v in values:
            va, vb = ra.get(v), rb.get(v)
            row[f"{v}_a"], row[f"{v}_b"] = va, vb
            row[f"{v}_ratio"] = vb / va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va \
                else None
        out.append(row)
    return out
