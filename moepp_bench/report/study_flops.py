"""The report's FLOPs section: matmul FLOPs per component of the vanilla MoE and MoE++, and the
stacked-bar figure."""

from __future__ import annotations

from pathlib import Path

from .study_common import (RUN, build_grid, compact, figure_blocks, one_sided, present, run_prefix, side_rows, sig,
                           sortable, tau_text)
from .study_compare import merged_rows, ratio_rows
from .study_document import Block, Column, Heading, Para, Table
from .study_figures import Panel, draw_flops_panel
from .study_inputs import Study

FLOPS_SETTINGS = (RUN, "source", "tokens", "dtype", "backend", "routing")


def _flop_unit(rows: list[dict]) -> tuple[float, str]:
    peak = max((r["flops"] for r in rows if r["component"] == "total"), default=0)
    for scale, unit in ((1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP")):
        if peak >= scale:
            return scale, unit
    return 1.0, "FLOP"


def _source(r: dict) -> str:
    return r["preset"] if r.get("preset") else Path(str(r.get("checkpoint") or "checkpoint")).name


def flops_table(rows: list[dict], scale: float, unit: str) -> Table:
    settings: dict[tuple, dict] = {}
    for r in rows:
        key = (r[RUN], _source(r), r["tokens"], r.get("dtype"), r.get("backend"), r.get("routing"),
               r["model"] != "moe", r.get("layer"), r["tau"])
        s = settings.setdefault(key, {RUN: r[RUN], "source": _source(r), "tokens": r["tokens"], "dtype": r.get("dtype"),
                                      "backend": r.get("backend"), "routing": r.get("routing"), "model": r["model"],
                                      "layer": r.get("layer"), "tau": r["tau"], "diff": None})
        if r["pass"] == "forward":
            s["ffn_slot_fraction"], s["rho"] = r.get("ffn_slot_fraction"), r.get("rho")
            s["ratio"] = r.get("ffn_flops_ratio_vs_vanilla")
            if r["component"] == "total":
                s["fwd"] = r["flops"] / scale
                s["fwd_mb"] = r["bytes"] / 1e6
                s["params"] = r.get("activated_params_per_token")
            else:
                s[r["component"]] = r["flops"] / scale
        elif r["component"] == "total":
            s["bwd"] = r["flops"] / scale
        diff = r.get("flops_rel_diff")
        if diff is not None:
            s["diff"] = max(s["diff"] or 0.0, abs(diff) * 100)
    out = [settings[k] for k in sorted(settings, key=sortable)]
    columns = [Column(RUN, "run"), Column("source", "preset"), Column("tokens", "tokens", "{:,}"),
               Column("dtype", "dtype"), Column("backend", "backend"), Column("routing", "routing"),
               Column("model", "model"), Column("layer", "layer"), Column("tau", "tau", tau_text),
               Column("ffn_slot_fraction", "FFN slot share", "{:.3f}"), Column("rho", "rho", "{:.3f}"),
               Column("router", f"router {unit}", sig), Column("ffn_experts", f"FFN {unit}", sig),
               Column("constant_experts", f"constant {unit}", sig), Column("fwd", f"forward {unit}", sig),
               Column("bwd", f"backward {unit}", sig), Column("ratio", "FFN vs MoE", "{:.3f}"),
               Column("fwd_mb", "forward MB moved", sig), Column("params", "params/token", "{:,.0f}"),
               Column("diff", "counted vs analytic, max diff %", "{:.2f}")]
    if all(r.get("layer") is None for r in out):
        columns = [c for c in columns if c.key != "layer"]
    if all(r.get("diff") is None for r in out):
        columns = [c for c in columns if c.key != "diff"]
    return compact(columns, out, FLOPS_SETTINGS, "Matmul FLOPs per layer call by component (copy and zero experts "
                                                 "do none), analytic, with FlopCounterMode's count where run")


def flops_section(studies: list[Study], fig_dir: Path) -> list[Block]:
    compare = len(studies) > 1
    per_side = [side_rows(s, "flops", compare) for s in studies]
    if not any(per_side):
        return []
    scale, unit = _flop_unit([r for side in per_side for r in side])
    blocks: list[Block] = [Heading(2, "FLOPs"), Para(
        "Matmul FLOPs (2 per multiply-add) of one layer call, per component, for the vanilla MoE and MoE++. The "
        "ratio of MoE++ to vanilla FFN FLOPs is the realised share of routing slots on FFN experts (rho at "
        "balance): zero-computation experts cost no matmuls, and the constant experts only a 2 x D one.")]
    note = one_sided(studies, "flops")
    if note:
        blocks += [note, flops_table(present(per_side), scale, unit)]
    elif compare:
        a, b = studies
        rows = ratio_rows("flops", merged_rows(a, "flops"), merged_rows(b, "flops"), ("flops", "bytes"))
        rows = [{**r, "source": _source(r)} for r in rows if r["component"] == "total"]
        for r in rows:
            for side in ("a", "b"):
                r[f"flops_{side}"] = None if r[f"flops_{side}"] is None else r[f"flops_{side}"] / scale
                r[f"bytes_{side}"] = None if r[f"bytes_{side}"] is None else r[f"bytes_{side}"] / 1e6
        columns = [Column("source", "preset"), Column("tokens", "tokens", "{:,}"), Column("dtype", "dtype"),
                   Column("backend", "backend"), Column("routing", "routing"), Column("model", "model"),
                   Column("layer", "layer"), Column("tau", "tau", tau_text), Column("pass", "pass"),
                   Column("flops_a", f"A {unit}", sig), Column("flops_b", f"B {unit}", sig),
                   Column("flops_ratio", "FLOPs B/A", "{:.3f}"), Column("bytes_a", "A MB", sig),
                   Column("bytes_b", "B MB", sig), Column("bytes_ratio", "bytes B/A", "{:.3f}")]
        if all(r.get("layer") is None for r in rows):
            columns = [c for c in columns if c.key != "layer"]
        blocks.append(compact(columns, rows, ("source", "tokens", "dtype", "backend", "routing"),
                              "Whole-layer FLOPs and bytes, B against A"))
    else:
        blocks.append(flops_table(per_side[0], scale, unit))
    forward = [[r for r in rows if r["pass"] == "forward" and r["component"] != "total"] for rows in per_side]
    # the vanilla layer of a checkpoint run is routed "balanced", its MoE++ layers "learned": one panel
    key = lambda r: (r[RUN], _source(r), r["tokens"], r.get("backend"))  # noqa: E731
    grid = build_grid(forward, key, lambda k, rows: Panel(
        f"{run_prefix(k[0])}{k[1]}, {k[2]:,} tokens, {k[3]}", (rows, scale, unit)))
    blocks += figure_blocks(grid, [s.name for s in studies], draw_flops_panel, fig_dir, "flops_breakdown",
                      "Forward matmul FLOPs of one layer call, stacked by component, for the vanilla MoE and MoE++ "
                      "(numbers: totals). Copy and zero experts do no matmuls.", width=5.2)
    return blocks
