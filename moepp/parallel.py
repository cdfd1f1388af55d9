"""Expert parallelism over torch.distributed: FFN experts sharded over P ranks, zero-computation experts replicated.

Rank r holds FFN experts [r*E/P, (r+1)*E/P); the router and the constant experts' few parameters are copied on
every rank, so a slot routed to a zero-computation (ZC) expert is served where its token lives and never travels.
Each rank routes its own tokens. One forward, in the steps the benchmark times one by one:

  sort_slots      local: sort (token, k) slots by expert (moepp.dispatch.make_plan, capacity applied per rank)
  exchange_counts all_to_all of per-expert slot counts, so every rank knows how many rows it will receive
  dispatch        all_to_all_single of one row per FFN slot, uneven splits (rows are already grouped by rank)
  run_experts     local FFN experts on the received rows, and the ZC experts on the rank's own slots
  combine         the reverse all_to_all_single, then the gate-weighted sum into tokens

The same code runs on gloo (CPU) and NCCL (tensors on the rank's GPU). Backward goes through the two
all_to_alls in reverse; gradients of the replicated parameters are per rank until allreduce_replicated_grads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import MoEConfig
from .dispatch import ffn_sorted_rows, make_plan
from .experts import FFNExperts, ZeroComputationExperts
from .layer import MoELayer
from .losses import heterogeneous_balance_loss
from .router import Gating, Router, gate


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x_RD, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out_RD = x_RD.new_empty(sum(out_splits), *x_RD.shape[1:])
        dist.all_to_all_single(out_RD, x_RD.contiguous(), out_splits, in_splits, group=group)
        return out_RD

    @staticmethod
    def backward(ctx, grad_RD):
        out_splits, in_splits = ctx.splits
        grad_in_RD = grad_RD.new_empty(sum(in_splits), *grad_RD.shape[1:])
        dist.all_to_all_single(grad_in_RD, grad_RD.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in_RD, None, None, None


@dataclass
class LocalPlan:
    """This rank's slots, before any communication."""

    ffn_token_R: torch.Tensor  # token of each FFN slot, sorted by expert (so grouped by owning rank)
    ffn_gate_R: torch.Tensor
    send_counts_E: torch.Tensor  # FFN slots per global FFN expert
    zc_token_R: torch.Tensor  # copy and constant slots (zero and dropped slots need no work)
    zc_expert_R: torch.Tensor
    zc_gate_R: torch.Tensor


@dataclass
class ExchangePlan:
    """What this rank sends and receives: the split sizes of both all_to_alls."""

    local: LocalPlan
    send_splits: list[int]  # rows to each rank in dispatch (and from each rank in combine)
    recv_splits: list[int]  # rows from each rank in dispatch (and to each rank in combine)
    recv_counts_PE: list[list[int]]  # rows from rank p for local expert e, in arrival order

    def remote_rows(self, rank: int) -> tuple[int, int]:
        """(rows sent, rows received) in dispatch, leaving out the rows a rank sends to itself."""
        sent = sum(n for p, n in enumerate(self.send_splits) if p != rank)
        received = sum(n for p, n in enumerate(self.recv_splits) if p != rank)
        return sent, received


@dataclass
class EPOutput:
    y: torch.Tensor  # same shape as the input
    logits_TN: torch.Tensor | None  # None when the routing was given
    balance_loss: torch.Tensor | None  # over this rank's tokens; None when the routing was given
    plan: ExchangePlan


