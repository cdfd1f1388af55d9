"""What zero-computation experts save in expert-parallel communication, measured on a real distributed run.

For each world size P, P ranks (local processes, or a torchrun job) run moepp.parallel.ExpertParallelMoE for
MoE++ at every tau and for the vanilla MoE with the same FFN experts, interleaved round by round. Every rank
routes its own tokens with a forced routing and records, per phase, the time between two barriers, and the split
sizes it handed to all_to_all_single. The launcher turns that into one row per (P, tau, model):
  bytes   measured from the split sizes, next to the count predicted from the routing alone (slot and dedup
          dispatchers, moepp_bench.measure.comm_model) and the expectation at balance;
  times   per phase, the slowest rank of each repeat, median over repeats.

Routing: synthetic specs are drawn per rank (seed + rank: each rank routes its own batch); a replayed recording
is dealt out in order (rank r gets tokens [r*T, (r+1)*T)). The vanilla MoE gets the same spec, except that
forced:F and replay (which need zero-computation experts) become `balanced` for it: every slot on an FFN expert.
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from moepp.config import MoEConfig, layer_preset

from .comm_model import (bytes_per_token_at_balance, dedup_bytes_per_token_at_balance, routing_a2a_rows)
from .routing_gen import generate_routing, parse_routing_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PHASES = ("count_exchange", "dispatch", "expert", "combine")
MODELS = ("moepp", "moe")  # the names `throughput` uses


@dataclass(frozen=True)
class Setting:
    tau: float
    model: str  # "moepp" or "moe"
    routing: str  # the spec this row was routed with
    cfg: MoEConfig


@dataclass
class CommJob:
    """Everything the ranks of one world size need (pickled to each rank)."""

    preset: str
    world_size: int
    tokens_per_rank: int
    dtype: str
    repeats: int
    warmup: int
    seed: int
    settings: list[Setting]
    routing_by_setting: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(repr=False)  # [setting][rank]
    fault: tuple[int, str] | None = None  # test hook: (rank, "raise" or "kill") after that rank's first call


def bench_layer(preset: str, tau: float, vanilla: bool = False) -> MoEConfig:
    """The preset's layer, dropless (capacity would drop slots and make bytes depend on the capacity factor)."""
    return layer_preset(preset, vanilla=vanilla, tau=tau, capacity_factor=None)


def _routing_for(spec: str, cfg: MoEConfig, world_size: int, tokens_per_rank: int, seed: int):
    parsed = parse_routing_spec(spec, cfg)
    if parsed.kind == "replay":
        ids, gates = generate_routing(parsed, cfg, world_size * tokens_per_rank, seed)
        return [(ids[r * tokens_per_rank:(r + 1) * tokens_per_rank].clone(),
                 gates[r * tokens_per_rank:(r + 1) * tokens_per_rank].clone()) for r in range(world_size)]
    return [generate_routing(parsed, cfg, tokens_per_rank, seed + r) for r in range(world_size)]


def vanilla_spec(spec: str) -> str:
    kind = spec.strip().split(":", 1)[0].lower()
    return "balanced" if kind in ("forced", "replay") else spec


def make_job(preset: str, world_size: int, taus: list[float], tokens_per_rank: int, routing: str, dtype: str,
             repeats: int, warmup: int, seed: int, fault: tuple[int, str] | None = None) -> CommJob:
    """Settings and their routing (drawn once, here, so every rank and the analytic count see the same)."""
    settings, routings = [], []
    for tau in taus:
        for model in MODELS:
            cfg = bench_layer(preset, tau, vanilla=model == "moe")
            spec = routing if model == "moepp" else vanilla_spec(routing)
            settings.append(Setting(tau, model, spec, cfg))
            routings.append(_routing_for(spec, cfg, world_size, tokens_per_rank, seed))
    return CommJob(preset, world_size, tokens_per_rank, dtype, repeats, warmup, seed, settings, routings, fault)


