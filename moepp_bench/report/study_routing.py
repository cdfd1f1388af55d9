"""The report's routing section: per routing-stats run, expert-type shares and FFN experts per token (per
task and per layer), the tokens with most and fewest FFN experts, routing scores with and without the gating
residual, and load imbalance."""

from __future__ import annotations

import math
from pathlib import Path

from .study_common import compact, figure_blocks, pct, tau_text
from .study_compare import routing_pairs
from .study_document import Block, Column, Heading, Para, Table
from .study_figures import (Panel, draw_ffn_layers_panel, draw_scores_panel, draw_task_types_panel,
                            draw_tokens_panel)
from .study_inputs import ResultDoc, Study

def _run_name(doc: ResultDoc, docs: list[ResultDoc]) -> str:
    name = str(doc.extra.get("checkpoint_name") or doc.run_dir.name)
    if sum(str(d.extra.get("checkpoint_name") or d.run_dir.name) == name for d in docs) > 1:
        return doc.label
    return name


def _ffn_rows(doc: ResultDoc, table: str = "ffn_per_token") -> list[dict]:
    return doc.tables.get(table) or []


def _overall(doc: ResultDoc) -> dict:
    return next((r for r in _ffn_rows(doc) if r["task"] == "all" and r["layer"] == "all"), {})


def routing_overview(docs: list[tuple[str, ResultDoc]]) -> Table:
    out = []
    for name, d in docs:
        e, o = d.extra, _overall(d)
        out.append({"name": name, "checkpoint": e.get("checkpoint"),
                    "tau": e.get("tau") if e.get("tau_known") and e.get("n_zc") else None,
                    "experts": f"{e['n_ffn']} FFN + {e.get('n_zc', 0)} ZC", "top_k": e["top_k"],
                    "tokens": e["tokens"], "tasks": len(e.get("tasks") or []), "k_rho": e["k_rho"],
                    "mean": o.get("mean_ffn_experts"), "ffn": o.get("share_ffn"), "constant": o.get("share_constant"),
                    "copy": o.get("share_copy"), "zero": o.get("share_zero")})
    columns = [Column("name", "run"), Column("checkpoint", "checkpoint"), Column("tau", "tau", tau_text),
               Column("experts", "experts"), Column("top_k", "K"), Column("tokens", "tokens", "{:,}"),
               Column("tasks", "tasks"), Column("k_rho", "K rho", "{:.3f}"),
               Column("mean", "FFN experts per token", "{:.3f}"), Column("ffn", "FFN %", pct),
               Column("constant", "constant %", pct), Column("copy", "copy %", pct), Column("zero", "zero %", pct)]
    return Table(columns, out, "Routing over all layers and tasks (tau '-': a vanilla MoE, or not recorded in "
                               "the checkpoint)")


def task_table(name: str, doc: ResultDoc) -> Table | None:
    rows = [r for r in _ffn_rows(doc) if r["layer"] == "all" and r["task"] != "all"]
    if not rows or not doc.extra.get("n_zc"):  # a vanilla MoE sends every slot to FFN experts
        return None
    columns = [Column("task", "task"), Column("tokens", "tokens", "{:,}"),
               Column("mean_ffn_experts", "FFN experts per token", "{:.3f}"), Column("share_ffn", "FFN %", pct),
               Column("share_constant", "constant %", pct), Column("share_copy", "copy %", pct),
               Column("share_zero", "zero %", pct)]
    return Table(columns, rows, f"{name}: routing per task, all layers (K rho = {doc.extra['k_rho']:.3f})")


