"""The report's throughput section: MoE++ against the vanilla MoE per tau beside the paper's Table 3,
the baselines, time per stage, and the speedup and tokens/s figures."""

from __future__ import annotations

from pathlib import Path

from ..paper import paper_row
from .study_common import (RUN, build_grid, compact, figure_blocks, one_sided, present, run_prefix, side_rows, sig,
                           sortable, tau_text)
from .study_compare import merged_rows, ratio_rows
from .study_document import Block, Column, Heading, Para, Table
from .study_figures import Panel, draw_speedup_panel, draw_tokens_per_s_panel
from .study_inputs import Study

THROUGHPUT_SETTINGS = (RUN, "preset", "tokens", "dtype", "pass", "backend", "routing")


def _vanilla_ms(rows: list[dict]) -> dict[tuple, float]:
    out = {}
    for r in rows:
        if r["model"] == "moe":
            out[(r[RUN], r["preset"], r["tokens"], r["dtype"], r["pass"], r["backend"], r.get("routing"))] = \
                r["time_ms_median"]
    return out


def speedup_table(rows: list[dict]) -> Table:
    vanilla = _vanilla_ms(rows)
    out = []
    for r in sorted((r for r in rows if r["model"] == "moepp"),
                    key=lambda r: sortable((r[RUN], r["preset"], r["tokens"], r["dtype"], r["pass"], r["backend"],
                                             r["tau"]))):
        paper = paper_row(r["preset"], r["tau"])
        out.append({**r, "moe_ms": vanilla.get((r[RUN], r["preset"], r["tokens"], r["dtype"], r["pass"], r["backend"],
                                                r.get("routing"))), **paper})
    columns = [Column(RUN, "run"), Column("preset", "preset"), Column("tokens", "tokens", "{:,}"),
               Column("dtype", "dtype"), Column("pass", "pass"), Column("backend", "backend"),
               Column("routing", "routing"), Column("tau", "tau", tau_text),
               Column("ffn_slot_fraction", "FFN slot share", "{:.3f}"), Column("moe_ms", "MoE ms", sig),
               Column("time_ms_median", "MoE++ ms", sig), Column("speedup", "speedup", "{:.2f}"),
               Column("ideal_speedup", "ideal", "{:.2f}"), Column("efficiency", "efficiency", "{:.2f}"),
               Column("paper_speedup", "paper speedup", "{:.2f}"),
               Column("paper_ideal_speedup", "paper ideal 1/rho", "{:.2f}"),
               Column("paper_efficiency", "paper efficiency", "{:.2f}")]
    return compact(columns, out, THROUGHPUT_SETTINGS, "MoE++ against the vanilla MoE with the same FFN experts, "
                                                      "timed in one interleaved run")


def baseline_table(rows: list[dict]) -> Table | None:
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = (r[RUN], r["preset"], r["tokens"], r["dtype"], r["pass"], r.get("routing"))
        g = groups.setdefault(key, {RUN: r[RUN], "preset": r["preset"], "tokens": r["tokens"], "dtype": r["dtype"],
                                    "pass": r["pass"], "routing": r.get("routing")})
        if r["model"] == "moe" and "moe_ms" not in g:
            g.update(moe_ms=r["time_ms_median"], moe_backend=r["backend"], moe_gflops=r.get("gflops_per_s"),
                     moe_vs_dense=r.get("vs_dense_ceiling"))
        elif r["model"] == "moe-loop":
            g["loop_ms"] = r["time_ms_median"]
        elif r["model"] == "dense-ceiling":
            g.update(dense_ms=r["time_ms_median"], dense_gflops=r.get("gflops_per_s"))
    out = []
    for key in sorted(groups, key=sortable):
        g = groups[key]
        if g.get("moe_ms") and g.get("loop_ms"):
            g["loop_slowdown"] = g["loop_ms"] / g["moe_ms"]
        out.append(g)
    if not any("loop_ms" in g or "dense_ms" in g for g in out):
        return None
    columns = [Column(RUN, "run"), Column("preset", "preset"), Column("tokens", "tokens", "{:,}"),
               Column("dtype", "dtype"), Column("pass", "pass"), Column("routing", "routing"),
               Column("moe_backend", "MoE backend"), Column("moe_ms", "MoE ms", sig),
               Column("loop_ms", "per-expert loop ms", sig), Column("loop_slowdown", "loop / MoE", "{:.2f}"),
               Column("dense_ms", "dense ceiling ms", sig), Column("moe_gflops", "MoE GFLOP/s", sig),
               Column("dense_gflops", "dense GFLOP/s", sig), Column("moe_vs_dense", "MoE / dense GFLOP/s", "{:.2f}")]
    return compact(columns, out, THROUGHPUT_SETTINGS + ("moe_backend",),
                   "The vanilla layer against the naive per-expert loop (the official code's dispatch) and one "
                   "dense matmul chain of the same FLOPs (this machine's practical ceiling)")