# On each rank ----------------------------------------------------------------------------------------------
def comm_rank(rank: int, world_size: int, job: CommJob, report: Callable) -> dict:
    """One rank's part: per setting, the split sizes it used and its phase times for every repeat."""
    import torch.distributed as dist

    from moepp.parallel import ExpertParallelMoE

    nccl = dist.get_backend() == "nccl"
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if nccl else torch.device("cpu")
    dtype = DTYPES[job.dtype]
    torch.manual_seed(job.seed)  # the same replicated parameters on every rank
    with torch.device(device):
        plus = ExpertParallelMoE(next(s.cfg for s in job.settings if s.model == "moepp")).to(dtype)
        vanilla = ExpertParallelMoE(plus.cfg.vanilla()).to(dtype)
    vanilla.ffn = plus.ffn  # the same FFN experts: the two models differ only in the zero-computation experts
    gen = torch.Generator().manual_seed(job.seed + 1000 + rank)
    x_TD = torch.randn(job.tokens_per_rank, plus.cfg.d_model, generator=gen).to(device, dtype)
    routing = [(ids.to(device), gates.to(device)) for ids, gates in (r[rank] for r in job.routing_by_setting)]

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, (time.perf_counter() - t0) * 1e3

    times = [{p: [] for p in PHASES} for _ in job.settings]
    splits: list[dict | None] = [None] * len(job.settings)
    with torch.inference_mode():
        for round_ in range(job.warmup + job.repeats):
            for i, setting in enumerate(job.settings):
                ep = plus if setting.model == "moepp" else vanilla
                ep.cfg = setting.cfg  # tau changes nothing in the layer; keeps the config honest
                ids_TK, gates_TK = routing[i]
                local = ep.sort_slots(ids_TK, gates_TK)
                plan, t_count = timed(lambda: ep.exchange_counts(local))
                recv_RD, t_dispatch = timed(lambda: ep.dispatch(x_TD, plan))
                (out_RD, zc_TD), t_expert = timed(lambda: (ep.run_experts(recv_RD, plan), ep.zc_terms(x_TD, plan)))
                _, t_combine = timed(lambda: ep.combine(out_RD, zc_TD, plan))
                if round_ >= job.warmup:
                    for phase, t in zip(PHASES, (t_count, t_dispatch, t_expert, t_combine)):
                        times[i][phase].append(t)
                if splits[i] is None:
                    splits[i] = {"send": plan.send_splits, "recv": plan.recv_splits,
                                 "row_bytes": x_TD.shape[1] * x_TD.element_size()}
                report(1)
                if job.fault is not None and job.fault[0] == rank:
                    _inject(job.fault[1])
    return {"times": times, "splits": splits}


def _inject(how: str) -> None:
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError("injected failure (MOEPP_BENCH_COMM_FAULT)")


# Summary (launcher or rank 0) ------------------------------------------------------------------------------
def summarise(job: CommJob, per_rank: list[dict]) -> list[dict]:
    """One row per setting: measured bytes from the ranks' split sizes next to the analytic counts."""
    P = job.world_size
    rows = []
    for i, s in enumerate(job.settings):
        cfg = s.cfg
        b = torch.empty(0, dtype=DTYPES[job.dtype]).element_size()
        row_bytes = cfg.d_model * b
        splits = [per_rank[r]["splits"][i] for r in range(P)]
        send_rows = [sum(n for q, n in enumerate(sp["send"]) if q != r) for r, sp in enumerate(splits)]
        recv_rows = [sum(n for q, n in enumerate(sp["recv"]) if q != r) for r, sp in enumerate(splits)]
        analytic = routing_a2a_rows([ids for ids, _ in job.routing_by_setting[i]], cfg.n_ffn)
        n_tokens = P * job.tokens_per_rank
        ffn_share = cfg.rho if cfg.n_zc else 1.0
        sent_row_bytes = splits[0]["row_bytes"]  # from the tensors the ranks sent, not from the config
        measured = sum(send_rows) * sent_row_bytes
        row = {
            "model": s.model, "preset": job.preset, "world_size": P, "tau": s.tau,
            "tokens_per_rank": job.tokens_per_rank, "routing": s.routing, "dtype": job.dtype,
            "d_model": cfg.d_model, "top_k": cfg.top_k, "n_ffn": cfg.n_ffn, "n_zc": cfg.n_zc,
            "bytes_per_element": b,
            "rho": ffn_share,
            "ffn_slot_fraction": analytic.ffn_slots / analytic.slots,
            "remote_share": sum(send_rows) / analytic.ffn_slots if analytic.ffn_slots else float("nan"),
            "a2a_bytes_measured": measured,
            "a2a_bytes_analytic": analytic.slot * row_bytes,
            "a2a_bytes_dedup": analytic.dedup * row_bytes,
            "a2a_bytes_balance": n_tokens * bytes_per_token_at_balance(cfg.top_k, ffn_share, P, cfg.d_model, b),
            "combine_bytes_measured": sum(recv_rows) * sent_row_bytes,  # the rows go back the way they came
            "analytic_matches": (measured == analytic.slot * row_bytes and send_rows == list(analytic.send_by_rank)
                                 and recv_rows == list(analytic.recv_by_rank)),
            "bytes_per_token_measured": measured / n_tokens,
            "bytes_per_token_balance": bytes_per_token_at_balance(cfg.top_k, ffn_share, P, cfg.d_model, b),
            "max_rank_send_bytes": max(send_rows) * sent_row_bytes,
            "max_rank_recv_bytes": max(recv_rows) * sent_row_bytes,
            "bytes_ratio_vs_moe": None,  # filled below, once both models of this tau are known
            "repeats": job.repeats,
        }
        for phase in PHASES:
            slowest = [max(per_rank[r]["times"][i][phase][k] for r in range(P)) for k in range(job.repeats)]
            row[f"{phase}_ms"] = statistics.median(slowest)
        rows.append(row)
    for row in rows:
        moe = next(r for r in rows if r["model"] == "moe" and r["tau"] == row["tau"])
        row["bytes_ratio_vs_moe"] = (row["a2a_bytes_measured"] / moe["a2a_bytes_measured"]
                                     if moe["a2a_bytes_measured"] else float("nan"))
    return rows