def imbalance_table(name: str, doc: ResultDoc) -> Table:
    rows = sorted(doc.tables["imbalance"], key=lambda r: (r["layer"], r["experts"] != "ffn"))
    columns = [Column("layer", "layer"), Column("experts", "experts"), Column("n_experts", "n"),
               Column("cv", "CV", "{:.3f}"), Column("maxvio", "MaxVio", "{:.3f}"), Column("gini", "Gini", "{:.3f}"),
               Column("entropy_norm", "entropy / ln n", "{:.3f}"), Column("jain", "Jain", "{:.3f}"),
               Column("maxvio_vs_tau_target", "MaxVio vs tau target", "{:.3f}"),
               Column("drop_rate", "dropped %", pct)]
    if all(r.get("drop_rate") is None for r in rows):
        columns = columns[:-1]
    return Table(columns, rows, f"{name}: load imbalance per layer, FFN experts alone and all experts "
                                f"(CV, MaxVio, Gini: 0 is balanced; entropy / ln n, Jain: 1 is balanced)")


def _score_layer(doc: ResultDoc) -> int:
    return max(r["layer"] for r in doc.tables["routing_score_hist"])


def _score_title(doc: ResultDoc, layer: int, rank: str) -> str:
    stats = {r["gating_residual"]: r for r in doc.tables["routing_scores"]
             if r["layer"] == layer and r["rank"] == rank}
    parts = [f"{'on' if k == 'on' else 'off'}: mean {s['mean']:.3f}, sd {math.sqrt(max(s['variance'] or 0, 0)):.3f}"
             for k, s in sorted(stats.items(), key=lambda kv: kv[0] != "on")]
    head = f"layer {layer}, {'highest' if rank == 'top1' else 'second-highest'} score"
    return head + ("\n" + "; ".join(parts) if parts else "")


def routing_figures(columns: list[list[tuple[str, ResultDoc] | None]], sides: list[str], fig_dir: Path
                    ) -> list[Block]:
    """columns[i][j]: the routing run of setting row i on side j (j: A/B with --compare, else one side)."""
    def grid_of(make) -> list[list[Panel | None]]:
        return [[None if cell is None else make(*cell) for cell in row] for row in columns]

    blocks: list[Block] = []
    grid = grid_of(lambda name, d: Panel(name, ([r for r in _ffn_rows(d) if r["layer"] == "all"], d.extra)))
    blocks += figure_blocks(grid, sides, draw_task_types_panel, fig_dir, "routing_task_expert_types",
                      "Share of routing slots per expert type and task, over all layers (the paper's Figure 4); "
                      "numbers above the bars: mean FFN experts per token; dashed: rho, the FFN share at balance.")

    def layers(d):
        per_layer = [r for r in _ffn_rows(d) if r["task"] == "all" and r["layer"] != "all"]
        off = [r for r in _ffn_rows(d, "ffn_per_token_no_residual") if r["task"] == "all" and r["layer"] != "all"]
        return per_layer, off or None, d.extra
    grid = grid_of(lambda name, d: Panel(name, layers(d)))
    blocks += figure_blocks(grid, sides, draw_ffn_layers_panel, fig_dir, "routing_ffn_per_layer",
                      "Mean FFN experts per token in each MoE layer, with the gating residual and with it switched "
                      "off at inference; dotted: K rho, the expectation at balance.")

    # without zero-computation experts every token gets K FFN experts: nothing to rank
    grid = grid_of(lambda name, d: Panel(name, (d.extra.get("highest_tokens") or [],
                                               d.extra.get("lowest_tokens") or [], d.extra))
                   if d.extra.get("highest_tokens") and d.extra.get("n_zc") else None)
    grid = [row for row in grid if any(p is not None for p in row)]
    if grid:
        n = max(len(p.data[0]) + len(p.data[1]) for row in grid for p in row if p is not None)
        blocks += figure_blocks(grid, sides, draw_tokens_panel, fig_dir, "routing_tokens",
                          "Tokens with the most (top) and the fewest (bottom) FFN experts, mean over layers, among "
                          "tokens seen often enough (the paper's Figure 5); n: occurrences.",
                          height=max(3.2, 0.22 * n + 1.4), sharey=False)

    score_rows = []
    for row in columns:
        for rank in ("top1", "top2"):
            cells = []
            for cell in row:
                if cell is None:
                    cells.append(None)
                    continue
                name, d = cell
                layer = _score_layer(d)
                hist = [r for r in d.tables["routing_score_hist"] if r["layer"] == layer and r["rank"] == rank]
                cells.append(Panel(f"{name}, {_score_title(d, layer, rank)}", hist) if hist else None)
            if any(c is not None for c in cells):
                score_rows.append(cells)
    blocks += figure_blocks(score_rows, sides, draw_scores_panel, fig_dir, "routing_scores",
                      "Highest and second-highest routing scores in the last MoE layer, with the gating residual "
                      "and with it switched off at inference (the paper's Figure 6); titles give mean and standard "
                      "deviation.", maxcols=2, height=3.6)
    return blocks


