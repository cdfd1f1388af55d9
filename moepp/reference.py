"""A slow, obvious MoE++ layer used only by the tests to check the fast one.

Written from the definitions, sharing nothing with router.py or dispatch.py beyond the config:
every expert runs densely on every token, top-k is K rounds of argmax, capacity is a Python loop over slots,
and the combine is a dense [T, N] weight matrix. It reads the layer's own parameter tensors (no copies), so
torch.autograd.grad through it gives gradients for the same tensors the fast layer trains.

The router runs in float32 like the real one (routing decisions must come out identical); the experts and the
combine run in `compute_dtype` (float64 by default, so the reference is the more accurate side of a
comparison). Outputs are returned in `compute_dtype`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import MoEConfig


@dataclass
class ReferenceParams:
    """The tensors of one MoE layer, by their meaning. Build with `from_layer` to share a layer's parameters."""

    router_w_ND: torch.Tensor | None  # linear router W [N, D]
    router_w1_MD: torch.Tensor | None  # two-layer router W1 [M, D], M = router_mult * N
    router_w2_NM: torch.Tensor | None  # two-layer router W2 [N, M]
    gate_map_NN: torch.Tensor  # gating-residual map W_g [N, N]
    w_up_E2HD: torch.Tensor  # per FFN expert: rows 0..H-1 are W_gate (through silu), rows H..2H-1 are W_up
    w_down_EDH: torch.Tensor
    const_v_CD: torch.Tensor
    const_wc_C2D: torch.Tensor

    @classmethod
    def from_layer(cls, layer) -> "ReferenceParams":
        wg = layer.router.wg
        if layer.cfg.router == "linear":
            w, w1, w2 = wg.weight, None, None
        else:
            w, w1, w2 = None, wg[0].weight, wg[2].weight
        return cls(w, w1, w2, layer.router.gate_map.weight, layer.ffn.w_up, layer.ffn.w_down,
                   layer.zc.const_v, layer.zc.const_wc)


@dataclass
class ReferenceOutput:
    y_TD: torch.Tensor  # compute_dtype
    logits_TN: torch.Tensor  # float32, gating residual included, before logits normalisation
    probs_TN: torch.Tensor  # float32 softmax over all experts of the (normalised) logits
    topk_ids_TK: torch.Tensor  # long, k = 0 is the strongest choice
    gates_TK: torch.Tensor  # float32
    dropped_TK: torch.Tensor  # bool
    expert_counts_N: torch.Tensor  # long: kept slots per expert


# Router -----------------------------------------------------------------------------------------------------
def router_logits(x_TD: torch.Tensor, p: ReferenceParams, cfg: MoEConfig,
                  prev_logits_TN: torch.Tensor | None = None) -> torch.Tensor:
    """G(x) = W x (or W2 tanh(W1 x)), plus W_g G_prev when the gating residual applies. float32."""
    x = x_TD.float()
    if cfg.router == "linear":
        logits = x @ p.router_w_ND.float().T
    else:
        logits = torch.tanh(x @ p.router_w1_MD.float().T) @ p.router_w2_NM.float().T
    if cfg.gating_residual and prev_logits_TN is not None:
        logits = logits + prev_logits_TN.float() @ p.gate_map_NN.float().T
    return logits


