"""Router losses, returned to the caller (no global state)."""

from __future__ import annotations

import torch

from .config import MoEConfig
from .dispatch import count_per_expert


def expert_weights(cfg: MoEConfig, device=None) -> torch.Tensor:
    """eta_i: 1 for FFN experts, tau for zero-computation experts."""
    eta_N = torch.full((cfg.n_experts,), float(cfg.tau), device=device)
    eta_N[: cfg.n_ffn] = 1.0
    return eta_N


def heterogeneous_balance_loss(probs_TN: torch.Tensor, topk_ids_TK: torch.Tensor, cfg: MoEConfig,
                               valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """L_b = sum_i eta_i f_i P_i (the paper's form).

    f_i: fraction of tokens that chose expert i (sums to K over experts; no gradient);
    P_i: mean router probability of expert i. Minimised when the FFN share of slots is rho(tau).
    valid_T masks padding tokens out of both means.
    """
    N = cfg.n_experts
    if valid_T is None:
        n_tokens = probs_TN.shape[0]
        counts_N = count_per_expert(topk_ids_TK, N)
        P_N = probs_TN.mean(0)
    else:
        w_T = valid_T.to(probs_TN.dtype)
        n_tokens = w_T.sum().clamp_min(1.0)
        counts_N = count_per_expert(topk_ids_TK, N, w_T.repeat_interleave(topk_ids_TK.shape[1]))
        P_N = (probs_TN * w_T.unsqueeze(1)).sum(0) / n_tokens
    f_N = counts_N.to(probs_TN.dtype) / n_tokens
    return (expert_weights(cfg, probs_TN.device) * f_N * P_N).sum()


def router_z_loss(logits_TN: torch.Tensor, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2: keeps router logits small."""
    z_T = torch.logsumexp(logits_TN.float(), dim=1).square()
    if valid_T is None:
        return z_T.mean()
    w_T = valid_T.to(z_T.dtype)
    return (z_T * w_T).sum() / w_T.sum().clamp_min(1.0)
