"""Expert-layer throughput of MoE++ against the vanilla MoE with the same FFN experts, in one interleaved run.

Per token count, one round-robin timing group holds:
  moe            the vanilla layer (same FFN experts, no ZC experts), for each backend asked for
  moepp          the MoE++ layer at each tau (sharing the vanilla layer's FFN expert tensors), each backend
  moe-loop       the vanilla layer through the naive per-expert loop (the official code's dispatch)
  dense-ceiling  one dense SwiGLU matmul chain over all K*T slots: the vanilla layer's FFN FLOPs with no
                 routing at all, i.e. the practical ceiling of this machine for that work
Every case in a group is timed in the same rounds, so speedups are ratios of medians from one run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moepp.config import MoEConfig, layer_preset
from moepp.experts import swiglu
from moepp.layer import MoELayer

from .routing_gen import ffn_slot_fraction, generate_routing, parse_routing_spec, vanilla_routing_spec
from .timing import StageClock, time_interleaved

MODELS = ("moe", "moepp", "moe-loop", "dense-ceiling")


@dataclass(frozen=True)
class ThroughputSettings:
    preset: str
    tokens: tuple[int, ...]
    taus: tuple[float, ...]
    dtype: str
    backends: tuple[str, ...]
    routing: str
    backward: bool
    device: str
    repeats: int
    warmup: int
    seed: int
    cuda_graphs: bool = False
    breakdown: bool = False

    @property
    def pass_name(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"


def layer_forward_flops(cfg: MoEConfig, n_tokens: int, topk_ids_TK: torch.Tensor) -> int:
    """Matmul FLOPs of one layer forward for this routing: router, FFN experts, constant experts' W_c."""
    N, D, H = cfg.n_experts, cfg.d_model, cfg.d_expert
    router = 2 * n_tokens * D * N if cfg.router == "linear" else 2 * n_tokens * cfg.router_mult * N * (D + N)
    ffn_slots = int((topk_ids_TK < cfg.n_ffn).sum())
    const = cfg.type_range("constant")
    const_slots = int(((topk_ids_TK >= const.start) & (topk_ids_TK < const.stop)).sum())
    return router + 6 * ffn_slots * D * H + 2 * const_slots * D * 2


def _pass_factor(backward: bool) -> int:
    return 3 if backward else 1  # backward of a matmul costs two more of the same size (dX and dW)


class _Case:
    """One timed callable plus what its row needs to know."""

    def __init__(self, model: str, tau: float | None, fn: Callable[[], object], ffn_slots: int, flops: int,
                 ffn_fraction: float, backend: str, layer: MoELayer | None = None,
                 routing: tuple[torch.Tensor, torch.Tensor] | None = None, x: torch.Tensor | None = None):
        self.model, self.tau, self.fn, self.ffn_slots, self.flops = model, tau, fn, ffn_slots, flops
        self.ffn_fraction, self.backend, self.layer, self.routing, self.x = ffn_fraction, backend, layer, routing, x

    @property
    def key(self) -> str:
        return f"{self.model}[{self.backend}]" + ("" if self.tau is None else f"@{self.tau:g}")


def _timed_call(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor], backward: bool,
                dy: torch.Tensor | None) -> Callable[[], None]:
    """What one timed call runs: the forward under inference_mode, or forward + gradients of `inputs`."""
    if not backward:
        def run():
            with torch.inference_mode():
                forward()
        return run

    def run_bwd():
        torch.autograd.grad(forward(), inputs, dy, allow_unused=True)
    return run_bwd


def _layer_call(layer: MoELayer, x: torch.Tensor, routing, backend: str, backward: bool, dy: torch.Tensor | None):
    params = [p for p in layer.parameters() if p.requires_grad]
    return _timed_call(lambda: layer(x, forced_routing=routing, backend=backend).y, [x, *params], backward, dy)


def _dense_call(w_up_2HD, w_down_DH, x_SD, backward: bool, dy_SD):
    return _timed_call(lambda: torch.mm(swiglu(torch.mm(x_SD, w_up_2HD.t())), w_down_DH.t()),
                       [x_SD, w_up_2HD, w_down_DH], backward, dy_SD)


def build_layers(settings: ThroughputSettings) -> tuple[MoELayer, dict[float, MoELayer]]:
    """The vanilla layer and one MoE++ layer per tau, all sharing the same FFN expert tensors."""
    dtype = getattr(torch, settings.dtype)
    torch.manual_seed(settings.seed)
    base = layer_preset(settings.preset)
    vanilla = MoELayer(base.vanilla()).to(device=settings.device, dtype=dtype)
    moepp = {}
    for tau in settings.taus:
        layer = MoELayer(base.replace(tau=tau)).to(device=settings.device, dtype=dtype)
        layer.ffn = vanilla.ffn  # same FFN experts: the comparison isolates the zero-computation experts
        moepp[tau] = layer
    if not settings.backward:
        for layer in (vanilla, *moepp.values()):
            layer.requires_grad_(False)
    return vanilla, moepp


