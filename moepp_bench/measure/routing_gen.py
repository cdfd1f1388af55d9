"""Synthetic and replayed routing for benchmarks: topk_ids_TK (K distinct experts per token) and gates_TK.

Specs (parse_routing_spec validates them before anything runs):
  balanced        the load the heterogeneous loss balances to: FFN share of slots rho(tau), even within a type
  uniform         K distinct experts per token, uniformly at random among all N
  zipf[:S]        skewed popularity: a random permutation of the experts gets Zipf(S) weights (S default 1.2)
  forced:F        a share F of slots on zero-computation experts (even across them), the rest even on FFN
  replay:PATH[:L] layer L (default 0) of a routing.safetensors written by `routing-stats` (or write_routing_file)

Counts for balanced and forced are exact (largest remainder), not sampled: slots are laid out expert by expert,
folded into [T, K] column-major so no token sees an expert twice, then shuffled.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moepp.config import MoEConfig

from ..errors import BenchError
from ..report.files import write_atomic

ROUTING_KINDS = ("balanced", "uniform", "zipf", "forced", "replay")
ROUTING_FILE = "routing.safetensors"
DEFAULT_ZIPF_S = 1.2
SPEC_HELP = "balanced, uniform, zipf[:S], forced:F (F in [0,1]) or replay:PATH[:LAYER]"


@dataclass(frozen=True)
class RoutingSpec:
    kind: str
    text: str  # the spec as given, for result rows
    zipf_s: float = DEFAULT_ZIPF_S
    zc_share: float | None = None  # forced:F
    replay_file: Path | None = None
    replay_layer: int = 0


# Parsing ---------------------------------------------------------------------------------------------------
def parse_routing_spec(spec: str, cfg: MoEConfig | None = None) -> RoutingSpec:
    """Validate a spec; with cfg, also check it can be realised for that layer (replay expert count, forced
    share with no ZC experts). Raises BenchError with a one-line message."""
    text = (spec or "").strip()
    kind, _, arg = text.partition(":")
    kind = kind.lower()
    if kind not in ROUTING_KINDS:
        raise BenchError(f"unknown routing {spec!r}; use {SPEC_HELP}")
    if kind in ("balanced", "uniform"):
        if arg:
            raise BenchError(f"routing {kind!r} takes no argument (got {spec!r}); use {SPEC_HELP}")
        parsed = RoutingSpec(kind, text)
    elif kind == "zipf":
        s = _number(arg, spec, "zipf exponent S") if arg else DEFAULT_ZIPF_S
        if not (s >= 0 and math.isfinite(s)):
            raise BenchError(f"zipf exponent must be a finite number >= 0, got {arg!r}; e.g. --routing zipf:1.2")
        parsed = RoutingSpec(kind, text, zipf_s=s)
    elif kind == "forced":
        if not arg:
            raise BenchError("forced routing needs a share: forced:F with F in [0, 1], e.g. forced:0.5")
        share = _number(arg, spec, "forced share F")
        if not 0.0 <= share <= 1.0:
            raise BenchError(f"forced share F must be in [0, 1], got {arg!r}; e.g. --routing forced:0.5")
        parsed = RoutingSpec(kind, text, zc_share=share)
    else:
        parsed = _parse_replay(arg, spec)
    if cfg is not None:
        check_spec_for_layer(parsed, cfg)
    return parsed


def vanilla_routing_spec(spec: str) -> str:
    """The routing for the vanilla counterpart of a layer: the same distribution where it applies to a layer
    without zero-computation experts (balanced, uniform, zipf), otherwise balanced (forced, replay)."""
    kind = (spec or "").strip().partition(":")[0].lower()
    return spec.strip() if kind in ("balanced", "uniform", "zipf") else "balanced"


def _number(arg: str, spec: str, what: str) -> float:
    try:
        return float(arg)
    except ValueError:
        raise BenchError(f"{what} in routing {spec!r} is not a number; use {SPEC_HELP}") from None


def _parse_replay(arg: str, spec: str) -> RoutingSpec:
    if not arg:
        raise BenchError(f"replay routing needs a file: replay:PATH[:LAYER] (got {spec!r})")
    path_text, layer = arg, 0
    head, sep, tail = arg.rpartition(":")
    if sep and tail.isdigit() and head:  # a trailing :N is the layer; a path may itself contain ':'
        path_text, layer = head, int(tail)
    path = Path(path_text)
    if path.is_dir():
        path = path / ROUTING_FILE
    if not path.is_file():
        raise BenchError(f"replay file {path} not found; give a {ROUTING_FILE} written by `moepp-bench "
                         f"routing-stats` or its directory")
    meta, names = _read_routing_header(path)
    if f"layer{layer}.topk_ids" not in names:
        layers = sorted(int(n[5:].split(".")[0]) for n in names if n.startswith("layer") and n.endswith(".topk_ids"))
        raise BenchError(f"replay file {path} has no layer {layer} (layers: {_ranges(layers) or 'none'}); "
                         f"use replay:PATH:LAYER with one of those")
    if "n_experts" not in meta:
        raise BenchError(f"replay file {path} has no 'n_experts' metadata; rewrite it with routing-stats")
    return RoutingSpec("replay", spec.strip(), replay_file=path, replay_layer=layer)


def _ranges(values: list[int]) -> str:
    if not values:
        return ""
    return f"{values[0]}..{values[-1]}" if values == list(range(values[0], values[-1] + 1)) else str(values)


def _read_routing_header(path: Path) -> tuple[dict, list[str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {}), list(fh.keys())
    except Exception as exc:  # safetensors raises several types for a corrupt header
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BenchError(f"replay file {path} is not a readable safetensors file ({reason})") from None


def check_spec_for_layer(spec: RoutingSpec, cfg: MoEConfig) -> None:
    """Raise BenchError when spec cannot be realised on cfg's layer."""
    if spec.kind == "forced":
        if spec.zc_share > 0 and cfg.n_zc == 0:
            raise BenchError(f"routing {spec.text!r} puts slots on zero-computation experts but the layer has "
                             f"none; use forced:0 or balanced for a vanilla layer")
        if spec.zc_share < 1 and cfg.n_ffn == 0:
            raise BenchError(f"routing {spec.text!r} needs FFN experts but the layer has none; use forced:1")
    if spec.kind == "replay":
        meta, _ = _read_routing_header(spec.replay_file)
        n_file = int(meta["n_experts"])
        if n_file != cfg.n_experts:
            raise BenchError(f"replay file {spec.replay_file} was recorded with {n_file} experts but the layer has "
                             f"{cfg.n_experts}; use the preset or checkpoint it was recorded from")
        types = json.loads(meta["expert_types"]) if "expert_types" in meta else None
        if types is not None and tuple(types) != cfg.expert_types:
            raise BenchError(f"replay file {spec.replay_file} has expert types {_type_counts(types)} but the layer "
                             f"has {_type_counts(cfg.expert_types)}; use the preset it was recorded from")


