"""Speedup of MoE++ over the vanilla MoE against tau: measured, ideal 1/rho, and (optionally) the paper's."""

from __future__ import annotations

from itertools import groupby
from pathlib import Path

from ..paper import paper_row
from .figures import COLORS, new_figure, save_figure


def plot_speedup_vs_tau(rows: list[dict], out_dir: str | Path, stem: str, with_paper: bool = False) -> list[Path]:
    """One panel per (preset, tokens); nothing is drawn when there is a single tau."""
    pp = sorted((r for r in rows if r["model"] == "moepp"), key=lambda r: (r["preset"], r["tokens"], r["tau"]))
    # a panel needs two taus on one backend to draw a line
    panels = [(key, list(group)) for key, group in groupby(pp, key=lambda r: (r["preset"], r["tokens"]))]
    panels = [(k, g) for k, g in panels if len({r["tau"] for r in g}) > 1]
    if not panels:
        return []
    fig, axes = new_figure(ncols=min(len(panels), 4), nrows=(len(panels) + 3) // 4, width=4.2, height=3.4)
    flat = axes.ravel()
    for ax, ((preset, tokens), group) in zip(flat, panels):
        by_backend = {}
        for r in group:
            by_backend.setdefault(r["backend"], []).append(r)
        first_rows = next(iter(by_backend.values()))
        taus = [r["tau"] for r in first_rows]
        ax.plot(taus, [r["ideal_speedup"] for r in first_rows], "--", color=COLORS["ideal"],
                label="ideal (vanilla/MoE++ FFN slots)")
        for i, (backend, brows) in enumerate(by_backend.items()):
            label = "measured" + (f" ({backend})" if len(by_backend) > 1 else " (this run)")
            ax.plot([r["tau"] for r in brows], [r["speedup"] for r in brows], "o^vsD"[i % 5] + "-",
                    color=COLORS["moepp"] if i == 0 else None, label=label)
        if with_paper:
            paper = [(t, paper_row(preset, t).get("paper_speedup")) for t in taus]
            paper = [(t, s) for t, s in paper if s is not None]
            if paper:
                ax.plot(*zip(*paper), "s:", color=COLORS["paper"], label="paper Table 3")
        ax.axhline(1.0, color=COLORS["moe"], lw=0.8)
        first = group[0]
        ax.set_title(f"{preset}: {tokens} tokens, {first['dtype']}, {first['pass']}")
        ax.set_xlabel("tau (ZC weight in the balance loss)")
        ax.set_ylabel("speedup over vanilla MoE (x)")
        ax.set_ylim(bottom=0)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    flat[0].legend(loc="upper right")
    return save_figure(fig, out_dir, stem)