def throughput_ratio_table(kind: str, a: Study, b: Study) -> Table:
    rows = ratio_rows(kind, merged_rows(a, kind), merged_rows(b, kind),
                      ("time_ms_median", "speedup", "tokens_per_s"))
    order = {"moe": 0, "moepp": 1, "moe-loop": 2, "dense-ceiling": 3}
    rows.sort(key=lambda r: sortable((r["preset"], r["tokens"], r["dtype"], r["pass"], r["backend"],
                                       order.get(r["model"], 9), r["tau"])))
    for r in rows:
        if r["model"] == "moepp":
            r.update(paper_row(r["preset"], r["tau"]))
    columns = [Column("preset", "preset"), Column("tokens", "tokens", "{:,}"), Column("dtype", "dtype"),
               Column("pass", "pass"), Column("backend", "backend"), Column("routing", "routing"),
               Column("model", "model"), Column("tau", "tau", tau_text),
               Column("time_ms_median_a", "A ms", sig), Column("time_ms_median_b", "B ms", sig),
               Column("time_ms_median_ratio", "time B/A", "{:.3f}"), Column("speedup_a", "A speedup", "{:.2f}"),
               Column("speedup_b", "B speedup", "{:.2f}"), Column("paper_speedup", "paper speedup", "{:.2f}"),
               Column("tokens_per_s_ratio", "tokens/s B/A", "{:.3f}")]
    return compact(columns, rows, ("preset", "tokens", "dtype", "pass", "backend", "routing"),
                   "B against A for every setting both measured (time B/A below 1: B is faster)")


def stages_table(rows: list[dict]) -> Table:
    stages: list[str] = []
    cases: dict[tuple, dict] = {}
    for r in rows:
        if r["stage"] not in stages:
            stages.append(r["stage"])
        key = (r[RUN], r["preset"], r["tokens"], r["dtype"], r["backend"], r["model"] != "moe", r["tau"])
        case = cases.setdefault(key, {RUN: r[RUN], "preset": r["preset"], "tokens": r["tokens"], "dtype": r["dtype"],
                                      "backend": r["backend"], "model": r["model"], "tau": r["tau"], "total": 0.0})
        case[r["stage"]] = r["time_ms"]
        case["total"] += r["time_ms"]
    out = [cases[k] for k in sorted(cases, key=sortable)]
    columns = [Column(RUN, "run"), Column("preset", "preset"), Column("tokens", "tokens", "{:,}"),
               Column("dtype", "dtype"), Column("backend", "backend"), Column("model", "model"),
               Column("tau", "tau", tau_text), *(Column(s, f"{s.replace('_', ' ')} ms", sig) for s in stages),
               Column("total", "total ms", sig)]
    return compact(columns, out, (RUN, "preset", "tokens", "dtype", "backend"),
                   "Median time per stage of one forward (timed apart from the main rounds)")


