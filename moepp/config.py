"""Frozen, validated configuration for an MoE(++) layer and a decoder LM, with the paper's presets.

Expert index order inside a layer is fixed and matches the official checkpoints:
FFN experts first, then constant, copy and zero experts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

EXPERT_TYPES = ("ffn", "constant", "copy", "zero")
GATE_MODES = ("paper", "official", "mixtral")
ROUTER_KINDS = ("linear", "mlp")
CAPACITY_BASES = ("slots", "tokens")
BACKENDS = ("sorted", "loop", "padded", "grouped_mm")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class MoEConfig:
    """One MoE(++) layer. A vanilla MoE is the same layer with zero ZC experts (see `vanilla()`)."""

    d_model: int
    d_expert: int  # H: hidden width of each SwiGLU FFN expert
    n_ffn: int
    n_zero: int = 1
    n_copy: int = 1
    n_constant: int = 2
    top_k: int = 2
    tau: float = 0.75  # weight of ZC experts in the heterogeneous balance loss
    router: str = "linear"  # "linear": W x; "mlp": W2 tanh(W1 x), W1 of width router_mult * N
    router_mult: int = 8
    gate_mode: str = "paper"
    logits_norm: bool = False  # divide logits by their std over experts before the softmax
    logits_norm_std: float = 1.0
    scale_input_by_k: bool = False  # official code default: expert input multiplied by K after routing
    gating_residual: bool = True
    capacity_factor: float | None = None  # None: dropless
    capacity_base: str = "slots"  # capacities computed over K*T slots ("slots") or T tokens ("tokens")
    balance_coef: float = 0.01  # beta
    zloss_coef: float = 0.0
    backend: str = "sorted"

    def __post_init__(self) -> None:
        for name in ("d_model", "d_expert", "top_k", "router_mult"):
            _require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name in ("n_ffn", "n_zero", "n_copy", "n_constant"):
            value = getattr(self, name)
            _require(value >= 0, f"{name} must be >= 0, got {value}")
        _require(self.n_experts > 0, "the layer needs at least one expert")
        _require(
            self.top_k <= self.n_experts,
            f"top_k={self.top_k} is larger than the number of experts ({self.n_experts})",
        )
        _require(self.tau > 0 and math.isfinite(self.tau), f"tau must be > 0, got {self.tau}")
        _require(self.gate_mode in GATE_MODES, f"gate_mode must be one of {GATE_MODES}, got {self.gate_mode!r}")
        _require(self.router in ROUTER_KINDS, f"router must be one of {ROUTER_KINDS}, got {self.router!r}")
        _require(
            self.capacity_base in CAPACITY_BASES,
            f"capacity_base must be one of {CAPACITY_BASES}, got {self.capacity_base!r}",
        )
        _require(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        _require(
            self.capacity_factor is None or self.capacity_factor > 0,
            f"capacity_factor must be > 0 (or None for dropless), got {self.capacity_factor}",
        )
        _require(self.logits_norm_std > 0, f"logits_norm_std must be > 0, got {self.logits_norm_std}")
        _require(self.balance_coef >= 0 and self.zloss_coef >= 0, "loss coefficients must be >= 0")

    # Expert layout -----------------------------------------------------------------------------------------
    @property
    def n_zc(self) -> int:
        return self.n_zero + self.n_copy + self.n_constant

    @property
    def n_experts(self) -> int:
        return self.n_ffn + self.n_zc

    @property
    def expert_types(self) -> tuple[str, ...]:
        return (
            ("ffn",) * self.n_ffn
            + ("constant",) * self.n_constant
            + ("copy",) * self.n_copy
            + ("zero",) * self.n_zero
        )

    def type_range(self, kind: str) -> range:
        """Expert indices of one kind, e.g. type_range("copy")."""
        start = 0
        for name, count in zip(EXPERT_TYPES, (self.n_ffn, self.n_constant, self.n_copy, self.n_zero)):
            if name == kind:
                return range(start, start + count)
            start += count
        raise ValueError(f"unknown expert kind {kind!r}; expected one of {EXPERT_TYPES}")

    # Balance and capacity ----------------------------------------------------------------------------------
    @property
    def rho(self) -> float:
        """Share of routing slots on FFN experts at the balance the heterogeneous loss drives to."""
        return self.tau * self.n_ffn / (self.tau * self.n_ffn + self.n_zc)

    def capacities(self, n_tokens: int) -> tuple[int, int] | None:
        """(C_FFN, C_ZC) slots per expert for n_tokens tokens, or None when dropless."""
        if self.capacity_factor is None:
            return None
        base = n_tokens * (self.top_k if self.capacity_base == "slots" else 1)
        denom = self.tau * self.n_ffn + self.n_zc
        c_ffn = math.ceil(self.capacity_factor * self.tau * base / denom)
        c_zc = math.ceil(self.capacity_factor * base / denom)
        return c_ffn, c_zc

    def vanilla(self) -> "MoEConfig":
        """The vanilla MoE with the same FFN experts and no zero-computation experts."""
        return dataclasses.replace(self, n_zero=0, n_copy=0, n_constant=0)

    def replace(self, **changes) -> "MoEConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder whose MLPs are MoE(++) layers (every `moe_interval`-th layer)."""

    vocab_size: int
    n_layers: int
    n_heads: int
    moe: MoEConfig
    n_kv_heads: int | None = None  # None: same as n_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    moe_interval: int = 1  # layer i is MoE when (i + 1) % moe_interval == 0; others use a dense SwiGLU
    d_dense: int | None = None  # hidden width of dense layers; None: moe.d_expert
    tie_embeddings: bool = False
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "n_heads", "max_seq_len", "moe_interval"):
            _require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        _require(
            self.d_model % self.n_heads == 0,
            f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}",
        )
        _require((self.d_model // self.n_heads) % 2 == 0, "head dimension must be even for rotary embeddings")
        _require(
            self.kv_heads > 0 and self.n_heads % self.kv_heads == 0,
            f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}",
        )
        _require(self.rms_norm_eps > 0, "rms_norm_eps must be > 0")

    @property
    def d_model(self) -> int:
        return self.moe.d_model

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, index: int) -> bool:
        return (index + 1) % self.moe_interval == 0

    def vanilla(self) -> "ModelConfig":
        return dataclasses.replace(self, moe=self.moe.vanilla())

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        _require(not unknown, f"unknown model config keys: {sorted(unknown)}")
        moe = data.pop("moe")
        moe_known = {f.name for f in dataclasses.fields(MoEConfig)}
        moe_unknown = set(moe) - moe_known
        _require(not moe_unknown, f"unknown MoE config keys: {sorted(moe_unknown)}")
        return cls(moe=MoEConfig(**moe), **data)