def _cases_for_tokens(settings, vanilla, moepp, n_tokens) -> list[_Case]:
    dev, dtype, bwd = settings.device, getattr(torch, settings.dtype), settings.backward
    gen = torch.Generator(device="cpu").manual_seed(settings.seed + n_tokens)
    x = torch.randn(n_tokens, vanilla.cfg.d_model, generator=gen).to(device=dev, dtype=dtype)
    x.requires_grad_(bwd)
    dy = torch.randn_like(x) if bwd else None
    K = vanilla.cfg.top_k
    v_ids, v_gates = generate_routing(vanilla_routing_spec(settings.routing), vanilla.cfg, n_tokens, settings.seed, dev)
    v_slots = int((v_ids < vanilla.cfg.n_ffn).sum())
    v_flops = layer_forward_flops(vanilla.cfg, n_tokens, v_ids) * _pass_factor(bwd)
    v_frac = ffn_slot_fraction(v_ids, vanilla.cfg)
    cases = [_Case("moe", None, _layer_call(vanilla, x, (v_ids, v_gates), b, bwd, dy), v_slots, v_flops, v_frac, b,
                   vanilla, (v_ids, v_gates), x.detach()) for b in settings.backends]
    cases.append(_Case("moe-loop", None, _layer_call(vanilla, x, (v_ids, v_gates), "loop", bwd, dy), v_slots,
                       v_flops, v_frac, "loop", vanilla, (v_ids, v_gates), x.detach()))
    # Dense ceiling: expert 0's weights on all K*T slots, the same FFN FLOPs as the vanilla layer.
    x_SD = x.detach().repeat(K, 1).requires_grad_(bwd)
    w_up, w_down = vanilla.ffn.w_up[0].detach().clone(), vanilla.ffn.w_down[0].detach().clone()
    w_up.requires_grad_(bwd)
    w_down.requires_grad_(bwd)
    dense_flops = 6 * x_SD.shape[0] * vanilla.cfg.d_model * vanilla.cfg.d_expert * _pass_factor(bwd)
    cases.append(_Case("dense-ceiling", None, _dense_call(w_up, w_down, x_SD, bwd, torch.randn_like(x_SD) if bwd
                                                          else None), x_SD.shape[0], dense_flops, 1.0, "dense"))
    for tau, layer in moepp.items():
        ids, gates = generate_routing(settings.routing, layer.cfg, n_tokens, settings.seed, dev)
        slots = int((ids < layer.cfg.n_ffn).sum())
        flops = layer_forward_flops(layer.cfg, n_tokens, ids) * _pass_factor(bwd)
        for b in settings.backends:
            cases.append(_Case("moepp", tau, _layer_call(layer, x, (ids, gates), b, bwd, dy), slots, flops,
                               ffn_slot_fraction(ids, layer.cfg), b, layer, (ids, gates), x.detach()))
    return cases


def count_calls(settings: ThroughputSettings) -> int:
    """Timed and warm-up calls in a run, for the progress bar."""
    per_group = 2 + len(settings.backends) * (1 + len(settings.taus))
    return len(settings.tokens) * per_group * (settings.repeats + settings.warmup)


def run_throughput(settings: ThroughputSettings, on_call: Callable[[str], None] | None = None
                   ) -> tuple[list[dict], list[dict]]:
    """Rows for the result table, and per-stage rows when settings.breakdown."""
    parse_routing_spec(settings.routing)
    vanilla, moepp = build_layers(settings)
    rows, stage_rows = [], []
    for n_tokens in settings.tokens:
        cases = _cases_for_tokens(settings, vanilla, moepp, n_tokens)
        stats = time_interleaved({c.key: c.fn for c in cases}, repeats=settings.repeats, warmup=settings.warmup,
                                 device=settings.device, cuda_graphs=settings.cuda_graphs, on_call=on_call)
        # Speedups are against the vanilla layer on the same backend (the first backend for the baselines).
        refs = {c.backend: c for c in cases if c.model == "moe"}
        first_ref = refs[settings.backends[0]]
        dense = next(c for c in cases if c.model == "dense-ceiling")
        dense_gflops = dense.flops / stats[dense.key].median / 1e6
        for c in cases:
            st = stats[c.key]
            ref = refs.get(c.backend, first_ref)
            gflops = c.flops / st.median / 1e6
            speedup = stats[ref.key].median / st.median
            ideal = ref.ffn_slots / c.ffn_slots if c.ffn_slots else float("inf")
            rows.append({
                "model": c.model, "preset": settings.preset, "tau": c.tau, "tokens": n_tokens,
                "dtype": settings.dtype, "backend": c.backend, "routing": settings.routing,
                "pass": settings.pass_name, "ffn_slot_fraction": round(c.ffn_fraction, 6),
                "time_ms_median": st.median, "time_ms_iqr": st.iqr, "tokens_per_s": n_tokens / st.median * 1e3,
                "speedup": speedup, "ideal_speedup": ideal, "efficiency": speedup / ideal,
                "gflops_per_s": gflops, "vs_dense_ceiling": gflops / dense_gflops,
                "ffn_slots": c.ffn_slots, "repeats": len(st.times_ms),
            })
        if settings.breakdown:
            stage_rows += _stage_breakdown(settings, cases, n_tokens)
    return rows, stage_rows


def _stage_breakdown(settings: ThroughputSettings, cases: list[_Case], n_tokens: int) -> list[dict]:
    """Where a forward's time goes, stage by stage (timed separately from the main rounds: the marks
    synchronise, and on CPU they add a Python call per stage)."""
    rows = []
    for c in cases:
        if c.layer is None or c.backend == "loop":
            continue
        clock = StageClock(settings.device)
        totals = []
        with torch.inference_mode():
            for i in range(settings.warmup + settings.repeats):
                clock.start()
                started = clock.last
                c.layer(c.x, forced_routing=c.routing, backend=c.backend, marker=clock)
                clock("other")  # losses and bookkeeping after the combine
                if i < settings.warmup:
                    clock.totals_ms.clear()
                else:
                    totals.append((clock.last - started) * 1e3)
        medians = clock.medians()
        total = sorted(totals)[len(totals) // 2]
        for stage, ms in medians.items():
            rows.append({"model": c.model, "preset": settings.preset, "tau": c.tau, "tokens": n_tokens,
                         "dtype": settings.dtype, "backend": c.backend, "stage": stage, "time_ms": ms,
                         "share": ms / total if total else float("nan")})
    return rows

