"""Plots of a routing-stats run, drawn from the files in its output directory (so they can be redrawn without
routing again): draw_routing_plots(DIR) reads the CSV tables and summary.json and writes PNG + SVG pairs."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

TYPE_COLOURS = {"ffn": "#4c72b0", "constant": "#dd8452", "copy": "#55a868", "zero": "#8c8c8c"}
TYPE_LABELS = {"ffn": "FFN", "constant": "constant", "copy": "copy", "zero": "zero"}
MAX_PANELS = 4  # layers drawn in the per-layer grids; evenly spaced when there are more


def display_token(text: str) -> str:
    """A token as a readable label: leading/trailing spaces as '␣', control characters escaped."""
    shown = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    stripped = shown.strip(" ")
    lead = len(shown) - len(shown.lstrip(" "))
    trail = len(shown) - len(shown.rstrip(" "))
    return "␣" * lead + stripped + "␣" * trail if stripped else "␣" * len(shown)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _short(label: str, limit: int = 18) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    paths = []
    for ext in ("png", "svg"):
        target = out_dir / f"{name}.{ext}"
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=out_dir)
        os.close(fd)
        try:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file private; a plot should not be
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        paths.append(target)
    plt.close(fig)
    return paths


def _pick_layers(layers: list[int]) -> list[int]:
    if len(layers) <= MAX_PANELS:
        return layers
    idx = np.linspace(0, len(layers) - 1, MAX_PANELS).round().astype(int)
    return [layers[i] for i in sorted(set(idx))]


def _title_suffix(summary: dict) -> str:
    return f"{summary.get('checkpoint_name', '')}, {summary.get('tokens', 0):,} tokens"


def _k_rho_label(summary: dict) -> str:
    tau = summary.get("tau")
    if summary.get("tau_known"):
        return f"prediction Kρ (τ={tau:g})"
    return f"Kρ if τ={tau:g} (τ not recorded)"


# Expert load -----------------------------------------------------------------------------------------------
def plot_expert_load(load: pd.DataFrame, summary: dict, out_dir: Path) -> list[Path]:
    share = load.pivot(index="layer", columns="expert", values="share").sort_index()
    types = load.drop_duplicates("expert").sort_values("expert")["expert_type"].tolist()
    L, N = share.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * N + 2.5), max(2.6, 0.42 * L + 1.6)))
    im = ax.imshow(share.values * 100, aspect="auto", cmap="viridis", origin="upper")
    ax.set_xticks(range(N), [str(e) for e in share.columns])
    ax.set_yticks(range(L), [str(l) for l in share.index])
    ax.set_xlabel("expert index")
    ax.set_ylabel("MoE layer")
    if L * N <= 160:
        vmax = np.nanmax(share.values * 100)
        for (i, j), v in np.ndenumerate(share.values * 100):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 0.6 * vmax else "black")
    # Expert-type groups on the top axis, separated by lines.
    groups, start = [], 0
    for j in range(1, N + 1):
        if j == N or types[j] != types[start]:
            groups.append((types[start], start, j - 1))
            start = j
    top = ax.secondary_xaxis("top")
    top.set_xticks([(a + b) / 2 for _, a, b in groups], [TYPE_LABELS[t] for t, _, _ in groups])
    top.tick_params(length=0)
    for _, a, _ in groups[1:]:
        ax.axvline(a - 0.5, color="white", lw=1.5)
    fig.colorbar(im, ax=ax, label="share of routing slots (%)")
    ax.set_title(f"Expert load per layer ({_title_suffix(summary)})", pad=22)
    return _save(fig, out_dir, "expert_load")


# FFN experts per token -------------------------------------------------------------------------------------
def plot_ffn_per_token(ffn: pd.DataFrame, summary: dict, out_dir: Path,
                       ffn_no_residual: pd.DataFrame | None) -> list[Path]:
    rows = ffn[(ffn["task"] == "all") & (ffn["layer"] != "all")].copy()
    rows["layer"] = rows["layer"].astype(int)
    K = summary["top_k"]
    L = len(rows)
    fig, (ax_h, ax_m) = plt.subplots(1, 2, figsize=(13, 4.2))
    width = 0.8 / (K + 1)
    x = np.arange(L)
    blues = plt.cm.Blues(np.linspace(0.35, 0.9, K + 1))
    for j in range(K + 1):
        share = rows[f"ffn_{j}"] / rows["tokens"] * 100
        ax_h.bar(x + (j - K / 2) * width, share, width, color=blues[j], label=f"{j} FFN expert{'s' * (j != 1)}")
    ax_h.set_xticks(x, rows["layer"].astype(str))
    ax_h.set_xlabel("MoE layer")
    ax_h.set_ylabel("share of tokens (%)")
    ax_h.set_title("FFN experts per token")
    tallest = max((rows[f"ffn_{j}"] / rows["tokens"]).max() for j in range(K + 1)) * 100
    ax_h.set_ylim(0, tallest * 1.35)  # headroom so the legend never covers a bar
    ax_h.legend(frameon=False, fontsize=8, loc="upper left", ncol=K + 1)

    ax_m.plot(x, rows["mean_ffn_experts"], "o-", color=TYPE_COLOURS["ffn"], label="measured mean")
    shown = list(rows["mean_ffn_experts"])
    if ffn_no_residual is not None:
        off = ffn_no_residual[(ffn_no_residual["task"] == "all") & (ffn_no_residual["layer"] != "all")]
        ax_m.plot(x, off["mean_ffn_experts"], "s--", color="#c44e52", mfc="none",
                  label="gating residual off (inference)")
        shown += list(off["mean_ffn_experts"])
    k_rho = summary.get("k_rho")
    ax_m.axhline(k_rho, color="black", ls="--", lw=1, label=_k_rho_label(summary))
    ax_m.set_xticks(x, rows["layer"].astype(str))
    ax_m.set_xlabel("MoE layer")
    ax_m.set_ylabel("mean FFN experts per token")
    lo, hi = min(min(shown), k_rho), max(max(shown), k_rho)
    pad = max(0.05, 0.15 * (hi - lo))
    ax_m.set_ylim(max(0.0, lo - pad), hi + pad)
    ax_m.set_title(f"Mean FFN experts per token (K={K})")
    ax_m.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # never over the data
    fig.suptitle(_title_suffix(summary), fontsize=9)
    fig.tight_layout()
    return _save(fig, out_dir, "ffn_per_token")


def plot_task_types(ffn: pd.DataFrame, summary: dict, out_dir: Path) -> list[Path]:
    """The paper's Figure 4: per task, the share of routing slots per expert type (over all layers)."""
    rows = ffn[ffn["layer"] == "all"]
    tasks = [t for t in rows["task"].tolist() if t != "all"] or ["all"]
    rows = rows.set_index("task").loc[tasks]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(tasks) + 2.5), 4.4))
    bottom = np.zeros(len(tasks))
    x = np.arange(len(tasks))
    for t in ("ffn", "constant", "copy", "zero"):
        share = rows[f"share_{t}"].to_numpy() * 100
        if not np.nansum(share):
            continue  # an expert type this checkpoint does not have (a vanilla MoE has FFN experts only)
        ax.bar(x, share, 0.6, bottom=bottom, color=TYPE_COLOURS[t], label=TYPE_LABELS[t])
        bottom += share
    rho = summary.get("rho")
    if rho is not None and summary.get("n_zc", 0) > 0:
        ax.axhline(rho * 100, color="black", ls="--", lw=1,
                   label=f"FFN share ρ={rho:.3f}" + ("" if summary.get("tau_known") else " (τ assumed)"))
    for i, mean in enumerate(rows["mean_ffn_experts"]):
        ax.text(i, 101, f"{mean:.3f}", ha="center", va="bottom", fontsize=8)
    crowded = len(tasks) * max(len(t) for t in tasks) > 48
    ax.set_xticks(x, tasks, rotation=25 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylim(0, 112)
    ax.set_ylabel("share of routing slots (%)")
    ax.set_xlabel("task (numbers: mean FFN experts per token)")
    ax.set_title(f"Routing by expert type per task, all layers ({_title_suffix(summary)})", fontsize=10)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save(fig, out_dir, "task_expert_types")


# Tokens ----------------------------------------------------------------------------------------------------
def plot_tokens(summary: dict, out_dir: Path) -> list[Path]:
    """The paper's Figure 5: tokens with the most and the fewest FFN experts (mean over layers)."""
    high, low = summary.get("highest_tokens") or [], summary.get("lowest_tokens") or []
    if not high:
        return []
    n = max(len(high), len(low))
    fig, axes = plt.subplots(1, 2, figsize=(11, max(3.0, 0.28 * n + 1.6)))
    k_rho, K = summary.get("k_rho"), summary["top_k"]
    for ax, rows, title, colour in ((axes[0], high, "most FFN experts", "#4c72b0"),
                                    (axes[1], low, "fewest FFN experts", "#c44e52")):
        labels = [f"{_short(display_token(r['token']))}  (n={r['occurrences']})" for r in rows]
        values = [r["mean_ffn_experts"] for r in rows]
        y = np.arange(len(rows))
        ax.barh(y, values, color=colour)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        line = ax.axvline(k_rho, color="black", ls="--", lw=1)
        ax.set_xlim(0, K)
        ax.set_xlabel("mean FFN experts per token (over layers)")
        ax.set_title(f"Tokens with the {title}")
    fig.suptitle(f"Tokens seen at least {summary.get('min_count')} times ({_title_suffix(summary)})", fontsize=9)
    fig.legend([line], [_k_rho_label(summary)], loc="lower center", ncol=1, frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, out_dir, "token_ffn")


# Routing scores --------------------------------------------------------------------------------------------
def plot_scores(hist: pd.DataFrame, scores: pd.DataFrame, summary: dict, out_dir: Path) -> list[Path]:
    """The paper's Figure 6: top-1 and top-2 routing scores, with and without the gating residual."""
    layers = _pick_layers(sorted(hist["layer"].unique().tolist()))
    ranks = [r for r in ("top1", "top2") if r in set(hist["rank"])]
    ablated = "off" in set(hist["gating_residual"])
    fig, axes = plt.subplots(len(layers), len(ranks), figsize=(5.4 * len(ranks), 2.5 * len(layers) + 1.0),
                             squeeze=False)
    names = {"on": "with gating residual", "off": "residual off at inference"}
    handles = {}
    for i, layer in enumerate(layers):
        for j, rank in enumerate(ranks):
            ax = axes[i][j]
            sel = hist[(hist["layer"] == layer) & (hist["rank"] == rank)]
            stats = []
            for residual in ("on", "off"):
                part = sel[sel["gating_residual"] == residual].sort_values("bin_lo")
                if part.empty:
                    continue
                total = part["tokens"].sum()
                frac = part["tokens"].to_numpy() / total * 100 if total else part["tokens"].to_numpy() * 0.0
                edges = np.append(part["bin_lo"].to_numpy(), part["bin_hi"].to_numpy()[-1])
                if residual == "on":
                    handles[residual] = ax.stairs(frac, edges, fill=True, color="#4c72b0", alpha=0.55)
                else:
                    handles[residual] = ax.stairs(frac, edges, color="#c44e52", lw=1.3)
                st = scores[(scores["layer"] == layer) & (scores["rank"] == rank)
                            & (scores["gating_residual"] == residual)].iloc[0]
                stats.append(f"{residual}: mean {st['mean']:.3f}, var {st['variance']:.2e}")
            used = sel[sel["tokens"] > 0]
            if not used.empty:
                lo, hi = used["bin_lo"].min(), used["bin_hi"].max()
                pad = 0.05 * (hi - lo) + 0.01
                ax.set_xlim(max(0.0, lo - pad), min(1.0, hi + pad))
            head = f"layer {layer}, {'highest' if rank == 'top1' else 'second-highest'} score"
            if layer == 0 and ablated:
                head += " (no residual input)"
            ax.set_title(head + "\n" + "; ".join(stats), fontsize=8)
            ax.set_xlabel("routing score (softmax over all experts)", fontsize=8)
            ax.set_ylabel("tokens (%)", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(f"Routing scores ({_title_suffix(summary)})", fontsize=10)
    fig.legend([handles[k] for k in handles], [names[k] for k in handles], loc="lower center",
               ncol=len(handles), frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, out_dir, "routing_scores")


# Imbalance -------------------------------------------------------------------------------------------------
def plot_imbalance(imb: pd.DataFrame, corr: pd.DataFrame, summary: dict, out_dir: Path) -> list[Path]:
    metrics = [("cv", "coefficient of variation"), ("maxvio", "MaxVio ((max − mean) / mean)"),
               ("gini", "Gini coefficient"), ("entropy_norm", "entropy / ln(n)"), ("jain", "Jain's index")]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4))
    groups = {"ffn": ("FFN experts", "#4c72b0", "o-"), "all": ("all experts", "#dd8452", "s--")}
    for ax, (key, label) in zip(axes.flat, metrics):
        for group, (name, colour, style) in groups.items():
            part = imb[imb["experts"] == group].sort_values("layer")
            if part[key].notna().any():
                ax.plot(part["layer"], part[key], style, color=colour, label=name)
        ax.set_xlabel("MoE layer")
        ax.set_ylabel(label)
        ax.set_xticks(sorted(imb["layer"].unique()))
        ax.legend(frameon=False, fontsize=8)
    ax = axes.flat[5]
    if summary.get("capacity"):
        part = imb[imb["experts"] == "all"].sort_values("layer")
        ax.plot(part["layer"], part["drop_rate"] * 100, "o-", color="#c44e52")
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("dropped slots (%)")
        ax.set_title("capacity drop rate", fontsize=9)
    elif not corr.empty and corr["pearson_r"].notna().any():
        ax.plot(corr["layer_a"], corr["pearson_r"], "o-", color="#55a868")
        ax.set_xticks(corr["layer_a"].tolist(), [f"{a}→{b}" for a, b in zip(corr["layer_a"], corr["layer_b"])])
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("adjacent MoE layers")
        ax.set_ylabel("Pearson r")
        ax.set_title("FFN experts per token: correlation between layers", fontsize=9)
    else:
        ax.axis("off")
    fig.suptitle(f"Load imbalance per layer ({_title_suffix(summary)}; dropless)" if not summary.get("capacity")
                 else f"Load imbalance per layer ({_title_suffix(summary)})", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir, "imbalance")