# Presets: the paper's Table 2 sizes (top-2, vocabulary 65,536) and a tiny one for tests ---------------------
@dataclass(frozen=True)
class _Shape:
    n_layers: int
    d_model: int
    d_expert: int
    n_heads: int
    n_ffn: int
    n_zero: int
    n_copy: int
    n_constant: int
    vocab_size: int = 65536


PRESET_SHAPES: dict[str, _Shape] = {
    "tiny": _Shape(n_layers=2, d_model=64, d_expert=96, n_heads=4, n_ffn=4, n_zero=1, n_copy=1, n_constant=2,
                   vocab_size=512),
    "0.6b": _Shape(12, 768, 2048, 12, 8, 1, 1, 2),
    "1b": _Shape(12, 768, 2048, 12, 16, 1, 1, 2),
    "2b": _Shape(12, 768, 2048, 12, 32, 1, 1, 6),
    "7b": _Shape(24, 1536, 4096, 16, 16, 1, 1, 2),
}
PRESETS = tuple(PRESET_SHAPES)


def _shape(name: str) -> _Shape:
    key = name.lower()
    if key not in PRESET_SHAPES:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESET_SHAPES[key]


def layer_preset(name: str, *, vanilla: bool = False, **overrides) -> MoEConfig:
    """The MoE++ layer of a preset (or its vanilla counterpart); keyword overrides go to MoEConfig."""
    s = _shape(name)
    cfg = MoEConfig(d_model=s.d_model, d_expert=s.d_expert, n_ffn=s.n_ffn, n_zero=s.n_zero, n_copy=s.n_copy,
                    n_constant=s.n_constant, **overrides)
    return cfg.vanilla() if vanilla else cfg


def model_preset(name: str, *, vanilla: bool = False, **moe_overrides) -> ModelConfig:
    """The decoder LM of a preset (or its vanilla counterpart)."""
    s = _shape(name)
    return ModelConfig(vocab_size=s.vocab_size, n_layers=s.n_layers, n_heads=s.n_heads,
                       moe=layer_preset(name, vanilla=vanilla, **moe_overrides))


__all__ = [
    "BACKENDS", "CAPACITY_BASES", "EXPERT_TYPES", "GATE_MODES", "ROUTER_KINDS", "PRESETS", "MoEConfig",
    "ModelConfig", "layer_preset", "model_preset",
]
