"""The MoE(++) layer: route, dispatch FFN slots, add the zero-computation terms, combine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .config import MoEConfig
from .dispatch import dispatch_combine
from .experts import FFNExperts, ZeroComputationExperts
from .losses import heterogeneous_balance_loss, router_z_loss
from .router import Gating, Router, gate


@dataclass
class RoutingRecord:
    """What one MoE layer decided for every token, recorded during the forward (no second pass)."""

    topk_ids: torch.Tensor  # [T, K] long: chosen experts per token slot
    gates: torch.Tensor  # [T, K] float32: their gate values
    logits: torch.Tensor  # [T, N] float32: router logits (gating residual included)
    dropped: torch.Tensor  # [T, K] bool: slots dropped by capacity (all False when dropless)
    expert_counts: torch.Tensor  # [N] long: kept slots per expert


@dataclass
class MoEOutput:
    y: torch.Tensor  # same shape as the input
    logits_TN: torch.Tensor  # passed to the next MoE layer as its gating residual
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    n_dropped: torch.Tensor  # scalar long
    record: RoutingRecord | None


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig, init_std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg, init_std)
        self.ffn = FFNExperts(cfg, init_std)
        self.zc = ZeroComputationExperts(cfg, init_std)

    def forward(
        self,
        x: torch.Tensor,
        prev_logits_TN: torch.Tensor | None = None,
        *,
        return_record: bool = False,
        valid_T: torch.Tensor | None = None,
        backend: str | None = None,
        forced_routing: tuple[torch.Tensor, torch.Tensor] | None = None,
        marker: Callable[[str], None] | None = None,
    ) -> MoEOutput:
        """x: [..., D]. prev_logits_TN: the previous MoE layer's logits (None for the first, or to ablate).
        valid_T: bool mask of real (non-padding) tokens, used only by the losses; padding is still routed.
        forced_routing: (topk_ids_TK, gates_TK) replacing the router's choice after the router has run, so
        benchmarks pay the router's cost but control the load.
        marker: called with a stage name as each stage ends (router, sort, gather, ...), for timing."""
        cfg = self.cfg
        x_TD = x.reshape(-1, cfg.d_model)
        use_residual = cfg.gating_residual and prev_logits_TN is not None
        logits_TN = self.router(x_TD, prev_logits_TN if use_residual else None)
        g = gate(logits_TN, cfg)
        if forced_routing is not None:
            g = Gating(forced_routing[0], forced_routing[1], g.probs_TN)
        if marker is not None:
            marker("router")
        expert_x_TD = x_TD * cfg.top_k if cfg.scale_input_by_k else x_TD
        y_TD, plan = dispatch_combine(expert_x_TD, g.topk_ids_TK, g.gates_TK, self.ffn, self.zc, cfg, backend,
                                      marker)

        balance = heterogeneous_balance_loss(g.probs_TN, g.topk_ids_TK, cfg, valid_T)
        zl = router_z_loss(logits_TN, valid_T) if cfg.zloss_coef > 0 else logits_TN.new_zeros(())
        n_dropped = plan.counts_N1[-1]
        record = None
        if return_record:
            dropped = plan.dropped_TK if plan.dropped_TK is not None else torch.zeros_like(g.topk_ids_TK, dtype=torch.bool)
            record = RoutingRecord(
                topk_ids=g.topk_ids_TK.detach(),
                gates=g.gates_TK.detach(),
                logits=logits_TN.detach(),
                dropped=dropped,
                expert_counts=plan.counts_N1[:-1],
            )
        return MoEOutput(y_TD.view_as(x), logits_TN, balance, zl, n_dropped, record)

    def aux_loss(self, out: MoEOutput) -> torch.Tensor:
        return self.cfg.balance_coef * out.balance_loss + self.cfg.zloss_coef * out.z_loss
