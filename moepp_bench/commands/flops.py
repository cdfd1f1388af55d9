"""`moepp-bench flops`: FLOPs, bytes and activated parameters of an MoE++ layer and its vanilla counterpart,
per component, analytic and cross-checked against torch.utils.flop_counter.FlopCounterMode."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import torch
import typer

from moepp.config import BACKENDS, PRESETS, ModelConfig, layer_preset

from ..errors import BenchError
from ..measure.flops import COMPONENTS, LayerFlops, measure_layer_flops
from ..measure.memory import (estimate_checkpoint_memory, estimate_layer_memory, estimate_routing_memory,
                              require_memory)
from ..measure.routing_gen import SPEC_HELP, generate_routing, parse_routing_spec, vanilla_routing_spec
from ..provenance import provenance
from ..report.console import emit, progress_bar, stderr, stdout
from ..report.files import result_document, write_results

SCHEMA_VERSION = 1
TAU_SWEEP = (0.1, 0.25, 0.5, 0.75, 1.0)
DTYPES = ("float32", "bfloat16")
FORMATS = ("table", "json", "csv")
PRESET_INPUT = "random activations"
CHECKPOINT_INPUT = "random token ids (uniform over the vocabulary) run through the checkpoint"
COLUMNS = ("model", "preset", "checkpoint", "layer", "tau", "tokens", "dtype", "backend", "routing",
           "gating_residual", "pass", "component", "slots", "flops", "counted_flops", "flops_rel_diff",
           "weight_bytes", "gather_bytes", "combine_bytes", "bytes", "activated_params_per_token",
           "ffn_slot_fraction", "rho", "ffn_flops_ratio_vs_vanilla", "input")


def register(app: typer.Typer) -> None:
    app.command("flops")(flops)


def flops(
    preset: Optional[str] = typer.Option(None, help=f"Layer shape: {', '.join(PRESETS)}. [default: 1b]"),
    tokens: Optional[List[int]] = typer.Option(None, "--tokens", help="Tokens per layer call (repeatable). "
                                                                      "[default: 8192]"),
    tau: Optional[List[float]] = typer.Option(None, "--tau", help="tau values (repeatable). "
                                                                  "[default: 0.1 0.25 0.5 0.75 1.0]"),
    dtype: str = typer.Option("float32", help="float32 or bfloat16 (sets the bytes per element)."),
    routing: Optional[str] = typer.Option(None, help=f"Routing load: {SPEC_HELP}. [default: balanced]"),
    backward: bool = typer.Option(True, "--backward/--no-backward", help="Count the backward pass too."),
    backend: str = typer.Option("sorted", help=f"Dispatch backend whose work is counted: {', '.join(BACKENDS)}."),
    cross_check: bool = typer.Option(True, "--cross-check/--no-cross-check",
                                     help="Run the real layer under FlopCounterMode and show its count beside "
                                          "the analytic one."),
    checkpoint: Optional[Path] = typer.Option(None, help="Count every MoE layer of this checkpoint, with the "
                                                         "routing it produces on random token ids."),
    seed: int = typer.Option(0, help="Seed for weights, activations, token ids and routing."),
    out: Path = typer.Option(Path("results/flops"), help="Output directory (flops.csv, flops.json)."),
    fmt: str = typer.Option("table", "--format", help="stdout format: table, json or csv."),
) -> None:
    """Count FLOPs and bytes per component (router, FFN, constant, copy, zero experts), forward and backward."""
    tokens = list(tokens or [8192])
    _validate_common(tokens, tau, dtype, backend, fmt)
    if checkpoint is not None:
        given = [name for name, value in (("--preset", preset), ("--tau", tau), ("--routing", routing)) if value]
        if given:
            raise BenchError(f"{', '.join(given)} cannot be combined with --checkpoint (the checkpoint fixes its "
                             f"shape, tau and routing); drop {given[0]}")
        rows, title = _checkpoint_rows(checkpoint, tokens, dtype, backward, backend, cross_check, seed)
    else:
        rows, title = _preset_rows((preset or "1b").lower(), tokens, list(tau or TAU_SWEEP), dtype,
                                   routing or "balanced", backward, backend, cross_check, seed)

    prov = provenance(dtype=dtype, seed=seed, extra={
        "tokens": tokens, "backend": backend, "backward": backward, "cross_check": cross_check,
        "flop_convention": "matmul FLOPs, 2 per multiply-add; element-wise work not counted",
    })
    write_results(out, "flops", SCHEMA_VERSION, rows, prov, columns=COLUMNS)
    document = result_document("flops", SCHEMA_VERSION, rows, prov)
    if fmt == "table":
        print_tables(rows, title)
        source = {r["model"]: f"{r['input']}, routing {r['routing']}" for r in rows}
        stdout.print(f"Input: MoE++ {source['moepp']}; vanilla {source['moe']}. FLOPs are matmul FLOPs (2 per "
                     f"multiply-add). Backward by component and the bytes of each pass: {out / 'flops.csv'}.",
                     markup=False, highlight=False)
    else:
        emit(rows, COLUMNS, fmt, document=document)
    stderr.print(f"wrote {out / 'flops.csv'} and {out / 'flops.json'}", markup=False, highlight=False)


# Validation ------------------------------------------------------------------------------------------------
def _validate_common(tokens: list[int], taus: list[float] | None, dtype: str, backend: str, fmt: str) -> None:
    bad_tokens = [t for t in tokens if t <= 0]
    if bad_tokens:
        raise BenchError(f"--tokens must be positive, got {bad_tokens[0]}")
    bad_tau = [t for t in taus or [] if not (t > 0 and math.isfinite(t))]
    if bad_tau:
        raise BenchError(f"--tau must be > 0, got {bad_tau[0]} (tau weighs ZC experts in the balance loss)")
    if dtype not in DTYPES:
        raise BenchError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    if backend not in BACKENDS:
        raise BenchError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if fmt not in FORMATS:
        raise BenchError(f"--format must be table, json or csv, got {fmt!r}")


# Presets ---------------------------------------------------------------------------------------------------
def _preset_rows(preset, tokens, taus, dtype, routing, backward, backend, cross_check, seed):
    if preset not in PRESETS:
        raise BenchError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfgs = {tau: layer_preset(preset, tau=tau) for tau in taus}
    vanilla_cfg = layer_preset(preset, vanilla=True)
    specs = {tau: parse_routing_spec(routing, cfg) for tau, cfg in cfgs.items()}
    vanilla_spec = parse_routing_spec(vanilla_routing_spec(routing), vanilla_cfg)
    T = max(tokens)
    what = f"counting the {preset} layer at {T} tokens ({dtype}{', with backward' if backward else ''})"
    cfg0 = cfgs[taus[0]]
    require_memory(estimate_layer_memory(cfg0, T, dtype, backward) if cross_check
                   else estimate_routing_memory(cfg0, T), what)

    torch_dtype = getattr(torch, dtype)
    results: list[tuple[LayerFlops, dict]] = []
    with progress_bar("flops", len(tokens) * (1 + len(taus)), "case") as bar:
        for model_name in ("moe", "moepp"):
            layer = _make_layer(vanilla_cfg if model_name == "moe" else cfg0, torch_dtype, seed) if cross_check \
                else None
            for n in tokens:
                cases = [(None, vanilla_cfg, vanilla_spec)] if model_name == "moe" else \
                        [(tau, cfgs[tau], specs[tau]) for tau in taus]
                for tau, cfg, spec in cases:
                    bar.update(0, case=f"{model_name} tau={tau} T={n}")
                    ids, gates = generate_routing(spec, cfg, n, seed)
                    labels = {"model": model_name, "preset": preset, "checkpoint": None, "layer": None, "tau": tau,
                              "tokens": n, "dtype": dtype, "backend": backend, "routing": spec.text,
                              "gating_residual": cfg.gating_residual, "input": PRESET_INPUT}
                    lf = measure_layer_flops(layer, cfg, ids, gates, labels=labels, prev_logits_TN=None,
                                             residual=cfg.gating_residual, backend=backend, dtype=torch_dtype,
                                             backward=backward, seed=seed)
                    results.append((lf, {"tokens": n}))
                    bar.update(0, advance=1)
            del layer
    rows = _rows_with_ratio(results)
    title = (f"FLOPs per MoE layer: {preset}, {dtype}, backend {backend}, routing {routing}"
             f"{', gating residual on' if cfg0.gating_residual else ''}")
    return rows, title


def _make_layer(cfg, dtype: torch.dtype, seed: int):
    from moepp.layer import MoELayer

    torch.manual_seed(seed)
    return MoELayer(cfg).to(dtype)


def _rows_with_ratio(results: list[tuple[LayerFlops, dict]], key=("tokens",)) -> list[dict]:
    """Flatten results; each MoE++ row gets its FFN FLOPs over the vanilla layer's at the same key."""
    vanilla = {}
    for lf, k in results:
        if lf.labels["model"] == "moe":
            vanilla[tuple(k[x] for x in key)] = {p: lf.ffn_flops(p) for p in ("forward", "backward")
                                                if (p, "router") in lf.costs}
    rows = []
    for lf, k in results:
        rows += lf.rows(vanilla.get(tuple(k[x] for x in key)))
    return rows


