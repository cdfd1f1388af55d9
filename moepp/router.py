"""Router (float32), gating residual, and the three gate modes (paper, official, mixtral)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import MoEConfig


class Router(nn.Module):
    """logits = wg(x) [+ gate_map(previous MoE layer's logits)]; parameters stay float32 under .to(dtype)."""

    def __init__(self, cfg: MoEConfig, init_std: float = 0.02):
        super().__init__()
        N, D = cfg.n_experts, cfg.d_model
        if cfg.router == "linear":
            self.wg = nn.Linear(D, N, bias=False)
        else:
            self.wg = nn.Sequential(
                nn.Linear(D, cfg.router_mult * N, bias=False), nn.Tanh(), nn.Linear(cfg.router_mult * N, N, bias=False)
            )
        self.gate_map = nn.Linear(N, N, bias=False)  # the N x N gating-residual map
        for p in self.parameters():
            nn.init.normal_(p, std=init_std)

    def _apply(self, fn, recurse=True):
        # The router runs in float32 whatever the model dtype: routing decisions must not depend on bf16 rounding.
        super()._apply(fn, recurse)
        for p in self.parameters():
            if p.dtype != torch.float32:
                p.data = p.data.float()
        return self

    def forward(self, x_TD: torch.Tensor, prev_logits_TN: torch.Tensor | None = None) -> torch.Tensor:
        if x_TD.dtype != torch.float32 and isinstance(self.wg, nn.Linear) and not torch.is_grad_enabled():
            logits_TN = _linear_float32_chunked(x_TD, self.wg.weight)
        else:
            logits_TN = self.wg(x_TD.float())
        if prev_logits_TN is not None:
            logits_TN = logits_TN + self.gate_map(prev_logits_TN.float())
        return logits_TN


def _linear_float32_chunked(x_TD: torch.Tensor, w_ND: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """x @ w.T in float32 for a low-precision x, converting a block of rows at a time: the float32 copy of a
    block stays in cache instead of a [T, D] float32 copy going through memory (the router has only N
    columns, so it is bound by reading x). Each output row depends only on its input row, as unchunked."""
    out_TN = torch.empty(x_TD.shape[0], w_ND.shape[0], device=x_TD.device, dtype=torch.float32)
    for i in range(0, x_TD.shape[0], rows):
        torch.mm(x_TD[i : i + rows].float(), w_ND.t(), out=out_TN[i : i + rows])
    return out_TN


@dataclass
class Gating:
    topk_ids_TK: torch.Tensor  # long
    gates_TK: torch.Tensor  # float32, the weight of each chosen expert
    probs_TN: torch.Tensor  # float32, softmax over all experts (for the balance loss)


def normalise_logits(logits_TN: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    if not cfg.logits_norm:
        return logits_TN
    std_T1 = logits_TN.std(dim=1, keepdim=True)  # unbiased, over experts
    return logits_TN / (std_T1 / cfg.logits_norm_std)


def gate(logits_TN: torch.Tensor, cfg: MoEConfig) -> Gating:
    """Choose K experts per token and their gate values.

    paper:    softmax over all N, keep the K largest, no renormalisation.
    official: softmax over all N, top K, zero experts' gates set to 0, the K gates renormalised to sum to 1.
    mixtral:  top K logits, softmax over those K only.
    """
    K = cfg.top_k
    z_TN = normalise_logits(logits_TN, cfg)
    probs_TN = torch.softmax(z_TN, dim=1)
    if cfg.gate_mode == "mixtral":
        top_logits_TK, ids_TK = torch.topk(z_TN, k=K, dim=1)
        return Gating(ids_TK, torch.softmax(top_logits_TK, dim=1), probs_TN)
    gates_TK, ids_TK = torch.topk(probs_TN, k=K, dim=1)
    if cfg.gate_mode == "official":
        zero = cfg.type_range("zero")
        is_zero_TK = (ids_TK >= zero.start) & (ids_TK < zero.stop)
        gates_TK = gates_TK.masked_fill(is_zero_TK, 0.0)
        # Divide by the plain sum as the official code does (a clamp would bend tiny sums); a token whose K
        # choices are all zero experts (possible only with n_zero >= K) keeps zero gates instead of NaN.
        total_T1 = gates_TK.sum(dim=1, keepdim=True)
        gates_TK = gates_TK / torch.where(total_T1 > 0, total_T1, torch.ones_like(total_T1))
    return Gating(ids_TK, gates_TK, probs_TN)