class ExpertParallelMoE(nn.Module):
    """An MoE(++) layer whose FFN experts are sharded over the ranks of a process group."""

    def __init__(self, cfg: MoEConfig, group: dist.ProcessGroup | None = None, init_std: float = 0.02):
        """Random weights; call it with the same torch seed on every rank so replicated parameters agree."""
        super().__init__()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = P = dist.get_world_size(group)
        if cfg.n_ffn % P:
            raise ValueError(f"n_ffn={cfg.n_ffn} FFN experts cannot be sharded evenly over {P} ranks; "
                             f"use a world size that divides {cfg.n_ffn}")
        self.cfg = cfg
        self.experts_per_rank = cfg.n_ffn // P
        self.first_expert = self.rank * self.experts_per_rank
        self.router = Router(cfg, init_std)
        # This rank's shard, described as a layer of E/P FFN experts only (top-1 keeps that config valid).
        shard_cfg = cfg.replace(n_ffn=self.experts_per_rank, n_zero=0, n_copy=0, n_constant=0, top_k=1)
        self.ffn = FFNExperts(shard_cfg, init_std)
        self.zc = ZeroComputationExperts(cfg, init_std)

    @classmethod
    def from_layer(cls, layer: MoELayer, group: dist.ProcessGroup | None = None) -> "ExpertParallelMoE":
        """This rank's part of a single-process layer: its FFN experts, and copies of everything else."""
        cfg = layer.cfg
        with torch.device("meta"):
            ep = cls(cfg, group)
        ep = ep.to_empty(device=layer.ffn.w_up.device).to(layer.ffn.w_up.dtype)
        lo, hi = ep.first_expert, ep.first_expert + ep.experts_per_rank
        with torch.no_grad():
            ep.router.load_state_dict(layer.router.state_dict())
            ep.zc.load_state_dict(layer.zc.state_dict())
            ep.ffn.w_up.copy_(layer.ffn.w_up[lo:hi])
            ep.ffn.w_down.copy_(layer.ffn.w_down[lo:hi])
        return ep

    # Steps ---------------------------------------------------------------------------------------------------
    def route(self, x_TD: torch.Tensor, prev_logits_TN: torch.Tensor | None = None) -> tuple[torch.Tensor, Gating]:
        use_residual = self.cfg.gating_residual and prev_logits_TN is not None
        logits_TN = self.router(x_TD, prev_logits_TN if use_residual else None)
        return logits_TN, gate(logits_TN, self.cfg)

    def sort_slots(self, topk_ids_TK: torch.Tensor, gates_TK: torch.Tensor) -> LocalPlan:
        cfg = self.cfg
        plan = make_plan(topk_ids_TK, cfg)
        counts = plan.counts_N1.tolist()
        n_ffn_slots = sum(counts[: cfg.n_ffn])
        n_cc_slots = sum(counts[cfg.n_ffn : cfg.n_ffn + cfg.n_constant + cfg.n_copy])
        gates_S = gates_TK.reshape(-1).index_select(0, plan.order_S)
        cc = slice(n_ffn_slots, n_ffn_slots + n_cc_slots)
        return LocalPlan(
            ffn_token_R=plan.token_S[:n_ffn_slots], ffn_gate_R=gates_S[:n_ffn_slots],
            send_counts_E=plan.counts_N1[: cfg.n_ffn].contiguous(),
            zc_token_R=plan.token_S[cc], zc_expert_R=plan.expert_S[cc], zc_gate_R=gates_S[cc],
        )

    def exchange_counts(self, local: LocalPlan) -> ExchangePlan:
        """The one collective before dispatch: rank p learns how many rows each rank sends to each of its experts."""
        P, E_loc = self.world_size, self.experts_per_rank
        recv_counts = torch.empty_like(local.send_counts_E)
        dist.all_to_all_single(recv_counts, local.send_counts_E, group=self.group)
        send_PE = local.send_counts_E.view(P, E_loc).tolist()
        recv_PE = recv_counts.view(P, E_loc).tolist()
        return ExchangePlan(local, [sum(row) for row in send_PE], [sum(row) for row in recv_PE], recv_PE)

    def dispatch(self, expert_x_TD: torch.Tensor, plan: ExchangePlan) -> torch.Tensor:
        """One row per FFN slot to the rank owning its expert; returns the rows this rank received."""
        send_RD = expert_x_TD.index_select(0, plan.local.ffn_token_R)
        return _AllToAll.apply(send_RD, plan.recv_splits, plan.send_splits, self.group)

    def run_experts(self, recv_RD: torch.Tensor, plan: ExchangePlan) -> torch.Tensor:
        """Local FFN experts on received rows. Rows arrive grouped by source rank, then expert; experts want
        them grouped by expert, so permute there and back."""
        P, E_loc = self.world_size, self.experts_per_rank
        starts, start = [[0] * E_loc for _ in range(P)], 0
        for p in range(P):
            for e in range(E_loc):
                starts[p][e] = start
                start += plan.recv_counts_PE[p][e]
        pieces = [torch.arange(starts[p][e], starts[p][e] + plan.recv_counts_PE[p][e], device=recv_RD.device)
                  for e in range(E_loc) for p in range(P)]
        by_expert_R = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=recv_RD.device)
        x_RD = recv_RD.index_select(0, by_expert_R)
        counts = [sum(plan.recv_counts_PE[p][e] for p in range(P)) for e in range(E_loc)]
        y_RD = ffn_sorted_rows(x_RD, counts, self.ffn)
        return torch.zeros_like(y_RD).index_copy(0, by_expert_R, y_RD)

    def zc_terms(self, expert_x_TD: torch.Tensor, plan: ExchangePlan) -> torch.Tensor:
        """Gate-weighted copy and constant experts on this rank's own slots (zero experts add nothing)."""
        local = plan.local
        y_TD = torch.zeros_like(expert_x_TD)
        if local.zc_token_R.numel():
            rows_RD = self.zc.rows(expert_x_TD.index_select(0, local.zc_token_R), local.zc_expert_R)
            y_TD = y_TD.index_add(0, local.zc_token_R, rows_RD * local.zc_gate_R.to(rows_RD.dtype).unsqueeze(1))
        return y_TD

    def combine(self, out_RD: torch.Tensor, zc_TD: torch.Tensor, plan: ExchangePlan) -> torch.Tensor:
        """Send expert outputs back to their tokens' ranks and add them, gate-weighted, to the ZC terms."""
        back_RD = _AllToAll.apply(out_RD, plan.send_splits, plan.recv_splits, self.group)
        gates_R1 = plan.local.ffn_gate_R.to(back_RD.dtype).unsqueeze(1)
        return zc_TD.index_add(0, plan.local.ffn_token_R, back_RD * gates_R1)

    # The whole layer -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, prev_logits_TN: torch.Tensor | None = None, *,
                topk_ids_TK: torch.Tensor | None = None, gates_TK: torch.Tensor | None = None) -> EPOutput:
        """x: [..., D], this rank's tokens. topk_ids_TK and gates_TK, when given, replace the router's choice
        (the benchmark forces routing this way); then no logits or balance loss are returned."""
        cfg = self.cfg
        x_TD = x.reshape(-1, cfg.d_model)
        logits_TN = balance = None
        if topk_ids_TK is None:
            logits_TN, g = self.route(x_TD, prev_logits_TN)
            topk_ids_TK, gates_TK = g.topk_ids_TK, g.gates_TK
            balance = heterogeneous_balance_loss(g.probs_TN, topk_ids_TK, cfg)
        elif gates_TK is None or topk_ids_TK.shape != (x_TD.shape[0], cfg.top_k) or gates_TK.shape != topk_ids_TK.shape:
            raise ValueError(f"forced routing needs topk_ids_TK and gates_TK of shape ({x_TD.shape[0]}, {cfg.top_k})")
        expert_x_TD = x_TD * cfg.top_k if cfg.scale_input_by_k else x_TD
        plan = self.exchange_counts(self.sort_slots(topk_ids_TK, gates_TK))
        out_RD = self.run_experts(self.dispatch(expert_x_TD, plan), plan)
        y_TD = self.combine(out_RD, self.zc_terms(expert_x_TD, plan), plan)
        return EPOutput(y_TD.view_as(x), logits_TN, balance, plan)


def replicated_parameters(ep: ExpertParallelMoE) -> list[nn.Parameter]:
    """Parameters every rank holds a copy of (router, constant experts): data-parallel, not expert-parallel."""
    return [*ep.router.parameters(), *ep.zc.parameters()]


def allreduce_replicated_grads(ep: ExpertParallelMoE) -> None:
    """Sum the replicated parameters' gradients over ranks, so each equals the gradient of the loss summed over
    all ranks' tokens (what the single-process layer gives). Sharded FFN gradients are already complete."""
    for p in replicated_parameters(ep):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=ep.group)
