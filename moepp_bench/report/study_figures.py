"""The report's figures, redrawn from result rows in the shared style (report/figures.py), so a report looks
the same whatever versions wrote its runs.

Every figure is a grid of panels: one row per setting (preset, token count, routing run...) and, with
--compare, one column per side (A, B) with a shared y axis, so the two runs read side by side. Without
--compare the panels wrap into rows of up to three. One legend per figure, below the panels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib.cm as cm
import numpy as np
from matplotlib.ticker import EngFormatter

from ..measure.comm_model import bytes_per_token_at_balance
from ..paper import paper_row
from .figures import COLORS, new_figure, save_figure
from .routing_plots import TYPE_COLOURS, TYPE_LABELS, display_token

EXPERT_TYPES = ("ffn", "constant", "copy", "zero")
FLOP_COMPONENTS = ("router", "ffn_experts", "constant_experts", "copy_experts", "zero_experts")
COMPONENT_LABELS = {"router": "router", "ffn_experts": "FFN experts", "constant_experts": "constant experts",
                    "copy_experts": "copy experts", "zero_experts": "zero experts"}
COMPONENT_COLOURS = {"router": COLORS["dense"], "ffn_experts": TYPE_COLOURS["ffn"],
                     "constant_experts": TYPE_COLOURS["constant"], "copy_experts": TYPE_COLOURS["copy"],
                     "zero_experts": TYPE_COLOURS["zero"]}
P_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TAU_LABEL = "tau (ZC weight in the balance loss)"


@dataclass
class Panel:
    title: str
    data: object


Grid = list[list["Panel | None"]]  # [setting][side]


def tau_colours(taus) -> dict:
    taus = sorted(set(taus))
    return dict(zip(taus, cm.viridis(np.linspace(0.0, 0.85, max(len(taus), 1)))))


def _f(value) -> float:
    """A number to plot: null (a non-finite value in the result file) becomes NaN, a gap in the line."""
    return float("nan") if value is None else float(value)


def _short(text: str, limit: int = 18) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def draw_grid(grid: Grid, sides: list[str], draw: Callable, out_dir: Path, stem: str, width: float = 4.6,
              height: float = 3.4, maxcols: int = 3, sharey: bool = True) -> Path:
    """Lay out the panels, call draw(ax, panel.data) for each, add one legend below; returns the PNG path."""
    compare = len(sides) > 1
    if compare:
        fig, axes = new_figure(ncols=len(sides), nrows=len(grid), width=width, height=height)
        cells = [(axes[r][c], grid[r][c], sides[c]) for r in range(len(grid)) for c in range(len(sides))]
        if sharey:
            for r in range(len(grid)):
                for c in range(1, len(sides)):
                    axes[r][c].sharey(axes[r][0])
        unused = []
    else:
        ncols = min(len(grid), maxcols)
        nrows = math.ceil(len(grid) / ncols)
        fig, axes = new_figure(ncols=ncols, nrows=nrows, width=width, height=height)
        flat = list(axes.ravel())
        cells = [(flat[i], grid[i][0], sides[0]) for i in range(len(grid))]
        unused = flat[len(grid):]
    for ax in unused:
        ax.set_visible(False)
    for ax, panel, side in cells:
        if panel is None:
            ax.text(0.5, 0.5, f"no such run in {side}", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        draw(ax, panel.data)
        ax.set_title(f"{side}: {panel.title}" if side else panel.title)
    handles: dict[str, object] = {}
    for ax, _, _ in cells:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if not label.startswith("_"):
                handles.setdefault(label, handle)
    if handles:
        ncol = min(len(handles), 3 if (compare or len(grid) > 1) else 2)
        fig.legend(list(handles.values()), list(handles.keys()), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=ncol, frameon=False)
    return save_figure(fig, out_dir, stem)[0]


# Throughput ----------------------------------------------------------------------------------------------------
def draw_speedup_panel(ax, rows: list[dict]) -> None:
    """rows: MoE++ rows of one (preset, tokens, dtype, pass) setting, any backends."""
    by_backend: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["tau"]):
        by_backend.setdefault(r["backend"], []).append(r)
    first = next(iter(by_backend.values()))
    ax.plot([r["tau"] for r in first], [_f(r["ideal_speedup"]) for r in first], "--", color=COLORS["ideal"],
            label="ideal: vanilla / MoE++ FFN slots")
    for i, (backend, brows) in enumerate(by_backend.items()):
        ax.plot([r["tau"] for r in brows], [_f(r["speedup"]) for r in brows], "o^vsD"[i % 5] + "-",
                color=COLORS["moepp"] if i == 0 else None, label=f"measured ({backend})")
    preset = rows[0]["preset"]
    paper = [(r["tau"], paper_row(preset, r["tau"]).get("paper_speedup")) for r in first]
    paper = [(t, s) for t, s in paper if s is not None]
    if paper:
        ax.plot(*zip(*paper), "s:", color=COLORS["paper"], label="paper Table 3")
    ax.axhline(1.0, color=COLORS["moe"], lw=0.8)
    ax.set_xlabel(TAU_LABEL)
    ax.set_ylabel("speedup over vanilla MoE (x)")
    ax.set_ylim(bottom=0)


def draw_tokens_per_s_panel(ax, rows: list[dict]) -> None:
    """rows: every model of one (preset, dtype, pass) setting at several token counts (any backends)."""
    colours = tau_colours(r["tau"] for r in rows if r["model"] == "moepp")
    several = len({r["backend"] for r in rows if r["model"] in ("moe", "moepp")}) > 1
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        series.setdefault((r["model"], r["tau"], r["backend"]), []).append(r)
    styles = {"dense-ceiling": ("D--", COLORS["dense"], "dense ceiling (same FLOPs as MoE)"),
              "moe": ("s-", COLORS["moe"], "vanilla MoE"), "moe-loop": ("v-", COLORS["loop"], "MoE, per-expert loop")}
    rank = {"dense-ceiling": 0, "moe": 1, "moe-loop": 2, "moepp": 3}
    markers = "o^vsD"
    backends = sorted({r["backend"] for r in rows if r["model"] in ("moe", "moepp")})
    for model, tau, backend in sorted(series, key=lambda k: (rank.get(k[0], 9), k[1] or 0, k[2])):
        pts = sorted((r["tokens"], _f(r["tokens_per_s"])) for r in series[(model, tau, backend)])
        style, colour, label = styles.get(model, ("o-", colours.get(tau), f"MoE++ tau={tau:g}" if tau is not None
                                                  else model))
        if several and model in ("moe", "moepp"):
            style = markers[backends.index(backend) % len(markers)] + style[1:]
            label += f" ({backend})"
        ax.plot(*zip(*pts), style, color=colour, label=label)
    tokens = sorted({r["tokens"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(tokens, [f"{t:,}" for t in tokens])
    ax.minorticks_off()
    ax.set_xlabel("tokens per layer call")
    ax.yaxis.set_major_formatter(EngFormatter(sep=""))  # 400k, 1.2M: no offset text above the axis
    ax.set_ylabel("throughput (tokens/s)")
    ax.set_ylim(bottom=0)


# FLOPs ---------------------------------------------------------------------------------------------------------
def flop_bar_label(row: dict) -> str:
    if row["model"] == "moe":
        return "MoE"
    if row.get("layer") is not None:
        return f"MoE++\nlayer {row['layer']}"
    return f"MoE++\ntau {row['tau']:g}"


def draw_flops_panel(ax, data: tuple[list[dict], float, str]) -> None:
    """data: (forward component rows of one setting, FLOPs per unit, unit name); bars: MoE then MoE++ by tau
    (or by layer for a checkpoint), stacked by component."""
    rows, scale, unit = data
    bars: dict[tuple, dict[str, float]] = {}
    labels: dict[tuple, str] = {}
    for r in rows:
        key = (r["model"] != "moe", r.get("layer") if r.get("layer") is not None else -1, r["tau"] or 0.0)
        bars.setdefault(key, {})[r["component"]] = r["flops"] / scale
        labels[key] = flop_bar_label(r)
    keys = sorted(bars)
    x = np.arange(len(keys))
    bottom = np.zeros(len(keys))
    for comp in FLOP_COMPONENTS:
        values = np.array([bars[k].get(comp, 0.0) for k in keys])
        if not values.any():
            continue  # copy and zero experts do no matmuls: no bar to stack
        ax.bar(x, values, 0.65, bottom=bottom, color=COMPONENT_COLOURS[comp], label=COMPONENT_LABELS[comp])
        bottom += values
    top = bottom.max() if len(bottom) else 1.0
    for xi, total in zip(x, bottom):
        ax.text(xi, total + 0.01 * top, f"{total:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [labels[k] for k in keys], fontsize=8)
    ax.set_ylabel(f"forward matmul {unit} per layer call")
    # only ever raise the limit: with --compare the two sides share it, and the taller bars must fit
    ax.set_ylim(0, max(ax.get_ylim()[1], top * 1.12 if top > 0 else 1))


# All-to-all ----------------------------------------------------------------------------------------------------
def draw_comm_panel(ax, data: tuple[list[dict], list[dict]]) -> None:
    """data: (measured comm rows, predict rows) of one (preset, dtype) setting. Lines: K rho (P-1)/P D b at
    balance; markers: measured."""
    measured, predicted = data
    first = (measured or predicted)[0]
    K, D, b, n_ffn, n_zc = (first[k] for k in ("top_k", "d_model", "bytes_per_element", "n_ffn", "n_zc"))
    sizes = [r["world_size"] for r in measured + predicted]
    p_max = max(sizes + [8])
    grid = [p for p in P_GRID if p <= p_max] + ([p_max] if p_max not in P_GRID else [])
    taus = sorted({r["tau"] for r in measured + predicted if r["model"] == "moepp"})
    colours = tau_colours(taus)
    ax.plot(grid, [bytes_per_token_at_balance(K, 1.0, p, D, b) for p in grid], "-", color=COLORS["moe"],
            label="MoE, predicted")
    for tau in taus:
        rho = tau * n_ffn / (tau * n_ffn + n_zc)
        ax.plot(grid, [bytes_per_token_at_balance(K, rho, p, D, b) for p in grid], "-", color=colours[tau],
                label=f"MoE++ tau={tau:g}, predicted (rho={rho:.2f})")
        pts = sorted((r["world_size"], r["bytes_per_token_measured"]) for r in measured
                     if r["model"] == "moepp" and r["tau"] == tau and r["bytes_per_token_measured"] is not None)
        if pts:
            ax.plot(*zip(*pts), "o", color=colours[tau], markeredgecolor="black", markeredgewidth=0.6,
                    markersize=7, label="_measured")
    moe_pts = sorted({(r["world_size"], r["bytes_per_token_measured"]) for r in measured
                      if r["model"] == "moe" and r["bytes_per_token_measured"] is not None})
    if moe_pts:
        ax.plot(*zip(*moe_pts), "s", color="white", markeredgecolor="black", markersize=7, label="MoE, measured")
    if any(r["model"] == "moepp" for r in measured):
        ax.plot([], [], "o", color="grey", markeredgecolor="black", label="MoE++, measured (colour: tau)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(grid, [str(p) for p in grid])
    ax.set_xlabel("ranks P (expert-parallel world size)")
    ax.set_ylabel(f"all-to-all bytes per token, one way (B, {first['dtype']})")
    ax.set_ylim(bottom=0)


# Routing -------------------------------------------------------------------------------------------------------
def draw_task_types_panel(ax, data: tuple[list[dict], dict]) -> None:
    """data: (ffn_per_token rows with layer 'all', one per task, and the summary): slot shares per expert type."""
    rows, summary = data
    tasks = [r for r in rows if r["task"] != "all"] or rows
    x = np.arange(len(tasks))
    bottom = np.zeros(len(tasks))
    for t in EXPERT_TYPES:
        share = np.array([(r.get(f"share_{t}") or 0.0) * 100 for r in tasks])
        ax.bar(x, share, 0.6, bottom=bottom, color=TYPE_COLOURS[t], label=f"{TYPE_LABELS[t]} experts")
        bottom += share
    if summary.get("n_zc"):
        ax.axhline(summary["rho"] * 100, color="black", ls="--", lw=1, label="FFN share at balance, rho")
    for i, r in enumerate(tasks):
        ax.text(i, 101, f"{r['mean_ffn_experts']:.2f}", ha="center", va="bottom", fontsize=8)
    rotate = len(tasks) > 3
    ax.set_xticks(x, [_short(r["task"]) for r in tasks], rotation=25 if rotate else 0,
                  ha="right" if rotate else "center", fontsize=8)
    ax.set_ylim(0, 112)
    ax.set_ylabel("share of routing slots (%)")
    ax.set_xlabel("task (above bars: mean FFN experts per token)")


def draw_ffn_layers_panel(ax, data: tuple[list[dict], list[dict] | None, dict]) -> None:
    """data: (per-layer rows of all tasks, the same with the gating residual off or None, summary)."""
    rows, off, summary = data
    layers = [r["layer"] for r in rows]
    ax.plot(layers, [_f(r["mean_ffn_experts"]) for r in rows], "o-", color=TYPE_COLOURS["ffn"],
            label="mean FFN experts per token")
    if off:
        ax.plot([r["layer"] for r in off], [_f(r["mean_ffn_experts"]) for r in off], "s--", color=COLORS["paper"],
                mfc="none", label="gating residual off (at inference)")
    ax.axhline(summary["k_rho"], color="black", ls=":", lw=1.2, label="K rho: expected at balance")
    ax.set_xticks(layers, [str(layer) for layer in layers])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("FFN experts per token (count)")
    ax.set_ylim(0, summary["top_k"] * 1.05)


def draw_tokens_panel(ax, data: tuple[list[dict], list[dict], dict]) -> None:
    """data: (highest tokens, lowest tokens, summary): mean FFN experts per token over layers."""
    high, low, summary = data
    rows = high + low
    y = np.arange(len(rows))
    ax.barh(y[:len(high)], [r["mean_ffn_experts"] for r in high], color=COLORS["moepp"], label="most FFN experts")
    ax.barh(y[len(high):], [r["mean_ffn_experts"] for r in low], color=COLORS["paper"], label="fewest FFN experts")
    ax.set_yticks(y, [f"{_short(display_token(str(r['token'])))} (n={r['occurrences']:,})" for r in rows],
                  fontsize=7)
    ax.invert_yaxis()
    if high and low:
        ax.axhline(len(high) - 0.5, color="black", lw=0.8)
    ax.axvline(summary["k_rho"], color="black", ls=":", lw=1.2, label="K rho: expected at balance")
    ax.set_xlim(0, summary["top_k"])
    ax.set_xlabel("mean FFN experts per token, over layers (count)")


def draw_scores_panel(ax, hist: list[dict]) -> None:
    """hist: histogram rows of one layer and score rank, with the gating residual on and (if ablated) off."""
    for residual in ("on", "off"):
        part = sorted((r for r in hist if r["gating_residual"] == residual), key=lambda r: r["bin_lo"])
        if not part:
            continue
        total = sum(r["tokens"] for r in part) or 1
        frac = np.array([r["tokens"] / total * 100 for r in part])
        edges = np.array([r["bin_lo"] for r in part] + [part[-1]["bin_hi"]])
        if residual == "on":
            ax.stairs(frac, edges, fill=True, color=COLORS["moepp"], alpha=0.5, label="with gating residual")
        else:
            ax.stairs(frac, edges, color=COLORS["paper"], lw=1.4, label="gating residual off (at inference)")
    used = [r for r in hist if r["tokens"] > 0]
    if used:
        lo, hi = min(r["bin_lo"] for r in used), max(r["bin_hi"] for r in used)
        pad = 0.05 * (hi - lo) + 0.01
        ax.set_xlim(max(0.0, lo - pad), min(1.0, hi + pad))
    ax.set_xlabel("routing score (softmax over all experts)")
    ax.set_ylabel("tokens (%)")
