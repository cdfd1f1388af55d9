"""`moepp-bench throughput`: expert-layer throughput of MoE++ vs the vanilla MoE, in one interleaved run."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch
import typer

from moepp.config import BACKENDS, PRESETS, layer_preset

from ..allocator import tune_glibc_malloc
from ..errors import BenchError
from ..measure.memory import estimate_layer_memory, require_memory
from ..measure.routing_gen import SPEC_HELP, parse_routing_spec
from ..measure.throughput import ThroughputSettings, count_calls, run_throughput
from ..paper import PAPER_PRESETS, TAU_SWEEP, paper_row
from ..provenance import provenance
from ..report.console import emit, progress_bar, stderr
from ..report.files import result_document, write_results

SCHEMA_VERSION = 1
TABLE_COLUMNS = ("model", "preset", "tau", "tokens", "dtype", "backend", "pass", "ffn_slot_fraction",
                 "time_ms_median", "time_ms_iqr", "tokens_per_s", "speedup", "ideal_speedup", "efficiency",
                 "gflops_per_s", "vs_dense_ceiling")
PAPER_TABLE_TOKENS = 4096


def register(app: typer.Typer) -> None:
    app.command("throughput")(throughput)


def validate(preset: str, tokens: list[int], taus: list[float], dtype: str, backends: list[str], device: str,
             repeats: int, warmup: int, threads: int | None) -> None:
    """Every check that can fail runs here, before anything is allocated or written."""
    if preset.lower() not in PRESETS:
        raise BenchError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    bad_tokens = [t for t in tokens if t <= 0]
    if bad_tokens:
        raise BenchError(f"--tokens must be positive, got {bad_tokens[0]}")
    bad_tau = [t for t in taus if not t > 0]
    if bad_tau:
        raise BenchError(f"--tau must be > 0, got {bad_tau[0]} (tau weighs ZC experts in the balance loss)")
    if dtype not in ("float32", "bfloat16"):
        raise BenchError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    for backend in backends:
        if backend not in BACKENDS or backend == "loop":
            raise BenchError(f"--backend must be one of {', '.join(b for b in BACKENDS if b != 'loop')} or auto "
                             f"(the loop baseline is always measured as moe-loop), got {backend!r}")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise BenchError(f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if repeats < 1 or warmup < 0:
        raise BenchError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}")
    if threads is not None and threads < 1:
        raise BenchError(f"--threads must be >= 1, got {threads}")


def _memory_check(preset: str, tokens: list[int], taus: list[float], dtype: str, backward: bool) -> None:
    cfg = layer_preset(preset)
    per_call = estimate_layer_memory(cfg, max(tokens), dtype, backward)
    # Weights are shared; each extra MoE++ layer adds only a router. The dense ceiling adds about a layer's
    # activations; the inputs of every token count are held at once.
    inputs = sum(tokens) * cfg.d_model * (4 if dtype == "float32" else 2) * (3 if backward else 1)
    require_memory(per_call * 2 + inputs, f"throughput at {max(tokens)} tokens on the {preset} layer "
                   f"({dtype}{', with backward' if backward else ''})")


def throughput(
    preset: str = typer.Option("1b", help=f"Layer shape: {', '.join(PRESETS)}."),
    tokens: Optional[List[int]] = typer.Option(None, "--tokens", help="Tokens per forward (repeatable).",
                                               show_default="8192"),
    tau: Optional[List[float]] = typer.Option(None, "--tau", help="tau values (repeatable).",
                                              show_default="0.1 0.25 0.5 0.75 1.0"),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    backend: Optional[List[str]] = typer.Option(None, "--backend", help="Dispatch backend (repeatable): sorted, "
                                                "padded, grouped_mm, or auto (grouped_mm on CUDA: no host sync; "
                                                "sorted on CPU).", show_default="auto"),
    routing: str = typer.Option("balanced", help=f"Routing load: {SPEC_HELP}."),
    backward: bool = typer.Option(False, "--backward/--no-backward", help="Time forward+backward."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    threads: Optional[int] = typer.Option(None, help="torch intra-op threads.", show_default="all cores"),
    repeats: int = typer.Option(7, help="Timed rounds (each case once per round, interleaved)."),
    warmup: int = typer.Option(2, help="Untimed calls per case first."),
    seed: int = typer.Option(0, help="Seed for weights, inputs and routing."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="CUDA only: capture each case as a CUDA graph "
                                                                   "and time replays (needs backend grouped_mm)."),
    breakdown: bool = typer.Option(False, "--breakdown", help="Also time each stage (router, sort, gather, expert "
                                                              "matmuls, combine, ZC experts) into throughput_stages.csv."),
    paper_table: bool = typer.Option(False, "--paper-table", help=f"The paper's four sizes over the tau sweep at "
                                                                  f"{PAPER_TABLE_TOKENS} tokens, beside Table 3."),
    malloc_tuning: bool = typer.Option(True, "--malloc-tuning/--no-malloc-tuning",
                                       help="Keep glibc from unmapping large buffers between calls (CPU)."),
    out: Path = typer.Option(Path("results/throughput"), help="Output directory."),
    fmt: str = typer.Option("table", "--format", help="stdout format: table, json or csv."),
) -> None:
    """Time the expert layer of MoE++ and the vanilla MoE side by side (plus moe-loop and dense-ceiling)."""
    tokens = list(tokens or ([PAPER_TABLE_TOKENS] if paper_table else [8192]))
    taus = list(tau or TAU_SWEEP)
    auto = "grouped_mm" if device.startswith("cuda") else "sorted"
    backends = list(dict.fromkeys(auto if b == "auto" else b for b in (backend or ["auto"])))
    validate(preset, tokens, taus, dtype, backends, device, repeats, warmup, threads)
    if fmt not in ("table", "json", "csv"):
        raise BenchError(f"--format must be table, json or csv, got {fmt!r}")
    parse_routing_spec(routing)
    if cuda_graphs and (not device.startswith("cuda") or backends != ["grouped_mm"]):
        raise BenchError("--cuda-graphs needs --device cuda and --backend grouped_mm (the only sync-free path)")
    presets = list(PAPER_PRESETS) if paper_table else [preset.lower()]
    for p in presets:
        _memory_check(p, tokens, taus, dtype, backward)
    if threads is not None:
        torch.set_num_threads(threads)
    if malloc_tuning and device == "cpu":
        tune_glibc_malloc()

    all_rows, all_stages = [], []
    runs = [ThroughputSettings(preset=p, tokens=tuple(tokens), taus=tuple(taus), dtype=dtype,
                               backends=tuple(backends), routing=routing, backward=backward, device=device, repeats=repeats, warmup=warmup,
                               seed=seed, cuda_graphs=cuda_graphs, breakdown=breakdown) for p in presets]
    total = sum(count_calls(s) for s in runs)
    with progress_bar("throughput", total, "case") as bar:
        for settings in runs:
            def on_call(name: str, _p=settings.preset) -> None:
                bar.update(0, advance=1, case=f"{_p} {name}")

            rows, stages = run_throughput(settings, on_call)
            all_rows += rows
            all_stages += stages
    if paper_table:
        for row in all_rows:
            if row["model"] == "moepp":
                row.update(paper_row(row["preset"], row["tau"]))

    prov = provenance(device=device, dtype=dtype, seed=seed, threads=torch.get_num_threads(),
                      extra={"tokens": tokens, "taus": taus, "routing": routing, "backends": backends,
                             "pass": "fwd+bwd" if backward else "fwd", "repeats": repeats, "warmup": warmup,
                             "cuda_graphs": cuda_graphs, "paper_table": paper_table,
                             "timer": "cuda events" if device.startswith("cuda") else "perf_counter"})
    kind = "paper_table" if paper_table else "throughput"
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, kind, SCHEMA_VERSION, all_rows, prov)
    if all_stages:
        write_results(out, f"{kind}_stages", SCHEMA_VERSION, all_stages, prov)
    from ..report.throughput_plots import plot_speedup_vs_tau

    figures = plot_speedup_vs_tau(all_rows, out, stem="paper_table_speedup" if paper_table else "speedup_vs_tau",
                                  with_paper=paper_table)
    columns = TABLE_COLUMNS + (("paper_speedup", "paper_efficiency") if paper_table else ())
    emit(all_rows, columns, fmt, title=f"Expert-layer throughput ({'fwd+bwd' if backward else 'fwd'}, {dtype}, "
                                       f"{'/'.join(backends)}, routing {routing}, {torch.get_num_threads()} threads)",
         document=result_document(kind, SCHEMA_VERSION, all_rows, prov))
    if all_stages and fmt == "table":
        emit(all_stages, ("model", "tau", "tokens", "stage", "time_ms", "share"), fmt, title="Per-stage breakdown")
    stderr.print(f"wrote {out / (kind + '.csv')}, {out / (kind + '.json')}"
                 + "".join(f", {f}" for f in figures))
