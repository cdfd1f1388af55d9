"""Model sizes for `moepp-bench train`: small decoder LMs that train on two CPU cores.

A train preset fixes the architecture and vocabulary; tau, capacity and loss coefficients come from the
command line. The moepp presets (tiny, 0.6b, ...) are accepted too, with the vocabulary of the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from moepp.config import PRESETS, ModelConfig, MoEConfig, model_preset


@dataclass(frozen=True)
class TrainPreset:
    description: str
    vocab_size: int
    n_layers: int
    d_model: int
    n_heads: int
    d_expert: int
    n_ffn: int
    n_zero: int = 1
    n_copy: int = 1
    n_constant: int = 2


TRAIN_PRESETS: dict[str, TrainPreset] = {
    # The shipped checkpoints: 4.5M parameters, 9 MB in bfloat16, about 6k tokens/s on two cores.
    "lm-small": TrainPreset("4 layers, width 192, (8+4) experts of width 128, 4k BPE", vocab_size=4096,
                            n_layers=4, d_model=192, n_heads=6, d_expert=128, n_ffn=8),
    # For tests and smoke runs: seconds per hundred steps.
    "lm-tiny": TrainPreset("2 layers, width 64, (4+4) experts of width 64, 512 BPE", vocab_size=512,
                           n_layers=2, d_model=64, n_heads=4, d_expert=64, n_ffn=4),
}
ALL_PRESETS = tuple(TRAIN_PRESETS) + PRESETS


def preset_vocab_size(name: str) -> int:
    """The BPE size a preset trains its tokenizer with (moepp presets: 8192, their 65,536 is too many here)."""
    return TRAIN_PRESETS[name].vocab_size if name in TRAIN_PRESETS else 8192


def train_config(name: str, *, vocab_size: int, seq_len: int, tau: float, vanilla: bool = False,
                 capacity_factor: float | None = None, balance_coef: float = 0.01,
                 zloss_coef: float = 0.001) -> ModelConfig:
    """The ModelConfig to train; raises ValueError naming the problem."""
    moe_args = dict(tau=tau, capacity_factor=capacity_factor, balance_coef=balance_coef, zloss_coef=zloss_coef)
    if name in TRAIN_PRESETS:
        p = TRAIN_PRESETS[name]
        moe = MoEConfig(d_model=p.d_model, d_expert=p.d_expert, n_ffn=p.n_ffn, n_zero=p.n_zero, n_copy=p.n_copy,
                        n_constant=p.n_constant, **moe_args)
        cfg = ModelConfig(vocab_size=vocab_size, n_layers=p.n_layers, n_heads=p.n_heads, moe=moe,
                          max_seq_len=seq_len)
    elif name in PRESETS:
        cfg = model_preset(name, **moe_args).replace(vocab_size=vocab_size, max_seq_len=seq_len)
    else:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(ALL_PRESETS)}")
    return cfg.vanilla() if vanilla else cfg
