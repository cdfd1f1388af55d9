"""`moepp-bench comm`: expert-parallel all-to-all bytes and phase times of MoE++ vs the vanilla MoE.

Starts P local ranks itself (one run per --world-size), or, when started by torchrun, runs as one rank of that job
(rank 0 writes and prints). --predict computes the expected bytes at balance for any P without starting anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import torch
import typer

from moepp.config import PRESETS

from ..errors import BenchError
from ..measure.comm import (DTYPES, bench_layer, comm_rank, estimate_run_memory, make_job, per_rank_details,
                            predict_rows, rounds_per_job, summarise, vanilla_spec)
from ..measure.launch import RankFailure, run_as_rank, run_local, under_torchrun
from ..measure.memory import require_memory
from ..measure.routing_gen import SPEC_HELP, parse_routing_spec
from ..paper import TAU_SWEEP
from ..provenance import provenance
from ..report.console import emit, progress_bar, stderr
from ..report.files import read_result, result_document, write_results

SCHEMA_VERSION = 1
DEFAULT_WORLD_SIZES = (2, 4)
PREDICT_WORLD_SIZES = (2, 4, 8, 16, 32, 64, 128, 256)
# Console table: short headers for the long column names (files keep the full names).
TABLE_HEADERS = {"model": "model", "world_size": "P", "tau": "tau", "ffn_slot_fraction": "FFN slots",
                 "a2a_bytes_measured": "bytes measured", "a2a_bytes_analytic": "analytic",
                 "a2a_bytes_dedup": "dedup", "a2a_bytes_balance": "at balance", "bytes_ratio_vs_moe": "vs MoE",
                 "count_exchange_ms": "counts ms", "dispatch_ms": "dispatch ms", "expert_ms": "expert ms",
                 "combine_ms": "combine ms"}
PREDICT_HEADERS = {"model": "model", "world_size": "P", "tau": "tau", "ffn_slot_fraction": "FFN share",
                   "bytes_per_token_balance": "B/token", "bytes_per_token_dedup_balance": "B/token dedup",
                   "a2a_bytes_balance": "bytes (all tokens)", "bytes_ratio_vs_moe": "vs MoE"}
FAULT_ENV = "MOEPP_BENCH_COMM_FAULT"  # test hook: "RANK:raise" or "RANK:kill" makes that rank fail


def register(app: typer.Typer) -> None:
    app.command("comm")(comm)


def comm(
    preset: str = typer.Option("1b", help=f"Layer shape: {', '.join(PRESETS)}."),
    world_size: Optional[List[int]] = typer.Option(
        None, "--world-size", help="Ranks P (repeatable); each must divide the FFN expert count. "
                                   "Default: 2 and 4; with --predict 2 to 256; under torchrun the job's size."),
    tau: Optional[List[float]] = typer.Option(None, "--tau", help="tau values (repeatable). "
                                                                  "Default: 0.1 0.25 0.5 0.75 1.0."),
    tokens_per_rank: int = typer.Option(1024, help="Tokens each rank routes per forward."),
    routing: str = typer.Option("balanced", help=f"Routing load of MoE++: {SPEC_HELP}. The vanilla MoE gets the "
                                                 f"same, or balanced for forced and replay."),
    dtype: str = typer.Option("bfloat16", help="Activation dtype sent over the wire: float32, bfloat16, float16."),
    repeats: int = typer.Option(5, help="Timed rounds (every setting once per round, interleaved)."),
    warmup: int = typer.Option(1, help="Untimed rounds first."),
    seed: int = typer.Option(0, help="Seed for weights, inputs and routing."),
    backend: str = typer.Option("auto", help="torch.distributed backend: gloo, nccl, or auto (nccl when every "
                                             "rank has a GPU, else gloo)."),
    timeout: float = typer.Option(300.0, help="Seconds without progress from a rank before the run is stopped."),
    predict: bool = typer.Option(False, "--predict", help="Only the expected bytes at balance, for any P; "
                                                          "starts no processes."),
    out: Path = typer.Option(Path("results/comm"), help="Output directory."),
    fmt: str = typer.Option("table", "--format", help="stdout format: table, json or csv."),
) -> None:
    """All-to-all bytes (measured, analytic, at balance) and phase times of expert-parallel MoE++ vs MoE."""
    taus = list(tau or TAU_SWEEP)
    if predict and under_torchrun() and os.environ.get("RANK") != "0":
        return  # a prediction needs no ranks; under torchrun, rank 0 alone writes it
    torchrun = under_torchrun() and not predict
    if torchrun:
        job_size = int(os.environ["WORLD_SIZE"])
        if world_size and list(world_size) != [job_size]:
            raise BenchError(f"--world-size {' '.join(map(str, world_size))} does not match the torchrun job's "
                             f"WORLD_SIZE={job_size}; leave --world-size out under torchrun")
        world_sizes = [job_size]
    else:
        world_sizes = list(world_size or (PREDICT_WORLD_SIZES if predict else DEFAULT_WORLD_SIZES))
    preset = preset.lower()
    _validate(preset, world_sizes, taus, tokens_per_rank, routing, dtype, repeats, warmup, timeout, fmt, predict,
              local=not torchrun)
    if predict:
        return _predict(preset, world_sizes, taus, tokens_per_rank, dtype, out, fmt)
    fault = _fault_from_env()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and (torchrun or
                                                           torch.cuda.device_count() >= max(world_sizes)) else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise BenchError("--backend nccl needs CUDA devices, and torch sees none; use --backend gloo")
    if backend not in ("gloo", "nccl"):
        raise BenchError(f"--backend must be gloo, nccl or auto, got {backend!r}")
    # Routing is drawn here, before any rank starts: a spec the layer cannot hold fails now, with nothing written.
    jobs = [make_job(preset, P, taus, tokens_per_rank, routing, dtype, repeats, warmup, seed, fault)
            for P in world_sizes]
    if torchrun:
        return _run_torchrun(jobs[0], backend, timeout, out, fmt, seed)
    for P in world_sizes:
        require_memory(estimate_run_memory(bench_layer(preset, taus[0]), P, tokens_per_rank, dtype),
                       f"{P} local ranks of the {preset} layer at {tokens_per_rank} tokens each",
                       fix="use fewer --tokens-per-rank, a smaller --world-size or --preset")

    per_job = []
    with progress_bar("comm", sum(rounds_per_job(j) for j in jobs), "setting") as bar:
        for job in jobs:
            def on_event(rank: int, _data, _P=job.world_size) -> None:
                if rank == 0:  # every rank runs every setting; count one
                    bar.update(0, advance=1, setting=f"P={_P}")

            try:
                per_job.append(run_local(comm_rank, job.world_size, job, backend=backend, stall_timeout_s=timeout,
                                         on_event=on_event))
            except RankFailure as exc:
                raise BenchError(f"P={job.world_size}: {exc}") from None
    threads = max(1, (os.cpu_count() or 1) // max(world_sizes))
    _finish(jobs, per_job, backend, "local processes", threads, out, fmt, seed)


def _validate(preset, world_sizes, taus, tokens_per_rank, routing, dtype, repeats, warmup, timeout, fmt, predict,
              local: bool) -> None:
    """Every check that can fail on bad input, before anything starts or is written."""
    if preset not in PRESETS:
        raise BenchError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if fmt not in ("table", "json", "csv"):
        raise BenchError(f"--format must be table, json or csv, got {fmt!r}")
    if dtype not in DTYPES:
        raise BenchError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    bad_tau = [t for t in taus if not t > 0]
    if bad_tau:
        raise BenchError(f"--tau must be > 0, got {bad_tau[0]} (tau weighs ZC experts in the balance loss)")
    if tokens_per_rank < 1:
        raise BenchError(f"--tokens-per-rank must be >= 1, got {tokens_per_rank}")
    if repeats < 1 or warmup < 0:
        raise BenchError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}")
    if timeout <= 0:
        raise BenchError(f"--timeout must be > 0 seconds, got {timeout}")
    small = [p for p in world_sizes if p < (1 if predict else 2)]
    if small:
        raise BenchError(f"--world-size must be >= {1 if predict else 2}, got {small[0]} "
                         f"(one rank sends nothing)")
    if predict:
        return
    n_ffn = bench_layer(preset, taus[0]).n_ffn
    uneven = [p for p in world_sizes if n_ffn % p]
    if uneven:
        fits = [p for p in range(2, n_ffn + 1) if n_ffn % p == 0]
        raise BenchError(f"--world-size {uneven[0]} does not divide the {n_ffn} FFN experts of preset {preset}; "
                         f"use one of {', '.join(map(str, fits))} (or --predict for any P)")
    cpus = os.cpu_count() or 1
    if local and max(world_sizes) > max(8, 4 * cpus):
        raise BenchError(f"--world-size {max(world_sizes)} would start that many local processes on {cpus} CPU "
                         f"cores (limit {max(8, 4 * cpus)}); use --predict for large P, or torchrun across machines")
    for t in taus:
        parse_routing_spec(routing, bench_layer(preset, t))
        parse_routing_spec(vanilla_spec(routing), bench_layer(preset, t, vanilla=True))


def _fault_from_env() -> tuple[int, str] | None:
    text = os.environ.get(FAULT_ENV)
    if not text:
        return None
    rank, _, how = text.partition(":")
    if not rank.isdigit() or how not in ("raise", "kill"):
        raise BenchError(f"{FAULT_ENV}={text!r} is not RANK:raise or RANK:kill; unset it")
    return int(rank), how


def _run_torchrun(job, backend: str, timeout: float, out: Path, fmt: str, seed: int) -> None:
    """This process is one rank of a torchrun job; rank 0 reports for all."""
    is_rank0 = os.environ.get("RANK") == "0"
    total = rounds_per_job(job)
    if is_rank0:
        with progress_bar("comm", total, "setting") as bar:
            _, _, per_rank = run_as_rank(comm_rank, lambda: job, backend=backend, stall_timeout_s=timeout,
                                         on_event=lambda r, d: bar.update(0, advance=1, setting=f"P={job.world_size}"))
        _finish([job], [per_rank], backend, "torchrun", torch.get_num_threads(), out, fmt, seed)
    else:
        run_as_rank(comm_rank, lambda: job, backend=backend, stall_timeout_s=timeout)


def _finish(jobs, per_job, backend: str, launcher: str, threads: int, out: Path, fmt: str, seed: int) -> None:
    rows, details = [], []
    for job, per_rank in zip(jobs, per_job):
        rows += summarise(job, per_rank)
        details += per_rank_details(job, per_rank)
    first = jobs[0]
    device = "cuda" if backend == "nccl" else "cpu"
    prov = provenance(device=device, dtype=first.dtype, seed=seed, threads=threads, extra={
        "preset": first.preset, "world_sizes": [j.world_size for j in jobs],
        "taus": sorted({s.tau for s in first.settings}), "tokens_per_rank": first.tokens_per_rank,
        "routing": first.settings[0].routing, "backend": backend, "launcher": launcher,
        "repeats": first.repeats, "warmup": first.warmup, "threads_per_rank": threads,
        "timer": "perf_counter between barriers; per phase the slowest rank, median over repeats",
        "bytes": "one way (dispatch); combine sends the same rows back",
        "load_average_1m_at_end": _load_average(),  # other work on the machine inflates the times, not the bytes
    })
    csv_path, json_path = write_results(out, "comm", SCHEMA_VERSION, rows, prov, split_sizes=details)
    from ..report.comm_plot import plot_comm

    figures = plot_comm(read_result(json_path)["rows"], out, stem="comm")
    shown = [{TABLE_HEADERS[k]: r[k] for k in TABLE_HEADERS} for r in rows] if fmt == "table" else rows
    emit(shown, TABLE_HEADERS.values() if fmt == "table" else rows[0].keys(), fmt,
         document=result_document("comm", SCHEMA_VERSION, rows, prov, split_sizes=details),
         title=f"Expert-parallel all-to-all, {first.preset}, {first.tokens_per_rank} tokens/rank, {first.dtype}, "
               f"{backend} (bytes: one way, all ranks)")
    mismatched = [r for r in rows if not r["analytic_matches"]]
    if mismatched:
        stderr.print(f"[bold red]warning:[/] measured bytes differ from the analytic count in {len(mismatched)} "
                     f"row(s); this is a bug, please report it")
    else:
        stderr.print(f"measured bytes equal the analytic count in all {len(rows)} rows")
    stderr.print(f"wrote {csv_path}, {json_path}" + "".join(f", {f}" for f in figures))


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _predict(preset, world_sizes, taus, tokens_per_rank, dtype, out: Path, fmt: str) -> None:
    rows = predict_rows(preset, world_sizes, taus, tokens_per_rank, dtype)
    prov = provenance(dtype=dtype, extra={"preset": preset, "world_sizes": world_sizes, "taus": taus,
                                          "tokens_per_rank": tokens_per_rank, "mode": "predict",
                                          "bytes": "one way (dispatch) at balance; dedup: slots independent"})
    csv_path, json_path = write_results(out, "comm_predict", SCHEMA_VERSION, rows, prov)
    from ..report.comm_plot import plot_comm

    figures = plot_comm(read_result(json_path)["rows"], out, stem="comm_predict")
    shown = [{PREDICT_HEADERS[k]: r[k] for k in PREDICT_HEADERS} for r in rows] if fmt == "table" else rows
    emit(shown, PREDICT_HEADERS.values() if fmt == "table" else rows[0].keys(), fmt,
         document=result_document("comm_predict", SCHEMA_VERSION, rows, prov),
         title=f"Expected all-to-all bytes at balance, {preset}, {dtype} (one way)")
    stderr.print(f"wrote {csv_path}, {json_path}" + "".join(f", {f}" for f in figures))