def per_rank_details(job: CommJob, per_rank: list[dict]) -> list[dict]:
    """Split sizes of every rank for every setting (the raw material of the byte columns), for the JSON file."""
    return [{"world_size": job.world_size, "tau": s.tau, "model": s.model,
             "send_splits": [per_rank[r]["splits"][i]["send"] for r in range(job.world_size)],
             "recv_splits": [per_rank[r]["splits"][i]["recv"] for r in range(job.world_size)]}
            for i, s in enumerate(job.settings)]


def rounds_per_job(job: CommJob) -> int:
    """Progress events rank 0 sends over the job (one per setting per round)."""
    return (job.warmup + job.repeats) * len(job.settings)


# Prediction without launching ------------------------------------------------------------------------------
def predict_rows(preset: str, world_sizes: list[int], taus: list[float], tokens_per_rank: int,
                 dtype: str) -> list[dict]:
    """Expected bytes at balance for each P (no ranks needed, so any P)."""
    b = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    rows = []
    for P in world_sizes:
        for tau in taus:
            for model in MODELS:
                cfg = bench_layer(preset, tau, vanilla=model == "moe")
                share = cfg.rho if cfg.n_zc else 1.0
                per_token = bytes_per_token_at_balance(cfg.top_k, share, P, cfg.d_model, b)
                dedup = dedup_bytes_per_token_at_balance(cfg.top_k, share, cfg.n_ffn, P, cfg.d_model, b)
                rows.append({
                    "model": model, "preset": preset, "world_size": P, "tau": tau,
                    "tokens_per_rank": tokens_per_rank, "dtype": dtype, "d_model": cfg.d_model,
                    "top_k": cfg.top_k, "n_ffn": cfg.n_ffn, "n_zc": cfg.n_zc, "bytes_per_element": b,
                    "rho": share, "ffn_slot_fraction": share,
                    "bytes_per_token_balance": per_token, "bytes_per_token_dedup_balance": dedup,
                    "a2a_bytes_balance": per_token * P * tokens_per_rank,
                    "a2a_bytes_dedup_balance": None if dedup is None else dedup * P * tokens_per_rank,
                    "bytes_ratio_vs_moe": share,
                })
    return rows


# Memory ------------------------------------------------------------------------------------------------------
RANK_RUNTIME_BYTES = 400 << 20  # a rank process's torch runtime and gloo buffers, before any tensor


def estimate_run_memory(cfg: MoEConfig, world_size: int, tokens_per_rank: int, dtype: str) -> int:
    """All local ranks together: each holds E/P experts (made in float32, then cast), its tokens, and the rows in
    flight; a rank may receive up to twice its balanced share under skewed routing."""
    b = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    D, H, K = cfg.d_model, cfg.d_expert, cfg.top_k
    weights = (cfg.n_ffn // world_size) * 3 * D * H * (4 + b)
    rows = 2 * tokens_per_rank * K
    activations = tokens_per_rank * D * b * 2 + rows * (4 * D + 2 * H) * b
    return world_size * (RANK_RUNTIME_BYTES + weights + activations)