def routing_section(studies: list[Study], fig_dir: Path) -> list[Block]:
    compare = len(studies) > 1
    blocks: list[Block] = []
    if compare:
        pairs = routing_pairs(*studies)
        if not pairs and not any(s.of("routing-stats") for s in studies):
            return []
        blocks += [Heading(2, "Routing"), _routing_intro()]
        if not pairs:
            only = "A" if studies[0].of("routing-stats") else "B"
            blocks.append(Para(f"Only {only} holds routing-stats runs; nothing to compare."))
            return blocks
        named = [(_run_name(a, studies[0].of("routing-stats")), a, _run_name(b, studies[1].of("routing-stats")), b)
                 for a, b in pairs]
        blocks.append(routing_overview([(f"{side}: {name}", d) for na, a, nb, b in named
                                        for side, name, d in (("A", na, a), ("B", nb, b))]))
        names = [na if na == nb else f"{na} vs {nb}" for na, _, nb, _ in named]
        ratio = []
        for name, (a, b) in zip(names, pairs):
            layers_b = {r["layer"]: r for r in b.rows}
            for ra in a.rows:
                rb = layers_b.get(ra["layer"])
                if rb is None:
                    continue
                ratio.append({"name": name, "layer": ra["layer"], "mean_a": ra["mean_ffn_experts"],
                              "mean_b": rb["mean_ffn_experts"],
                              "mean_ratio": rb["mean_ffn_experts"] / ra["mean_ffn_experts"]
                              if ra["mean_ffn_experts"] else None,
                              "zero_a": ra.get("share_zero"), "zero_b": rb.get("share_zero"),
                              "cv_a": ra.get("cv_ffn"), "cv_b": rb.get("cv_ffn")})
        columns = [Column("name", "run"), Column("layer", "layer"), Column("mean_a", "A FFN/token", "{:.3f}"),
                   Column("mean_b", "B FFN/token", "{:.3f}"), Column("mean_ratio", "FFN/token B/A", "{:.3f}"),
                   Column("zero_a", "A zero %", pct), Column("zero_b", "B zero %", pct),
                   Column("cv_a", "A CV (FFN)", "{:.3f}"), Column("cv_b", "B CV (FFN)", "{:.3f}")]
        blocks.append(compact(columns, ratio, ("name",), "Per layer, B against A"))
        cells = [[(na, a), (nb, b)] for na, a, nb, b in named]
        blocks += routing_figures(cells, [s.name for s in studies], fig_dir)
        return blocks
    docs = studies[0].of("routing-stats")
    if not docs:
        return []
    named = [(_run_name(d, docs), d) for d in docs]
    blocks += [Heading(2, "Routing"), _routing_intro(), routing_overview(named)]
    for name, d in named:
        table = task_table(name, d)
        if table is not None:
            blocks.append(table)
    blocks += routing_figures([[cell] for cell in named], [""], fig_dir)
    blocks.append(Heading(3, "Load imbalance"))
    blocks += [imbalance_table(name, d) for name, d in named]
    return blocks


def _routing_intro() -> Para:
    return Para("How checkpoints route real text (routing-stats): the share of routing slots per expert type, the "
                "FFN experts a token gets (K rho expected at balance), which tokens get most and fewest, routing "
                "scores with and without the gating residual, and load imbalance.")
