"""Shared figure style and atomic saving (PNG and SVG) for every plot the toolkit draws."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .files import write_atomic  # noqa: E402

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
COLORS = {"moepp": "#1f77b4", "moe": "#7f7f7f", "ideal": "#2ca02c", "paper": "#d62728", "dense": "#9467bd",
          "loop": "#ff7f0e"}


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.5, height: float = 3.8):
    plt.rcParams.update(STYLE)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes


def save_figure(fig, out_dir: str | Path, stem: str) -> list[Path]:
    """Write stem.png and stem.svg atomically; returns both paths."""
    fig.tight_layout()
    paths = []
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, bbox_inches="tight")
        paths.append(write_atomic(Path(out_dir) / f"{stem}.{ext}", buf.getvalue()))
    plt.close(fig)
    return paths
