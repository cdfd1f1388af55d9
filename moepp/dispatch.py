"""Dispatch and combine: sort routing slots by expert, apply capacity, run the FFN experts, add the ZC terms.

A "slot" is one (token, k) pair; there are S = T*K of them. Sorting slots by expert id puts FFN slots first
(their ids are smallest), then constant, copy and zero slots, then dropped slots (given the sentinel id N).
Only FFN slots reach the FFN matmuls; copy and constant slots cost O(D) each; zero and dropped slots cost nothing.

Backends for the FFN part (all share the plan and the ZC handling):
  sorted      per-expert torch.mm on contiguous slices of the sorted rows (default; one host sync per layer)
  padded      rows scattered into an [E, max_count, D] buffer and run through bmm
  grouped_mm  torch._grouped_mm with offsets kept on the device: no host sync at all, so it is the one for CUDA
  loop        the naive per-expert loop with a nonzero() host sync per expert, as the official code does it
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .config import MoEConfig
from .experts import FFNExperts, ZeroComputationExperts, swiglu


def count_per_expert(ids: torch.Tensor, n: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """How many entries of ids equal each of 0..n-1. Unlike bincount, never syncs with the host on CUDA
    (bincount reads the maximum back to size its output), so it can sit inside a CUDA graph."""
    ids = ids.reshape(-1)
    src = torch.ones_like(ids) if weights is None else weights.reshape(-1)
    return torch.zeros(n, dtype=src.dtype, device=ids.device).index_add_(0, ids, src)


@dataclass
class DispatchPlan:
    order_S: torch.Tensor  # flat slot index (t*K + k) in expert-sorted order, dropped slots last
    token_S: torch.Tensor  # token of each sorted slot
    expert_S: torch.Tensor  # expert id of each sorted slot (N for dropped)
    counts_N1: torch.Tensor  # kept slots per expert, then the number of dropped slots
    dropped_TK: torch.Tensor | None  # None when dropless


def capacity_drops(topk_ids_TK: torch.Tensor, cfg: MoEConfig) -> torch.Tensor | None:
    """Slots over their expert's capacity (C_FFN or C_ZC); earlier k has priority, then earlier tokens."""
    T, K = topk_ids_TK.shape
    caps = cfg.capacities(T)
    if caps is None:
        return None
    ids_S = topk_ids_TK.t().reshape(-1)  # k-major: every token's first choice before any second choice
    order_S = torch.argsort(ids_S, stable=True)
    counts_N = count_per_expert(ids_S, cfg.n_experts)
    starts_N = torch.cumsum(counts_N, 0) - counts_N
    rank_sorted_S = torch.arange(ids_S.numel(), device=ids_S.device) - starts_N[ids_S[order_S]]
    rank_S = torch.empty_like(rank_sorted_S)
    rank_S[order_S] = rank_sorted_S
    cap_N = torch.full((cfg.n_experts,), caps[1], device=ids_S.device)
    cap_N[: cfg.n_ffn] = caps[0]
    return (rank_S >= cap_N[ids_S]).view(K, T).t()


def make_plan(topk_ids_TK: torch.Tensor, cfg: MoEConfig) -> DispatchPlan:
    T, K = topk_ids_TK.shape
    N = cfg.n_experts
    dropped_TK = capacity_drops(topk_ids_TK, cfg)
    ids_S = topk_ids_TK.reshape(-1)
    if dropped_TK is not None:
        ids_S = ids_S.masked_fill(dropped_TK.reshape(-1), N)
    order_S = torch.argsort(ids_S, stable=True)
    return DispatchPlan(
        order_S=order_S,
        token_S=torch.div(order_S, K, rounding_mode="floor"),
        expert_S=ids_S.index_select(0, order_S),
        counts_N1=count_per_expert(ids_S, N + 1),
        dropped_TK=dropped_TK,
    )


# FFN backends on sorted rows ---------------------------------------------------------------------------------
def ffn_sorted_rows(x_RD: torch.Tensor, counts: list[int], ffn: FFNExperts) -> torch.Tensor:
    """SwiGLU expert e on rows [sum(counts[:e]), sum(counts[:e+1])) of x_RD, for every expert."""
    if not torch.is_grad_enabled() or not (x_RD.requires_grad or ffn.w_up.requires_grad):
        return _ffn_sorted_inference(x_RD, counts, ffn)
    # unbind once: indexing w_up[e] per expert would make autograd build a full-size zero gradient per expert.
    w_up, w_down = ffn.w_up.unbind(0), ffn.w_down.unbind(0)
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n:
            x_nD = x_RD[start : start + n]
            outs.append(torch.mm(swiglu(torch.mm(x_nD, w_up[e].t())), w_down[e].t()))
        start += n
    return torch.cat(outs) if outs else x_RD.new_zeros(0, x_RD.shape[1])


