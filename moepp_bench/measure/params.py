"""Parameter counts of a model config, analytic (a 7B preset needs no allocation)."""

from __future__ import annotations

from moepp.config import ModelConfig, MoEConfig


def moe_layer_params(m: MoEConfig) -> dict[str, int]:
    N, D, H = m.n_experts, m.d_model, m.d_expert
    router = D * N if m.router == "linear" else D * m.router_mult * N + m.router_mult * N * N
    return {
        "router": router,
        "gate_map": N * N,
        "ffn_experts": m.n_ffn * 3 * D * H,
        "constant_experts": m.n_constant * 3 * D,  # v [D] and W_c [2, D]
    }


def model_params(cfg: ModelConfig) -> dict[str, int | float]:
    """Totals by component, and parameters activated per token at the balance tau drives to (K*rho FFN
    experts per token, the rest always on)."""
    D, m = cfg.d_model, cfg.moe
    attn = D * cfg.n_heads * cfg.head_dim * 2 + D * cfg.kv_heads * cfg.head_dim * 2
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    n_dense = cfg.n_layers - n_moe
    layer = moe_layer_params(m)
    dense_mlp = 3 * D * (cfg.d_dense or m.d_expert)
    counts = {
        "embedding": cfg.vocab_size * D,
        "lm_head": 0 if cfg.tie_embeddings else cfg.vocab_size * D,
        "attention": cfg.n_layers * attn,
        "norms": (2 * cfg.n_layers + 1) * D,
        "router": n_moe * (layer["router"] + layer["gate_map"]),
        "ffn_experts": n_moe * layer["ffn_experts"],
        "constant_experts": n_moe * layer["constant_experts"],
        "dense_mlp": n_dense * dense_mlp,
    }
    total = sum(counts.values())
    per_expert = 3 * D * m.d_expert
    ffn_per_token = m.top_k * m.rho * per_expert if m.n_ffn else 0.0
    # Every FFN slot of a vanilla MoE hits an FFN expert; MoE++ sends 1 - rho of the slots elsewhere.
    active = total - counts["ffn_experts"] - counts["embedding"] + n_moe * ffn_per_token + D
    counts.update({"total": total, "activated_per_token": active,
                   "activated_per_token_vanilla": active - n_moe * ffn_per_token + n_moe * m.top_k * per_expert})
    return counts