def _type_counts(types) -> str:
    return "+".join(f"{sum(t == k for t in types)} {k}" for k in ("ffn", "constant", "copy", "zero"))


# Generation ------------------------------------------------------------------------------------------------
def generate_routing(spec: str | RoutingSpec, cfg: MoEConfig, n_tokens: int, seed: int = 0,
                     device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids_TK (long, K distinct experts per token) and gates_TK (float32, rows sum to 1)."""
    parsed = spec if isinstance(spec, RoutingSpec) else parse_routing_spec(spec)
    check_spec_for_layer(parsed, cfg)
    if n_tokens <= 0:
        raise BenchError(f"the number of tokens must be positive, got {n_tokens}")
    T, K, N = n_tokens, cfg.top_k, cfg.n_experts
    gen = torch.Generator().manual_seed(seed)
    if parsed.kind == "balanced":
        ids_TK = _exact_share_routing(cfg, T, ffn_share=cfg.rho, gen=gen)
    elif parsed.kind == "forced":
        ids_TK = _exact_share_routing(cfg, T, ffn_share=1.0 - parsed.zc_share, gen=gen)
    elif parsed.kind == "uniform":
        ids_TK = torch.rand(T, N, generator=gen).topk(K, dim=1).indices  # a uniform random K-subset per token
    elif parsed.kind == "zipf":
        ids_TK = _zipf_routing(N, K, T, parsed.zipf_s, gen)
    else:
        ids_TK = _replay_routing(parsed, cfg, T)
    # Gate values change neither FLOPs nor time; random ones keep the combine honest (no all-equal shortcut).
    gates_TK = torch.softmax(torch.randn(T, K, generator=gen), dim=1)
    return ids_TK.to(device=device, dtype=torch.long), gates_TK.to(device=device, dtype=torch.float32)


def ffn_slot_fraction(topk_ids_TK: torch.Tensor, cfg: MoEConfig) -> float:
    """Share of routing slots that land on FFN experts."""
    if topk_ids_TK.numel() == 0:
        return float("nan")
    return (topk_ids_TK < cfg.n_ffn).sum().item() / topk_ids_TK.numel()


def _even_split(total: int, n: int) -> list[int]:
    base, extra = divmod(total, n)
    return [base + (i < extra) for i in range(n)]


def _exact_share_routing(cfg: MoEConfig, T: int, ffn_share: float, gen: torch.Generator) -> torch.Tensor:
    K, S = cfg.top_k, T * cfg.top_k
    n_ffn_slots = round(S * ffn_share) if cfg.n_zc else S
    if cfg.n_ffn == 0:
        n_ffn_slots = 0
    counts_N = (_even_split(n_ffn_slots, cfg.n_ffn) if cfg.n_ffn else []) + \
               (_even_split(S - n_ffn_slots, cfg.n_zc) if cfg.n_zc else [])
    if max(counts_N) > T:
        kind = "FFN" if counts_N.index(max(counts_N)) < cfg.n_ffn else "zero-computation"
        raise BenchError(f"an FFN share of {ffn_share:.3f} needs {max(counts_N)} slots on one {kind} expert but "
                         f"only {T} tokens can each choose it once (K={K} distinct experts per token); "
                         f"choose a share the layer can hold")
    # Experts in random order, each a contiguous run of its count; a run of <= T slots folded column-major
    # lands on distinct tokens, so every token's K experts are distinct.
    order_N = torch.randperm(cfg.n_experts, generator=gen)
    counts_t = torch.tensor(counts_N, dtype=torch.long)
    flat_S = torch.repeat_interleave(order_N, counts_t[order_N])
    ids_TK = flat_S.view(K, T).t()
    ids_TK = ids_TK[torch.randperm(T, generator=gen)]
    col_perm_TK = torch.rand(T, K, generator=gen).argsort(dim=1)
    return ids_TK.gather(1, col_perm_TK)


def _zipf_routing(N: int, K: int, T: int, s: float, gen: torch.Generator) -> torch.Tensor:
    rank_N = torch.empty(N)
    rank_N[torch.randperm(N, generator=gen)] = torch.arange(1, N + 1, dtype=torch.float32)
    log_w_N = -s * rank_N.log()
    # Gumbel top-k: K draws without replacement, each proportional to the weights of the experts left.
    gumbel_TN = -torch.log(-torch.log(torch.rand(T, N, generator=gen).clamp_min(1e-20)))
    return (log_w_N + gumbel_TN).topk(K, dim=1).indices


def _replay_routing(spec: RoutingSpec, cfg: MoEConfig, T: int) -> torch.Tensor:
    from safetensors import safe_open

    name = f"layer{spec.replay_layer}.topk_ids"
    with safe_open(str(spec.replay_file), framework="pt") as fh:
        ids_RK = fh.get_tensor(name).long()
    if ids_RK.dim() != 2 or ids_RK.shape[0] == 0:
        raise BenchError(f"replay file {spec.replay_file}: {name} has shape {tuple(ids_RK.shape)}, expected [T, K]")
    if ids_RK.shape[1] != cfg.top_k:
        raise BenchError(f"replay file {spec.replay_file} routes to K={ids_RK.shape[1]} experts per token but "
                         f"the layer uses top_k={cfg.top_k}; use the preset it was recorded from")
    if ids_RK.min() < 0 or ids_RK.max() >= cfg.n_experts:
        raise BenchError(f"replay file {spec.replay_file}: {name} has expert ids outside 0..{cfg.n_experts - 1}")
    reps = -(-T // ids_RK.shape[0])  # tile when the recording is shorter than asked
    return ids_RK.repeat(reps, 1)[:T].contiguous()


# Writing ---------------------------------------------------------------------------------------------------
def write_routing_file(path: str | os.PathLike, topk_ids_by_layer: list[torch.Tensor], cfg: MoEConfig,
                       extra_metadata: dict[str, str] | None = None) -> Path:
    """Write routing.safetensors (PATH may be the file or its directory): layer{i}.topk_ids int64 [T, K] and
    metadata n_experts / expert_types, atomically (temporary name, then rename)."""
    from safetensors.torch import save

    target = Path(path)
    if target.suffix != ".safetensors":
        target = target / ROUTING_FILE
    tensors = {f"layer{i}.topk_ids": ids.detach().to("cpu", torch.int64).contiguous()
               for i, ids in enumerate(topk_ids_by_layer)}
    metadata = {"n_experts": str(cfg.n_experts), "expert_types": json.dumps(list(cfg.expert_types)),
                **(extra_metadata or {})}
    return write_atomic(target, save(tensors, metadata=metadata))