# Checkpoints -----------------------------------------------------------------------------------------------
def _checkpoint_config(path: Path) -> tuple[ModelConfig, int, int | None]:
    """The model config of a checkpoint directory (without loading weights), the weight files' total size and
    the stored bytes per element when the config says."""
    from moepp.checkpoint import CheckpointError, official_config

    if not path.is_dir():
        raise BenchError(f"--checkpoint {path}: not a checkpoint directory (one with config.json and weights)")
    config_path = path / "config.json"
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"{config_path}: cannot read the checkpoint config ({str(exc).splitlines()[0]})") from None
    try:
        cfg = ModelConfig.from_dict(raw["model"]) if raw.get("format") == "moepp" else official_config(
            raw, {}, config_path)
    except (KeyError, TypeError, ValueError, CheckpointError) as exc:
        raise BenchError(f"{config_path}: not a moepp or official MoE++ config ({exc})") from None
    weight_bytes = sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))
    stored = {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(raw.get("torch_dtype")))
    return cfg, weight_bytes, stored


def _checkpoint_rows(path: Path, tokens, dtype, backward, backend, cross_check, seed):
    from moepp import load_pretrained

    cfg, weight_bytes, stored = _checkpoint_config(path)
    T = max(tokens)
    require_memory(estimate_checkpoint_memory(weight_bytes, stored, cfg, T, dtype, backward),
                   f"counting {path} at {T} tokens ({dtype}{', with backward' if backward else ''})",
                   fix="use fewer --tokens")
    torch_dtype = getattr(torch, dtype)
    model = load_pretrained(path, dtype=torch_dtype)
    cfg = model.cfg
    moe_layers = model.moe_layers
    vanilla_cfg = cfg.moe.vanilla()
    vanilla_spec = parse_routing_spec("balanced", vanilla_cfg)
    layer_index = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    gen = torch.Generator().manual_seed(seed)
    results = []
    with progress_bar("flops", len(tokens) * (1 + len(moe_layers)), "case") as bar:
        for n in tokens:
            seq = min(n, cfg.max_seq_len)
            input_ids = torch.randint(cfg.vocab_size, (-(-n // seq), seq), generator=gen)
            bar.update(0, case=f"checkpoint forward T={n}")
            with torch.no_grad():
                records = model(input_ids, return_routing=True).routing
            vanilla = _make_layer(vanilla_cfg, torch_dtype, seed) if cross_check else None
            ids, gates = generate_routing(vanilla_spec, vanilla_cfg, n, seed)
            labels = {"model": "moe", "preset": None, "checkpoint": str(path), "layer": None, "tau": None,
                      "tokens": n, "dtype": dtype, "backend": backend, "routing": vanilla_spec.text,
                      "gating_residual": vanilla_cfg.gating_residual, "input": PRESET_INPUT}
            results.append((measure_layer_flops(vanilla, vanilla_cfg, ids, gates, labels=labels, prev_logits_TN=None,
                                                residual=vanilla_cfg.gating_residual and len(moe_layers) > 1,
                                                backend=backend, dtype=torch_dtype, backward=backward, seed=seed),
                            {"tokens": n}))
            del vanilla
            bar.update(0, advance=1)
            for j, (layer, record) in enumerate(zip(moe_layers, records)):
                bar.update(0, case=f"layer {layer_index[j]} T={n}")
                residual = layer.cfg.gating_residual and j > 0
                prev = records[j - 1].logits[:n] if residual else None
                labels = {"model": "moepp", "preset": None, "checkpoint": str(path), "layer": layer_index[j],
                          "tau": layer.cfg.tau, "tokens": n, "dtype": dtype, "backend": backend,
                          "routing": "learned (checkpoint)", "gating_residual": residual, "input": CHECKPOINT_INPUT}
                lf = measure_layer_flops(layer if cross_check else None, layer.cfg, record.topk_ids[:n],
                                         record.gates[:n], labels=labels, prev_logits_TN=prev, residual=residual,
                                         backend=backend, dtype=torch_dtype, backward=backward, seed=seed)
                results.append((lf, {"tokens": n}))
                bar.update(0, advance=1)
    rows = _rows_with_ratio(results)
    tau_note = "" if model.checkpoint_info.tau_known else " (tau not recorded; 0.75 assumed)"
    title = f"FLOPs per MoE layer: checkpoint {path}{tau_note}, {dtype}, backend {backend}"
    return rows, title


# Console tables ---------------------------------------------------------------------------------------------
_SHORT = {"router": "router", "ffn_experts": "FFN", "constant_experts": "const", "copy_experts": "copy",
          "zero_experts": "zero"}


def _sig(value: float | None, digits: int = 4) -> float | None:
    """Round to `digits` significant digits, so table cells stay narrow."""
    if value is None or value == 0 or not math.isfinite(value):
        return value
    return round(value, max(0, digits - 1 - math.floor(math.log10(abs(value)))))


def _setting_key(r: dict) -> tuple:
    return (r["model"], r["layer"], r["tau"], r["tokens"])


def summary_tables(rows: list[dict]) -> list[tuple[str, list[dict], list[str]]]:
    """Two compact tables (they must fit 80 columns): per setting, the totals with the FlopCounterMode count
    and the FFN ratio; and the forward per component with bytes and activated parameters."""
    totals = [r for r in rows if r["component"] == "total"]
    big = max(r["flops"] for r in totals) >= 1e9
    unit, scale = ("GFLOP", 1e9) if big else ("MFLOP", 1e6)
    params_max = max(r["activated_params_per_token"] for r in totals)
    p_unit, p_scale = ("params M", 1e6) if params_max >= 1e6 else ("params K", 1e3)
    by_setting: dict[tuple, dict] = {}
    comps: dict[tuple, dict] = {}
    for r in rows:
        key = _setting_key(r)
        s = by_setting.setdefault(key, {"model": r["model"], "layer": r["layer"], "tau": r["tau"],
                                        "tokens": r["tokens"], "FFN share": _sig(r["ffn_slot_fraction"], 3),
                                        "rho": r["rho"], "FFN ratio": _sig(r["ffn_flops_ratio_vs_vanilla"], 3)})
        tag = "fwd" if r["pass"] == "forward" else "bwd"
        if r["component"] == "total":
            s[tag] = _sig(r["flops"] / scale)
            if r["counted_flops"] is not None:
                s[f"{tag} cnt"] = _sig(r["counted_flops"] / scale)
                worst = max(abs(s.get("diff %") or 0.0), abs(100 * (r["flops_rel_diff"] or 0.0)))
                s["diff %"] = _sig(worst, 2)
            if tag == "fwd":
                c = comps.setdefault(key, {k: s[k] for k in ("model", "layer", "tau", "tokens")})
                c["moved MB"] = _sig((r["gather_bytes"] + r["combine_bytes"]) / 1e6)
                c["weight MB"] = _sig(r["weight_bytes"] / 1e6)
                c[p_unit] = _sig(r["activated_params_per_token"] / p_scale)
        elif tag == "fwd":
            c = comps.setdefault(key, {k: by_setting[key][k] for k in ("model", "layer", "tau", "tokens")})
            c[_SHORT[r["component"]]] = _sig(r["flops"] / scale)
    first = list(by_setting.values())
    second = list(comps.values())
    lead = ["model"]
    if any(x["layer"] is not None for x in first):
        lead.append("layer")
    lead.append("tau")
    if len({x["tokens"] for x in first}) > 1:
        lead.append("tokens")
    cols1 = lead + ["FFN share", "FFN ratio"] + [c for c in ("fwd", "fwd cnt", "bwd", "bwd cnt", "diff %")
                                                   if c in first[0]]
    shown = [c for c in COMPONENTS if any(x.get(_SHORT[c]) for x in second) or c != "zero_experts"]
    cols2 = lead + [_SHORT[c] for c in shown] + ["moved MB", "weight MB", p_unit]
    return [(f"Matmul {unit} per layer call: analytic and FlopCounterMode count (cnt)", first, cols1),
            (f"Forward {unit} by component; gather+combine bytes (moved), weight bytes, activated params "
             f"per token", second, cols2)]


def print_tables(rows: list[dict], title: str) -> None:
    from rich import box

    from ..report.console import rich_table

    stdout.print(title, style="bold", markup=False, highlight=False)
    stdout.print("FFN share: realised share of routing slots on FFN experts; FFN ratio: MoE++ FFN FLOPs over "
                 "the vanilla layer's (equal to the share with the sorted and loop backends); diff %: largest "
                 "|counted - analytic|.", markup=False, highlight=False)
    for caption, table_rows, columns in summary_tables(rows):
        table = rich_table(table_rows, columns, title=caption)
        table.box = box.SIMPLE_HEAD
        table.pad_edge = False
        stdout.print(table)
