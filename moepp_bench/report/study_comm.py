"""The report's all-to-all section: measured bytes per token beside the prediction at balance, the
prediction against the number of ranks, and the bytes-per-token figure."""

from __future__ import annotations

from pathlib import Path

from .study_common import (RUN, build_grid, compact, figure_blocks, one_sided, present, run_prefix, side_rows, sig,
                           sortable, tau_text)
from .study_compare import merged_rows, ratio_rows
from .study_document import Block, Column, Heading, Para, Table
from .study_figures import Panel, draw_comm_panel
from .study_inputs import Study

COMM_SETTINGS = (RUN, "preset", "dtype", "tokens_per_rank", "routing")


def comm_table(rows: list[dict]) -> Table:
    out = []
    order = {"moe": 0, "moepp": 1}
    for r in sorted(rows, key=lambda r: sortable((r[RUN], r["preset"], r["dtype"], r["world_size"],
                                                   order.get(r["model"], 9), r["tau"]))):
        measured, predicted = r.get("bytes_per_token_measured"), r.get("bytes_per_token_balance")
        out.append({**r, "vs_prediction": measured / predicted if measured is not None and predicted else None,
                    "analytic": None if r.get("analytic_matches") is None else
                    ("yes" if r["analytic_matches"] else "NO")})
    columns = [Column(RUN, "run"), Column("preset", "preset"), Column("dtype", "dtype"),
               Column("tokens_per_rank", "tokens/rank", "{:,}"), Column("routing", "routing"),
               Column("world_size", "P"), Column("model", "model"), Column("tau", "tau", tau_text),
               Column("ffn_slot_fraction", "FFN slot share", "{:.3f}"),
               Column("bytes_per_token_measured", "measured B/token", sig),
               Column("bytes_per_token_balance", "predicted B/token", sig),
               Column("vs_prediction", "measured / predicted", "{:.3f}"),
               Column("bytes_ratio_vs_moe", "vs MoE", "{:.3f}"), Column("analytic", "equals routing count"),
               Column("dispatch_ms", "dispatch ms", sig), Column("combine_ms", "combine ms", sig)]
    return compact(columns, out, COMM_SETTINGS, "Measured all-to-all bytes per token (one way, dispatch) beside "
                                                "the prediction at balance, K rho (P-1)/P D b")


def predict_table(rows: list[dict]) -> Table:
    sizes = sorted({r["world_size"] for r in rows})
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = (r[RUN], r["preset"], r["dtype"], r["model"] != "moe", r["tau"])
        g = groups.setdefault(key, {RUN: r[RUN], "preset": r["preset"], "dtype": r["dtype"], "model": r["model"],
                                    "tau": r["tau"], "rho": r["rho"]})
        g[f"P{r['world_size']}"] = r["bytes_per_token_balance"]
    out = [groups[k] for k in sorted(groups, key=sortable)]
    columns = [Column(RUN, "run"), Column("preset", "preset"), Column("dtype", "dtype"), Column("model", "model"),
               Column("tau", "tau", tau_text), Column("rho", "rho", "{:.3f}"),
               *(Column(f"P{p}", f"P={p}", sig) for p in sizes)]
    return compact(columns, out, (RUN, "preset", "dtype"), "Predicted bytes per token at balance (one way) against "
                                                           "the number of ranks P")


def comm_section(studies: list[Study], fig_dir: Path) -> list[Block]:
    compare = len(studies) > 1
    measured = [side_rows(s, "comm", compare) for s in studies]
    predicted = [side_rows(s, "comm_predict", compare) for s in studies]
    if not any(measured) and not any(predicted):
        return []
    blocks: list[Block] = [Heading(2, "All-to-all communication"), Para(
        "Expert parallelism over P ranks shards the FFN experts and replicates the zero-computation experts, so "
        "only FFN slots travel: MoE++ sends the share rho of the vanilla MoE's bytes at balance. Bytes are one way "
        "(the combine sends the same rows back); times with several local ranks on few cores are indicative, "
        "bytes are exact.")]
    note = one_sided(studies, "comm")
    if compare and any(measured) and not note:
        a, b = studies
        rows = ratio_rows("comm", merged_rows(a, "comm"), merged_rows(b, "comm"),
                          ("bytes_per_token_measured", "dispatch_ms", "combine_ms"))
        columns = [Column("preset", "preset"), Column("dtype", "dtype"),
                   Column("tokens_per_rank", "tokens/rank", "{:,}"), Column("routing", "routing"),
                   Column("world_size", "P"), Column("model", "model"), Column("tau", "tau", tau_text),
                   Column("bytes_per_token_measured_a", "A B/token", sig),
                   Column("bytes_per_token_measured_b", "B B/token", sig),
                   Column("bytes_per_token_measured_ratio", "bytes B/A", "{:.3f}"),
                   Column("dispatch_ms_ratio", "dispatch time B/A", "{:.3f}"),
                   Column("combine_ms_ratio", "combine time B/A", "{:.3f}")]
        blocks.append(compact(columns, rows, ("preset", "dtype", "tokens_per_rank", "routing"),
                              "Measured bytes and times, B against A"))
    elif present(measured):
        blocks += [note] if note else []
        blocks.append(comm_table(present(measured)))
    if not compare and predicted[0]:
        blocks.append(predict_table(predicted[0]))  # predictions depend on the preset alone: no ratios
    # One panel per (preset, dtype): measured rows and the prediction drawn together.
    tagged = [[{**r, "_measured": True} for r in m] + [{**r, "_measured": False} for r in p]
              for m, p in zip(measured, predicted)]
    key = lambda r: (r[RUN] if r["_measured"] else "", r["preset"], r["dtype"])  # noqa: E731
    grid = build_grid(tagged, key, lambda k, rows: Panel(
        f"{run_prefix(k[0])}{k[1]}, {k[2]}", ([r for r in rows if r["_measured"]],
                                              [r for r in rows if not r["_measured"]])))
    blocks += figure_blocks(grid, [s.name for s in studies], draw_comm_panel, fig_dir, "comm_bytes_per_token",
                      "All-to-all bytes per token (one way) against the number of ranks: lines are the prediction "
                      "at balance, markers what a run measured.", width=5.6, height=4.0)
    return blocks
