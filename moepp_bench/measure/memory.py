"""Memory estimates made before allocating anything, so a run too big for the machine is refused up front."""

from __future__ import annotations

from pathlib import Path

import torch

from moepp.config import ModelConfig, MoEConfig

from ..errors import BenchError
from .params import moe_layer_params

PROCESS_OVERHEAD_BYTES = 512 << 20  # the interpreter, torch's own buffers, allocator slack
INDEX_BYTES = 8  # int64 indices


def dtype_bytes(dtype: torch.dtype | str) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


def estimate_layer_memory(cfg: MoEConfig, n_tokens: int, dtype: torch.dtype | str, backward: bool) -> int:
    """Upper-bound bytes to run one MoE(++) layer on n_tokens tokens with generated routing (sorted backend).

    Worst case for the routing: every one of the K*T slots goes to an FFN expert. Counted: parameters (router
    in float32), routing generation scratch, router activations, the dispatch plan, gathered rows, the
    fused up-projection [R, 2H], the SwiGLU output [R, H] and its intermediates, expert outputs, gated rows and
    the layer output. With backward: parameter gradients, and the gradient of every kept activation (autograd
    holds the forward activations until the backward has used them, so the peak is about twice the forward).
    """
    T, K, N, D, H = n_tokens, cfg.top_k, cfg.n_experts, cfg.d_model, cfg.d_expert
    b = dtype_bytes(dtype)
    counts = moe_layer_params(cfg)
    router_params = counts["router"] + counts["gate_map"]
    params = router_params * 4 + (counts["ffn_experts"] + counts["constant_experts"]) * b
    S = T * K
    routing = estimate_routing_memory(cfg, n_tokens) - PROCESS_OVERHEAD_BYTES
    router_act = T * D * 4 + 3 * T * N * 4  # float32 copy of x, logits, previous logits, residual sum
    plan = S * INDEX_BYTES * 5  # sort keys, order, token and expert of each slot, argsort scratch
    rows = S * (2 * D * b + 2 * H * b + 2 * H * b + 2 * D * b)  # gathered x, fused up, silu*up (+silu), out, gated
    layer_io = 2 * T * D * b  # input and output
    activations = routing + router_act + plan + rows + layer_io
    if backward:
        params += router_params * 4 + (counts["ffn_experts"] + counts["constant_experts"]) * b
        activations *= 2
    return int(params + activations + PROCESS_OVERHEAD_BYTES)


def estimate_routing_memory(cfg: MoEConfig, n_tokens: int) -> int:
    """Bytes to generate routing for n_tokens: the [T, N] random draws and their top-k, ids and gates."""
    return int(n_tokens * cfg.n_experts * 4 * 2 + n_tokens * cfg.top_k * (INDEX_BYTES + 4) * 2
               + PROCESS_OVERHEAD_BYTES)


def estimate_checkpoint_memory(weight_bytes_on_disk: int, stored_dtype_bytes: int | None,
                               cfg: ModelConfig, n_tokens: int, dtype: torch.dtype | str, backward: bool) -> int:
    """Bytes to load a checkpoint, run it on n_tokens tokens recording the routing, and run one MoE layer
    with backward: the loaded state and the model (two copies while loading, converted to dtype), the
    float32 logits [T, vocab], hidden states, the attention scores of one batch, the recorded routing of
    every layer, and one layer's run (estimate_layer_memory)."""
    b = dtype_bytes(dtype)
    T, D, m = n_tokens, cfg.d_model, cfg.moe
    weights = weight_bytes_on_disk * 2 * max(1.0, b / (stored_dtype_bytes or b))
    seq = min(T, cfg.max_seq_len)
    batch = -(-T // seq)
    forward = batch * seq * (cfg.vocab_size * 4 * 2 + D * b * 12) + batch * cfg.n_heads * seq * seq * 4 * 2
    records = cfg.n_layers * batch * seq * (m.n_experts * 4 + m.top_k * (INDEX_BYTES + 4 + 1))
    return int(weights + forward + records + estimate_layer_memory(m, T, dtype, backward))


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def require_memory(estimate_bytes: int, what: str, fix: str = "use fewer --tokens or a smaller --preset") -> None:
    """Raise BenchError when the estimate exceeds MemAvailable (no check where that cannot be read)."""
    available = available_memory_bytes()
    if available is not None and estimate_bytes > available:
        raise BenchError(f"{what} needs an estimated {format_bytes(estimate_bytes)} of memory but only "
                         f"{format_bytes(available)} is available (MemAvailable); {fix}")
