"""`moepp-bench info`: architecture, expert mix and parameter counts of a checkpoint or a preset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from moepp.config import PRESETS, model_preset

from ..errors import BenchError
from ..measure.params import model_params
from ..report.console import stdout


def register(app: typer.Typer) -> None:
    app.command("info")(info)


def info(
    checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint directory (official MoE++ format or ours)."),
    preset: Optional[str] = typer.Option(None, help=f"Describe a preset instead: {', '.join(PRESETS)}."),
    tau: float = typer.Option(0.75, help="tau for a preset (sets the balanced FFN share rho)."),
    vanilla: bool = typer.Option(False, help="With --preset: the vanilla MoE counterpart."),
) -> None:
    """Print the architecture, expert mix and parameter counts of a checkpoint or a preset."""
    if (checkpoint is None) == (preset is None):
        raise BenchError("give either a CHECKPOINT directory or --preset NAME")
    source = {}
    if checkpoint is not None:
        from moepp import load_pretrained

        model = load_pretrained(checkpoint)
        cfg = model.cfg
        ci = model.checkpoint_info
        source = {"path": str(Path(checkpoint)), "format": ci.format, "dtype": ci.dtype,
                  "weights": ", ".join(ci.weight_files),
                  "tau": f"{cfg.moe.tau}" + ("" if ci.tau_known else " (not recorded; assumed)")}
        measured_total = sum(p.numel() for n, p in model.named_parameters())
    else:
        try:
            cfg = model_preset(preset, vanilla=vanilla, tau=tau)
        except ValueError as exc:
            raise BenchError(str(exc)) from None
        source = {"preset": preset + (" (vanilla)" if vanilla else ""), "tau": str(tau)}
        measured_total = None
    m = cfg.moe
    counts = model_params(cfg)

    arch = Table(title="Architecture", show_header=False)
    for key, value in {
        **source,
        "layers": cfg.n_layers, "d_model": cfg.d_model, "heads (kv)": f"{cfg.n_heads} ({cfg.kv_heads})",
        "vocab": cfg.vocab_size, "expert hidden H": m.d_expert, "top-k": m.top_k,
        "MoE layers": f"every {cfg.moe_interval}" if cfg.moe_interval > 1 else "all",
        "router": f"{m.router}, gate {m.gate_mode}, logits norm {'on' if m.logits_norm else 'off'}, "
                  f"gating residual {'on' if m.gating_residual else 'off'}",
        "expert input x K": "yes" if m.scale_input_by_k else "no",
        "capacity": "dropless" if m.capacity_factor is None else f"gamma {m.capacity_factor} over {m.capacity_base}",
    }.items():
        arch.add_row(key, str(value))
    stdout.print(arch)

    mix = Table(title="Expert mix (per MoE layer)")
    for col in ("kind", "count", "indices"):
        mix.add_column(col)
    for kind in ("ffn", "constant", "copy", "zero"):
        r = m.type_range(kind)
        mix.add_row(kind, str(len(r)), f"{r.start}..{r.stop - 1}" if len(r) else "-")
    stdout.print(mix)
    stdout.print(f"balanced FFN share rho = {m.rho:.3f}; expected FFN experts per token K*rho = "
                 f"{m.top_k * m.rho:.3f}; ideal expert speedup over vanilla 1/rho = {1 / m.rho:.2f}x")

    params = Table(title="Parameters")
    params.add_column("component")
    params.add_column("count", justify="right")
    for key, value in counts.items():
        params.add_row(key, f"{value:,.0f}")
    if measured_total is not None:
        params.add_row("total (tensors in checkpoint)", f"{measured_total:,}")
    stdout.print(params)