def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _normalised(logits_TN: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    if not cfg.logits_norm:
        return logits_TN
    n = logits_TN.shape[1]
    mean = logits_TN.sum(dim=1, keepdim=True) / n
    std = torch.sqrt(((logits_TN - mean) ** 2).sum(dim=1, keepdim=True) / (n - 1))  # unbiased
    return logits_TN / std * cfg.logits_norm_std


def _top_k(scores_TN: torch.Tensor, k: int) -> torch.Tensor:
    """K rounds of argmax, masking each winner: ids in descending order of score."""
    scores = scores_TN.detach().clone()
    picks = []
    for _ in range(k):
        best_T = scores.argmax(dim=1)
        picks.append(best_T)
        scores[torch.arange(scores.shape[0]), best_T] = -math.inf
    return torch.stack(picks, dim=1)


def route(logits_TN: torch.Tensor, cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(topk_ids_TK, gates_TK, probs_TN) for the config's gate mode."""
    z_TN = _normalised(logits_TN, cfg)
    probs_TN = _softmax(z_TN)
    ids_TK = _top_k(z_TN, cfg.top_k)  # softmax is monotone: the same winners for logits and probabilities
    if cfg.gate_mode == "mixtral":
        return ids_TK, _softmax(z_TN.gather(1, ids_TK)), probs_TN
    gates_TK = probs_TN.gather(1, ids_TK)
    if cfg.gate_mode == "official":
        is_zero_TK = torch.zeros_like(ids_TK, dtype=torch.bool)
        for e in range(cfg.n_experts):
            if cfg.expert_types[e] == "zero":
                is_zero_TK |= ids_TK == e
        gates_TK = torch.where(is_zero_TK, torch.zeros_like(gates_TK), gates_TK)
        total_T1 = gates_TK.sum(dim=1, keepdim=True)
        gates_TK = gates_TK / torch.where(total_T1 > 0, total_T1, torch.ones_like(total_T1))
    return ids_TK, gates_TK, probs_TN


# Capacity ---------------------------------------------------------------------------------------------------
def capacity_dropped(topk_ids_TK: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """Every token's first choice is served before any second choice, earlier tokens first; a slot is
    dropped when its expert already holds its capacity (C_FFN or C_ZC). All False when dropless."""
    T, K = topk_ids_TK.shape
    dropped = [[False] * K for _ in range(T)]
    caps = cfg.capacities(T)
    if caps is not None:
        ids = topk_ids_TK.tolist()
        used = [0] * cfg.n_experts
        for k in range(K):
            for t in range(T):
                e = ids[t][k]
                cap = caps[0] if cfg.expert_types[e] == "ffn" else caps[1]
                if used[e] < cap:
                    used[e] += 1
                else:
                    dropped[t][k] = True
    return torch.tensor(dropped, dtype=torch.bool, device=topk_ids_TK.device).view(T, K)


# Experts and combine ----------------------------------------------------------------------------------------
def _silu(a: torch.Tensor) -> torch.Tensor:
    return a * torch.sigmoid(a)


def expert_outputs(x_TD: torch.Tensor, p: ReferenceParams, cfg: MoEConfig, dtype: torch.dtype) -> list[torch.Tensor]:
    """E_i(x) for every expert i on every token, each [T, D] in dtype."""
    x = x_TD.to(dtype)
    H = cfg.d_expert
    outs = []
    ffn_i = const_i = 0
    for kind in cfg.expert_types:
        if kind == "ffn":
            w_up = p.w_up_E2HD[ffn_i].to(dtype)
            gate_TH = x @ w_up[:H].T
            lin_TH = x @ w_up[H:].T
            outs.append((_silu(gate_TH) * lin_TH) @ p.w_down_EDH[ffn_i].to(dtype).T)
            ffn_i += 1
        elif kind == "constant":
            a_T2 = _softmax(x @ p.const_wc_C2D[const_i].to(dtype).T)
            outs.append(a_T2[:, 0:1] * x + a_T2[:, 1:2] * p.const_v_CD[const_i].to(dtype))
            const_i += 1
        elif kind == "copy":
            outs.append(x)
        else:  # zero
            outs.append(torch.zeros_like(x))
    return outs


def combine(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, gates_TK: torch.Tensor, p: ReferenceParams,
            cfg: MoEConfig, dropped_TK: torch.Tensor | None = None,
            compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """y[t] = sum over kept slots (t, k) of gates[t, k] * E_{ids[t, k]}(x[t]); x is the expert input as given
    (apply any K-times scaling before calling)."""
    T, K = topk_ids_TK.shape
    N = cfg.n_experts
    keep_TK = torch.ones_like(topk_ids_TK, dtype=torch.bool) if dropped_TK is None else ~dropped_TK
    weight_TN = torch.zeros(T, N, dtype=compute_dtype, device=x_TD.device)
    for k in range(K):
        onehot_TN = torch.nn.functional.one_hot(topk_ids_TK[:, k], N).to(compute_dtype)
        w_T = gates_TK[:, k].to(compute_dtype) * keep_TK[:, k].to(compute_dtype)
        weight_TN = weight_TN + onehot_TN * w_T.unsqueeze(1)
    y_TD = torch.zeros(T, x_TD.shape[1], dtype=compute_dtype, device=x_TD.device)
    for i, out_TD in enumerate(expert_outputs(x_TD, p, cfg, compute_dtype)):
        y_TD = y_TD + weight_TN[:, i : i + 1] * out_TD
    return y_TD


def moe_forward(layer_or_params, x: torch.Tensor, prev_logits_TN: torch.Tensor | None = None, *,
                cfg: MoEConfig | None = None, compute_dtype: torch.dtype = torch.float64) -> ReferenceOutput:
    """The whole MoE(++) layer: route, drop over capacity, combine. x: [..., D]; y_TD comes back flat [T, D].

    layer_or_params: a moepp.layer.MoELayer (its config is used unless cfg is given) or ReferenceParams with cfg.
    """
    if isinstance(layer_or_params, ReferenceParams):
        if cfg is None:
            raise ValueError("cfg is required with ReferenceParams")
        p = layer_or_params
    else:
        p = ReferenceParams.from_layer(layer_or_params)
        cfg = cfg or layer_or_params.cfg
    x_TD = x.reshape(-1, cfg.d_model)
    logits_TN = router_logits(x_TD, p, cfg, prev_logits_TN)
    ids_TK, gates_TK, probs_TN = route(logits_TN, cfg)
    dropped_TK = capacity_dropped(ids_TK, cfg)
    expert_x_TD = x_TD * cfg.top_k if cfg.scale_input_by_k else x_TD
    y_TD = combine(expert_x_TD, ids_TK, gates_TK, p, cfg, dropped_TK, compute_dtype)
    counts_N = torch.zeros(cfg.n_experts, dtype=torch.long)
    for e, drop in zip(ids_TK.reshape(-1).tolist(), dropped_TK.reshape(-1).tolist()):
        counts_N[e] += 0 if drop else 1
    return ReferenceOutput(y_TD, logits_TN, probs_TN, ids_TK, gates_TK, dropped_TK, counts_N)


# Losses -----------------------------------------------------------------------------------------------------
def balance_loss(probs_TN: torch.Tensor, topk_ids_TK: torch.Tensor, cfg: MoEConfig,
                 valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """L_b = sum_i eta_i f_i P_i: eta_i 1 for FFN and tau for ZC experts, f_i the chosen slots of expert i per
    (real) token, P_i the mean router probability of expert i over (real) tokens. Loops over tokens."""
    T, K = topk_ids_TK.shape
    valid = [True] * T if valid_T is None else [bool(v) for v in valid_T.tolist()]
    n_tokens = max(sum(valid), 1)
    ids = topk_ids_TK.tolist()
    loss = probs_TN.new_zeros(())
    for i, kind in enumerate(cfg.expert_types):
        chosen = sum(1 for t in range(T) if valid[t] for k in range(K) if ids[t][k] == i)
        P_i = sum(probs_TN[t, i] for t in range(T) if valid[t]) / n_tokens
        eta = 1.0 if kind == "ffn" else cfg.tau
        loss = loss + eta * (chosen / n_tokens) * P_i
    return loss


__all__ = ["ReferenceOutput", "ReferenceParams", "balance_loss", "capacity_dropped", "combine", "expert_outputs",
           "moe_forward", "route", "router_logits"]