def _ffn_sorted_inference(x_RD: torch.Tensor, counts: list[int], ffn: FFNExperts) -> torch.Tensor:
    # No autograd: write every expert's result into one preallocated buffer (no cat, fewer large allocations).
    # The gate and up halves of w_up[e] are contiguous row blocks, so they run as two matmuls into two
    # contiguous buffers: the down projection then reads a contiguous operand (no strided half of [n, 2H]).
    R, D = x_RD.shape
    H = ffn.w_down.shape[2]
    out_RD = x_RD.new_empty(R, D)
    n_max = max(counts, default=0)
    gate_buf, up_buf = x_RD.new_empty(n_max * H), x_RD.new_empty(n_max * H)
    start = 0
    for e, n in enumerate(counts):
        if n:
            x_nD = x_RD[start : start + n]
            gate_nH, up_nH = gate_buf[: n * H].view(n, H), up_buf[: n * H].view(n, H)
            torch.mm(x_nD, ffn.w_up[e, :H].t(), out=gate_nH)
            torch.mm(x_nD, ffn.w_up[e, H:].t(), out=up_nH)
            F.silu(gate_nH, inplace=True).mul_(up_nH)
            torch.mm(gate_nH, ffn.w_down[e].t(), out=out_RD[start : start + n])
        start += n
    return out_RD


def _ffn_padded(x_RD: torch.Tensor, counts: list[int], ffn: FFNExperts) -> torch.Tensor:
    E, R = len(counts), x_RD.shape[0]
    if R == 0:
        return x_RD.new_zeros(0, x_RD.shape[1])
    counts_E = torch.tensor(counts, device=x_RD.device)
    expert_R = torch.repeat_interleave(torch.arange(E, device=x_RD.device), counts_E, output_size=R)
    pos_R = torch.arange(R, device=x_RD.device) - (torch.cumsum(counts_E, 0) - counts_E)[expert_R]
    x_ECD = x_RD.new_zeros(E, max(counts), x_RD.shape[1]).index_put((expert_R, pos_R), x_RD)
    h_EC2H = torch.bmm(x_ECD, ffn.w_up.transpose(1, 2))
    y_ECD = torch.bmm(swiglu(h_EC2H), ffn.w_down.transpose(1, 2))
    return y_ECD[expert_R, pos_R]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (_grouped_mm rejects expanded grads)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _ffn_grouped(x_SD: torch.Tensor, offs_E: torch.Tensor, valid_S1: torch.Tensor, ffn: FFNExperts):
    """Grouped matmuls over all S sorted rows; rows past the last offset are masked (they hold garbage)."""
    x_SD = torch.where(valid_S1, x_SD, 0)
    h_S2H = torch._grouped_mm(x_SD, ffn.w_up.transpose(1, 2), offs=offs_E)
    y_SD = torch._grouped_mm(swiglu(h_S2H), ffn.w_down.transpose(1, 2), offs=offs_E)
    return torch.where(valid_S1, _ContiguousGrad.apply(y_SD), 0)


