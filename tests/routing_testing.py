"""Helpers for the routing-stats tests: a tiny model whose routing is forced token by token, a word-level
tokenizer for it, a writer of the official MoE++ checkpoint layout, and an in-process CLI runner."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from moepp import ModelConfig, MoEConfig, MoEDecoderLM, save_pretrained

from moe_testing import OFFICIAL_FIXTURE_NAMES, official_fixture  # noqa: F401 (re-exported for the routing tests)
from official_writer import write_official

# Forced routing: expert layout 0, 1 FFN; 2, 3 constant; 4 copy; 5 zero (N = 6, K = 2).
# FORCED[layer][token] = (top-1 expert, top-2 expert).
FORCED = [
    {0: (0, 1), 1: (1, 5), 2: (4, 5), 3: (2, 0)},
    {0: (0, 5), 1: (4, 5), 2: (0, 1), 3: (1, 3)},
]
WORDS = ["a", "b", "c", "d"]  # token ids 0..3 of the word-level tokenizer
D_MODEL = 16
VOCAB = 8


def forced_logit(layer: int, token: int, expert: int) -> float:
    """Router logit of an expert for a token: the top-1 expert gets 2 + 0.5 * token (so scores vary by token),
    the top-2 expert 1.5 + 0.25 * layer, every other expert 0."""
    top1, top2 = FORCED[layer].get(token, (4, 5))
    if expert == top1:
        return 2.0 + 0.5 * token
    if expert == top2:
        return 1.5 + 0.25 * layer
    return 0.0


def forced_scores(layer: int, token: int, prev: list[float] | None = None, residual: float = 0.0) -> list[float]:
    """Softmax over all experts of the forced logits (plus residual * previous layer's logits)."""
    logits = [forced_logit(layer, token, e) for e in range(6)]
    if prev is not None:
        logits = [z + residual * p for z, p in zip(logits, prev)]
    peak = max(logits)
    exps = [math.exp(z - peak) for z in logits]
    return [v / sum(exps) for v in exps]


def forced_model(capacity_factor: float | None = None, residual: float = 0.0) -> MoEDecoderLM:
    """A 2-layer model whose router input is exactly sqrt(D) * one_hot(token) in every layer.

    Attention output, FFN down-projections and constant vectors are zero, so each layer only rescales the
    residual stream (copy adds x, constant adds a1 * x) and RMSNorm undoes the scale. The router weights then
    give the forced logits; gate_map = residual * identity in layer 1 (0 switches the gating residual off)."""
    cfg = ModelConfig(vocab_size=VOCAB, n_layers=2, n_heads=2, max_seq_len=64,
                      moe=MoEConfig(d_model=D_MODEL, d_expert=8, n_ffn=2, top_k=2, tau=0.75,
                                    capacity_factor=capacity_factor))
    model = MoEDecoderLM(cfg)
    with torch.no_grad():
        model.embed.weight.zero_()
        model.embed.weight[:, :VOCAB] = torch.eye(VOCAB)
        for i, layer in enumerate(model.layers):
            layer.attn.o_proj.weight.zero_()
            moe = layer.moe
            moe.ffn.w_down.zero_()
            moe.zc.const_v.zero_()
            w = torch.zeros(6, D_MODEL)
            for token in range(VOCAB):
                for e in range(6):
                    w[e, token] = forced_logit(i, token, e) / math.sqrt(D_MODEL)
            moe.router.wg.weight.copy_(w)
            moe.router.gate_map.weight.copy_(torch.eye(6) * (residual if i > 0 else 0.0))
    return model.eval()


def word_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(WORDS)} | {"[UNK]": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def save_forced(path: Path, **kwargs) -> Path:
    model = forced_model(**kwargs)
    tok = word_tokenizer(path.parent / f"{path.name}-tokenizer.json")
    return save_pretrained(model, path, extra_files={"tokenizer.json": tok})


# Official layout -------------------------------------------------------------------------------------------
def official_model(style: str, seed: int = 0) -> MoEDecoderLM:
    """A random MoE++ model with the official code's options: 'release' (linear router, logits normalisation)
    or 'defaults' (two-layer tanh router, expert input times K). Router weights are scaled up so top-2 choices
    have clear margins."""
    torch.manual_seed(seed)
    release = style == "release"
    moe = MoEConfig(d_model=32, d_expert=48, n_ffn=6, n_zero=1, n_copy=1, n_constant=2, top_k=2,
                    router="linear" if release else "mlp", gate_mode="official", logits_norm=release,
                    scale_input_by_k=not release)
    cfg = ModelConfig(vocab_size=96, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=128, moe=moe)
    model = MoEDecoderLM(cfg)
    with torch.no_grad():
        for layer in model.moe_layers:
            for name, p in layer.router.named_parameters():
                p.normal_(0.0, (0.5 if "gate_map" in name else 3.0) / p.shape[1] ** 0.5)
    return model.eval()


def write_official_routing(model: MoEDecoderLM, path: Path) -> Path:
    """A single-file safetensors official checkpoint whose config agrees with the model's router."""
    return write_official(model, path, "safetensors", torch.float32, moe_2layer_gate=model.cfg.moe.router == "mlp")


# CLI -------------------------------------------------------------------------------------------------------
def run_cli(args: list, capsys, monkeypatch) -> tuple[int, str, str]:
    """Run `moepp-bench routing-stats ARGS` in-process through the console entry point (so errors become exit
    code 2 exactly as for a user); returns (exit code, stdout, stderr)."""
    from moepp_bench.app import main

    monkeypatch.setattr(sys, "argv", ["moepp-bench", "routing-stats", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
