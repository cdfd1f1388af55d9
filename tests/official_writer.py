"""Writes a moepp model in the official MoE++ checkpoint layout (config.json + weights in every layout the
loader claims to read), for the tests of the loader and of routing-stats on official checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from moepp import ModelConfig, MoEDecoderLM

# Official checkpoint writer (the inverse of the loader's renaming, written independently from design.md §2) ---
ROUTER_NAMES = {"linear": {"wg.weight": "wg.weight"},
                "mlp": {"wg.0.weight": "wg.0.weight", "wg.2.weight": "wg.2.weight"}}


def official_state(model: MoEDecoderLM) -> dict[str, torch.Tensor]:
    cfg, ours = model.cfg, model.state_dict()
    m = cfg.moe
    out = {"model.embed_tokens.weight": ours["embed.weight"], "model.norm.weight": ours["norm.weight"]}
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = ours[src + "attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = ours[src + "mlp_norm.weight"]
        for p in "qkvo":
            out[dst + f"self_attn.{p}_proj.weight"] = ours[src + f"attn.{p}_proj.weight"]
        for name in ROUTER_NAMES[m.router]:
            out[dst + "mlp.moe.gate." + name] = ours[src + "moe.router." + name]
        out[dst + "mlp.moe.gate.gate_map.weight"] = ours[src + "moe.router.gate_map.weight"]
        experts = dst + "mlp.moe.experts.experts."
        for j in range(m.n_ffn):
            out[experts + f"{j}.up_proj.weight"] = ours[src + "moe.ffn.w_up"][j]
            out[experts + f"{j}.down_proj.weight"] = ours[src + "moe.ffn.w_down"][j]
        for c, j in enumerate(m.type_range("constant")):
            out[experts + f"{j}.constant"] = ours[src + "moe.zc.const_v"][c]
            out[experts + f"{j}.wg.weight"] = ours[src + "moe.zc.const_wc"][c]
    out["lm_head.weight"] = ours["lm_head.weight"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def official_config(cfg: ModelConfig, moe_2layer_gate: bool, dtype: torch.dtype) -> dict:
    m = cfg.moe
    return {
        "architectures": ["MoeForCausalLM"], "model_type": "MoE++", "torch_dtype": str(dtype).removeprefix("torch."),
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": m.d_expert,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": False,
        "num_experts": [m.n_experts], "moe_expert_interval": cfg.moe_interval, "moe_2layer_gate": moe_2layer_gate,
        "moe_use_logits_norm": m.logits_norm, "moe_gate_norm_std": m.logits_norm_std,
        "moe_use_mixtral_gating": m.gate_mode == "mixtral", "moe_feature_no_mul_topk": not m.scale_input_by_k,
    }


def write_official(model: MoEDecoderLM, path: Path, layout: str, dtype: torch.dtype, moe_2layer_gate: bool,
                   extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """layout: safetensors, safetensors-sharded, bin or bin-sharded. Every tensor is stored in dtype."""
    path.mkdir(parents=True)
    state = {k: v.to(dtype) for k, v in {**official_state(model), **(extra_tensors or {})}.items()}
    (path / "config.json").write_text(json.dumps(official_config(model.cfg, moe_2layer_gate, dtype), indent=2))
    ext = "safetensors" if layout.startswith("safetensors") else "bin"

    def save(tensors, name):
        if ext == "safetensors":
            save_file(tensors, str(path / name), metadata={"format": "pt"})
        else:
            torch.save(tensors, path / name)

    if not layout.endswith("sharded"):
        save(state, "model.safetensors" if ext == "safetensors" else "pytorch_model.bin")
        return path
    names = list(state)
    shards = [names[0::3], names[1::3], names[2::3]]
    stem = "model" if ext == "safetensors" else "pytorch_model"
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        fname = f"{stem}-{n:05d}-of-{len(shards):05d}.{ext}"
        save({k: state[k] for k in shard}, fname)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (path / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return path