def plot_coactivation(co: pd.DataFrame, summary: dict, out_dir: Path) -> list[Path]:
    """Row a, column b: of the tokens that chose expert a, the share that also chose b."""
    if co.empty:
        return []
    layers = _pick_layers(sorted(co["layer"].unique().tolist()))
    N = int(max(co["expert_b"].max(), co["expert_a"].max())) + 1
    types = summary.get("expert_types") or []
    cols = min(len(layers), 2)
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols + 1.4, 4.4 * rows + 0.4), squeeze=False,
                             layout="constrained")
    vmax = float(np.nanmax(co[["p_b_given_a", "p_a_given_b"]].to_numpy(dtype=float))) * 100
    im = None
    short = {"ffn": "FFN", "constant": "const", "copy": "copy", "zero": "zero"}
    labels = [f"{e} {short.get(types[e], '')}" if e < len(types) else str(e) for e in range(N)]
    fs = 7 if N <= 16 else 5
    for k, (ax, layer) in enumerate(zip(axes.flat, layers)):
        m = np.full((N, N), np.nan)
        part = co[co["layer"] == layer]
        m[part["expert_a"], part["expert_b"]] = part["p_b_given_a"].to_numpy(dtype=float) * 100
        m[part["expert_b"], part["expert_a"]] = part["p_a_given_b"].to_numpy(dtype=float) * 100
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax)
        first_col, last_row = k % cols == 0, k + cols >= len(layers)
        ax.set_xticks(range(N), labels if last_row else [], rotation=90, fontsize=fs)
        ax.set_yticks(range(N), labels if first_col else [], fontsize=fs)
        if last_row:
            ax.set_xlabel("expert b (also chosen)", fontsize=8)
        if first_col:
            ax.set_ylabel("expert a (chosen)", fontsize=8)
        ax.set_title(f"layer {layer}", fontsize=9)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, label="tokens that chose a and also b (% of those that chose a)", shrink=0.8)
    fig.suptitle(f"Expert co-activation ({_title_suffix(summary)})", fontsize=10)
    return _save(fig, out_dir, "coactivation")


def draw_routing_plots(out_dir: str | os.PathLike) -> list[Path]:
    """Every plot of a routing-stats output directory; returns the files written (PNG and SVG)."""
    out = Path(out_dir)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    # Only empty cells and NaN are missing values: task names such as "NA" stay text.
    read = lambda name: pd.read_csv(out / f"{name}.csv", keep_default_na=False, na_values=["", "nan"])  # noqa: E731
    ffn = read("ffn_per_token")
    ffn["layer"] = ffn["layer"].astype(str)
    ffn_off = None
    if (out / "ffn_per_token_no_residual.csv").is_file():
        ffn_off = read("ffn_per_token_no_residual")
        ffn_off["layer"] = ffn_off["layer"].astype(str)
    paths = []
    paths += plot_expert_load(read("expert_load"), summary, out)
    paths += plot_ffn_per_token(ffn, summary, out, ffn_off)
    paths += plot_task_types(ffn, summary, out)
    paths += plot_tokens(summary, out)
    paths += plot_scores(read("routing_score_hist"), read("routing_scores"), summary, out)
    paths += plot_imbalance(read("imbalance"), read("layer_correlation"), summary, out)
    paths += plot_coactivation(read("coactivation"), summary, out)
    return paths
