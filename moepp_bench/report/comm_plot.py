"""All-to-all bytes per token against the number of ranks P, MoE vs MoE++, and the MoE++/MoE ratio against tau.

Drawn from result rows (comm.json or comm_predict.json): lines are the expectation at balance, K rho (P-1)/P D b,
extended to large P; markers are what a run measured, where the rows have it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.cm as cm
import numpy as np

from ..measure.comm_model import bytes_per_token_at_balance
from .figures import COLORS, new_figure, save_figure

P_GRID = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def _measured(row: dict) -> bool:
    return row.get("bytes_per_token_measured") is not None


def plot_comm(rows: list[dict], out_dir: str | Path, stem: str = "comm") -> list[Path]:
    if not rows:
        return []
    first = rows[0]
    K, D, b = first["top_k"], first["d_model"], first["bytes_per_element"]
    n_ffn, n_zc = first["n_ffn"], first["n_zc"]
    p_max = max(256, max(r["world_size"] for r in rows))
    grid = [p for p in P_GRID if p <= p_max] + ([p_max] if p_max not in P_GRID else [])
    taus = sorted({r["tau"] for r in rows})
    colors = cm.viridis(np.linspace(0.0, 0.85, len(taus)))
    measured_any = any(_measured(r) for r in rows)

    fig, axes = new_figure(ncols=2, width=5.6, height=4.2)
    ax_p, ax_t = axes[0]

    # Left: bytes per token against P.
    ax_p.plot(grid, [bytes_per_token_at_balance(K, 1.0, p, D, b) for p in grid], "-", color="black",
              label="MoE (vanilla)")
    for tau, color in zip(taus, colors):
        rho = tau * n_ffn / (tau * n_ffn + n_zc)
        ax_p.plot(grid, [bytes_per_token_at_balance(K, rho, p, D, b) for p in grid], "-", color=color,
                  label=f"MoE++ tau={tau:g} (rho={rho:.2f})")
        pts = sorted((r["world_size"], r["bytes_per_token_measured"]) for r in rows
                     if r["model"] == "moepp" and r["tau"] == tau and _measured(r))
        if pts:
            ax_p.plot(*zip(*pts), "o", color=color, markersize=6, markeredgecolor="black", markeredgewidth=0.5)
    moe_pts = sorted({(r["world_size"], r["bytes_per_token_measured"]) for r in rows
                      if r["model"] == "moe" and _measured(r)})
    if moe_pts:
        ax_p.plot(*zip(*moe_pts), "s", color="black", markersize=6, markerfacecolor="white")
    ax_p.set_xscale("log", base=2)
    ax_p.set_xticks(grid, [str(p) for p in grid])
    ax_p.set_xlabel("ranks P (expert-parallel world size)")
    ax_p.set_ylabel(f"dispatch bytes per token, one way (B, {first['dtype']})")
    ax_p.set_ylim(0, 1.6 * bytes_per_token_at_balance(K, 1.0, grid[-1], D, b))  # headroom for the legend
    ax_p.set_title(f"{first['preset']}: K={K}, D={D}, {n_ffn} FFN + {n_zc} ZC experts")
    handles, labels = ax_p.get_legend_handles_labels()
    if measured_any:
        handles += [ax_p.plot([], [], "o", color="grey", markeredgecolor="black")[0],
                    ax_p.plot([], [], "s", color="black", markerfacecolor="white")[0]]
        labels += ["measured MoE++ (this run)", "measured MoE (this run)"]
    ax_p.legend(handles, labels, loc="upper left", fontsize=8, ncol=2)

    # Right: MoE++/MoE bytes against tau.
    tau_fine = np.linspace(min(taus) * 0.8, max(taus) * 1.05, 200)
    ax_t.plot(tau_fine, tau_fine * n_ffn / (tau_fine * n_ffn + n_zc), "--", color=COLORS["ideal"],
              label="rho(tau): FFN share at balance")
    markers = ["o", "^", "D", "v", "P", "X"]
    sizes = sorted({r["world_size"] for r in rows if _measured(r)})
    for i, P in enumerate(sizes):
        pts = sorted((r["tau"], r["bytes_ratio_vs_moe"]) for r in rows
                     if r["model"] == "moepp" and r["world_size"] == P and r.get("bytes_ratio_vs_moe") is not None)
        # Ratios at different P coincide when routing is balanced: later P get larger, hollow markers.
        ax_t.plot(*zip(*pts), markers[i % len(markers)], color=COLORS["moepp"], markersize=6 + 4 * i,
                  markerfacecolor="none" if i else COLORS["moepp"], label=f"measured bytes ratio, P={P}")
    frac = sorted({(r["tau"], r["ffn_slot_fraction"]) for r in rows if r["model"] == "moepp" and _measured(r)})
    if frac:
        ax_t.plot(*zip(*frac), "x", color="black", markersize=8, label="realised FFN slot fraction")
    ax_t.set_xlabel("tau (ZC weight in the balance loss)")
    ax_t.set_ylabel("MoE++ bytes / MoE bytes")
    ax_t.set_ylim(0, 1.05)
    ax_t.set_title("ZC slots never travel: ratio = FFN slot share")
    ax_t.legend(loc="lower right", fontsize=8)
    return save_figure(fig, out_dir, stem)