def stages_blocks(studies: list[Study], kind: str) -> list[Block]:
    """Time per stage (throughput --breakdown): a table per side, or B against A."""
    compare = len(studies) > 1
    per_side = [side_rows(s, kind, compare) for s in studies]
    if not any(per_side):
        return []
    blocks: list[Block] = [Heading(3, "Where the time goes, stage by stage")]
    note = one_sided(studies, kind)
    if note:
        blocks += [note, stages_table(present(per_side))]
    elif compare:
        rows = ratio_rows(kind, merged_rows(studies[0], kind), merged_rows(studies[1], kind), ("time_ms",))
        columns = [Column("preset", "preset"), Column("tokens", "tokens", "{:,}"), Column("dtype", "dtype"),
                   Column("backend", "backend"), Column("model", "model"), Column("tau", "tau", tau_text),
                   Column("stage", "stage"), Column("time_ms_a", "A ms", sig), Column("time_ms_b", "B ms", sig),
                   Column("time_ms_ratio", "B/A", "{:.3f}")]
        blocks.append(compact(columns, rows, ("preset", "tokens", "dtype", "backend"), "Stage times, B against A"))
    else:
        blocks.append(stages_table(per_side[0]))
    return blocks


def throughput_section(studies: list[Study], fig_dir: Path) -> list[Block]:
    compare = len(studies) > 1
    sides = [s.name for s in studies]
    blocks: list[Block] = []
    titles = {"throughput": "Throughput", "paper_table": "Throughput at the paper's sizes, beside its Table 3"}
    for kind, title in titles.items():
        per_side = [side_rows(s, kind, compare) for s in studies]
        if not any(per_side):
            continue
        blocks += [Heading(2, title), Para(
            "Expert-layer time of MoE++ and of the vanilla MoE with the same FFN experts, in one interleaved run. "
            "Speedup is vanilla time over MoE++ time; ideal is vanilla FFN slots over MoE++ FFN slots (1/rho at "
            "balance); efficiency is speedup over ideal. The paper's Table 3 (expert forward time, hardware not "
            "stated) stands beside the measured rows: compare its shape against tau, not absolute times.")]
        note = one_sided(studies, kind)
        if compare and not note:
            blocks.append(throughput_ratio_table(kind, *studies))
        else:
            blocks += [note] if note else []
            blocks.append(speedup_table(present(per_side)))
            base = baseline_table(present(per_side))
            if base is not None:
                blocks.append(base)
        speed = [[r for r in rows if r["model"] == "moepp"] for rows in per_side]
        key = lambda r: (r[RUN], r["preset"], r["tokens"], r["dtype"], r["pass"], r.get("routing"))  # noqa: E731
        # A curve against tau needs two taus; single-tau runs (token or backend sweeps) are in the tables.
        grid = build_grid(speed, key, lambda k, rows: Panel(
            f"{run_prefix(k[0])}{k[1]}, {k[2]:,} tokens, {k[3]}, {k[4]}", rows)
            if len({r["tau"] for r in rows}) > 1 else None)
        if grid:
            blocks += figure_blocks(grid, sides, draw_speedup_panel, fig_dir, f"{kind}_speedup_vs_tau",
                                    "Speedup of MoE++ over the vanilla MoE against tau: measured, ideal (vanilla "
                                    "over MoE++ FFN slots) and, where it has the setting, the paper's Table 3.")
        if kind == "throughput":
            key = lambda r: (r[RUN], r["preset"], r["dtype"], r["pass"], r.get("routing"))  # noqa: E731
            grid = build_grid(per_side, key, lambda k, rows: Panel(f"{run_prefix(k[0])}{k[1]}, {k[2]}, {k[3]}",
                                                                   rows) if len({r["tokens"] for r in rows}) > 1
                              else None)
            if grid:
                blocks += figure_blocks(grid, sides, draw_tokens_per_s_panel, fig_dir, "throughput_tokens_per_s",
                                  "Throughput against tokens per layer call: MoE++ at each tau, the vanilla MoE, the "
                                  "naive per-expert loop and the dense ceiling of the same FLOPs.")
            else:
                blocks.append(Para("Tokens/s against tokens needs a throughput run with several `--tokens`; these "
                                   "runs have one token count each."))
        blocks += stages_blocks(studies, f"{kind}_stages")
    return blocks