# Combine ---------------------------------------------------------------------------------------------------
def dispatch_combine(
    x_TD: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    ffn: FFNExperts,
    zc: ZeroComputationExperts,
    cfg: MoEConfig,
    backend: str | None = None,
    marker: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, DispatchPlan]:
    """y[t] = sum over kept slots (t, k) of gates[t, k] * E_{ids[t, k]}(x[t]).

    marker, when given, is called with a stage name as each stage ends (for per-stage timing)."""
    backend = backend or cfg.backend
    mark = marker or _no_mark
    plan = make_plan(topk_ids_TK, cfg)
    if backend == "loop":
        return _combine_loop(x_TD, topk_ids_TK, gates_TK, plan, ffn, zc, cfg), plan
    if backend == "grouped_mm":
        return _combine_sync_free(x_TD, gates_TK, plan, ffn, zc, cfg), plan

    gates_S = gates_TK.reshape(-1).index_select(0, plan.order_S)
    counts = plan.counts_N1.tolist()  # the one host sync of this layer
    n_ffn_slots = sum(counts[: cfg.n_ffn])
    n_const_slots = sum(counts[cfg.n_ffn : cfg.n_ffn + cfg.n_constant])
    n_copy_slots = sum(counts[cfg.n_ffn + cfg.n_constant : cfg.n_ffn + cfg.n_constant + cfg.n_copy])
    y_TD = torch.zeros_like(x_TD)
    mark("sort")
    if n_ffn_slots:
        tok_R = plan.token_S[:n_ffn_slots]
        x_RD = x_TD.index_select(0, tok_R)
        mark("gather")
        ffn_fn = _ffn_padded if backend == "padded" else ffn_sorted_rows
        rows_RD = ffn_fn(x_RD, counts[: cfg.n_ffn], ffn)
        mark("expert_matmuls")
        g_R1 = gates_S[:n_ffn_slots].to(x_TD.dtype).unsqueeze(1)
        rows_RD = rows_RD * g_R1 if rows_RD.requires_grad else rows_RD.mul_(g_R1)
        y_TD.index_add_(0, tok_R, rows_RD)
        mark("combine")
    if n_const_slots + n_copy_slots:
        sl = slice(n_ffn_slots, n_ffn_slots + n_const_slots + n_copy_slots)
        y_TD = zc.add_token_terms(y_TD, x_TD, plan.token_S[sl], plan.expert_S[sl], gates_S[sl], n_const_slots)
        mark("zc_experts")
    return y_TD, plan


def _no_mark(stage: str) -> None:
    pass


def _combine_sync_free(x_TD, gates_TK, plan: DispatchPlan, ffn, zc, cfg: MoEConfig) -> torch.Tensor:
    """Every sorted slot goes through one gather and one index_add; the mask, not a host-side slice,
    decides who contributes, so no device-to-host copy happens (what a CUDA graph needs)."""
    S = plan.order_S.numel()
    offs_E = torch.cumsum(plan.counts_N1[: cfg.n_ffn], 0).to(torch.int32)
    x_SD = x_TD.index_select(0, plan.token_S)
    is_ffn_S = plan.expert_S < cfg.n_ffn
    gate_S = gates_TK.reshape(-1).index_select(0, plan.order_S).to(x_TD.dtype)
    live_S = plan.expert_S < cfg.n_experts - cfg.n_zero  # FFN, constant and copy slots contribute
    gate_S = torch.where(live_S, gate_S, 0)
    rows_SD = zc.rows(x_SD, plan.expert_S)
    if cfg.n_ffn:
        valid_S1 = (torch.arange(S, device=x_TD.device) < offs_E[-1]).unsqueeze(1)
        rows_SD = torch.where(is_ffn_S.unsqueeze(1), _ffn_grouped(x_SD, offs_E, valid_S1, ffn), rows_SD)
    return torch.zeros_like(x_TD).index_add(0, plan.token_S, rows_SD * gate_S.unsqueeze(1))


def _combine_loop(x_TD, topk_ids_TK, gates_TK, plan: DispatchPlan, ffn, zc, cfg: MoEConfig) -> torch.Tensor:
    """The baseline: one nonzero() (a host sync) and one gather per expert, like the official code."""
    ids_TK = topk_ids_TK
    if plan.dropped_TK is not None:
        ids_TK = ids_TK.masked_fill(plan.dropped_TK, cfg.n_experts)
    y_TD = torch.zeros_like(x_TD)
    types = cfg.expert_types
    const_start = cfg.type_range("constant").start
    w_up, w_down = ffn.w_up.unbind(0), ffn.w_down.unbind(0)  # as separate per-expert weights would be
    for e in range(cfg.n_experts):
        tok_R, k_R = torch.nonzero(ids_TK == e, as_tuple=True)
        x_RD = x_TD.index_select(0, tok_R)
        if types[e] == "ffn":
            out_RD = F.linear(swiglu(F.linear(x_RD, w_up[e])), w_down[e])
        elif types[e] == "constant":
            out_RD = zc.constant_expert(e - const_start, x_RD)
        elif types[e] == "copy":
            out_RD = x_RD
        else:
            out_RD = torch.zeros_like(x_RD)
        g_R1 = gates_TK[tok_R, k_R].unsqueeze(1).to(x_TD.dtype)
        y_TD.index_add_(0, tok_R, out_RD * g_R1)
    return y_TD
