"""Checkpoints: our own format (config.json + model.safetensors) and the official MoE++ Hugging Face format.

Every failure raises CheckpointError with a one-line message naming the file and the problem.
Loading needs no network and no `transformers`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ModelConfig, MoEConfig
from .model import MoEDecoderLM

FORMAT_NAME = "moepp"
FORMAT_VERSION = 1
OUR_WEIGHTS = "model.safetensors"
OFFICIAL_ZC = {"n_constant": 2, "n_copy": 1, "n_zero": 1}  # the official code fixes these counts
IGNORED_OFFICIAL = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message is one line naming the file and the problem."""


@dataclass
class CheckpointInfo:
    path: str
    format: str  # "moepp" or "official"
    weight_files: list[str]
    dtype: str
    tau_known: bool  # official checkpoints do not record tau; 0.75 (the released 7B's) is assumed
    extra: dict = field(default_factory=dict)


# Reading helpers -------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def _load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors and torch.load raise many types for a corrupt file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: corrupt or truncated weight file ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def _weight_files(ckpt: Path) -> list[Path]:
    """Find the weight files: single or sharded, safetensors preferred over .bin."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (ckpt / single).is_file():
            return [ckpt / single]
        if (ckpt / index).is_file():
            weight_map = _read_json(ckpt / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{ckpt / index}: no weight_map in the index")
            return [ckpt / name for name in sorted(set(weight_map.values()))]
    raise CheckpointError(
        f"{ckpt}: no weights found (expected model.safetensors, pytorch_model.bin or a sharded index json)"
    )


def _load_state(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    state, origin = {}, {}
    for f in files:
        for name, tensor in _load_tensor_file(f).items():
            state[name] = tensor
            origin[name] = f
    return state, origin


# Official format -------------------------------------------------------------------------------------------
def official_config(raw: dict, state: dict[str, torch.Tensor], config_path: Path) -> ModelConfig:
    def need(key):
        if key not in raw:
            raise CheckpointError(f"{config_path}: missing key {key!r}")
        return raw[key]

    if raw.get("rope_scaling"):
        raise CheckpointError(f"{config_path}: rope_scaling={raw['rope_scaling']!r} is not supported")
    experts = need("num_experts")
    n_experts = int(experts[0] if isinstance(experts, list) else experts)
    n_zc = sum(OFFICIAL_ZC.values())
    if n_experts <= n_zc:
        raise CheckpointError(f"{config_path}: num_experts={n_experts} leaves no FFN expert (4 are zero-computation)")
    # Router kind from the weights (configs in the wild disagree with their weights), config as fallback.
    keys = set(state)
    if any(k.endswith("mlp.moe.gate.wg.0.weight") for k in keys):
        router = "mlp"
        w0 = next(v for k, v in state.items() if k.endswith("mlp.moe.gate.wg.0.weight"))
        router_mult = w0.shape[0] // n_experts
    elif any(k.endswith("mlp.moe.gate.wg.weight") for k in keys):
        router, router_mult = "linear", 8
    else:
        router, router_mult = ("mlp" if raw.get("moe_2layer_gate", True) else "linear"), 8
    mixtral = bool(raw.get("moe_use_mixtral_gating", False))
    try:
        moe = MoEConfig(
            d_model=int(need("hidden_size")),
            d_expert=int(need("intermediate_size")),
            n_ffn=n_experts - n_zc,
            **OFFICIAL_ZC,
            top_k=2,
            tau=0.75,
            router=router,
            router_mult=router_mult,
            gate_mode="mixtral" if mixtral else "official",
            logits_norm=bool(raw.get("moe_use_logits_norm", False)),
            logits_norm_std=float(raw.get("moe_gate_norm_std", 1.0)),
            scale_input_by_k=not (mixtral or raw.get("moe_feature_no_mul_topk", False)),
            gating_residual=True,
        )
        return ModelConfig(
            vocab_size=int(need("vocab_size")),
            n_layers=int(need("num_hidden_layers")),
            n_heads=int(need("num_attention_heads")),
            n_kv_heads=int(raw.get("num_key_value_heads") or need("num_attention_heads")),
            moe=moe,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            max_seq_len=int(raw.get("max_position_embeddings", 2048)),
            moe_interval=int(raw.get("moe_expert_interval", 1)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            pad_token_id=raw.get("pad_token_id"),
        )
    except ValueError as exc:
        raise CheckpointError(f"{config_path}: invalid config ({exc})") from None


def official_to_ours(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename official tensors to ours, stacking per-expert weights. Raises KeyError(name) if one is missing."""
    out = {
        "embed.weight": state["model.embed_tokens.weight"],
        "norm.weight": state["model.norm.weight"],
        "lm_head.weight": state["model.embed_tokens.weight" if cfg.tie_embeddings and "lm_head.weight" not in state
                                else "lm_head.weight"],
    }
    m = cfg.moe
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        out[dst + "attn_norm.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "mlp_norm.weight"] = state[src + "post_attention_layernorm.weight"]
        for p in ("q", "k", "v", "o"):
            out[dst + f"attn.{p}_proj.weight"] = state[src + f"self_attn.{p}_proj.weight"]
        if not cfg.is_moe_layer(i):
            for p in ("gate", "up", "down"):
                out[dst + f"mlp.{p}_proj.weight"] = state[src + f"mlp.{p}_proj.weight"]
            continue
        g, e = src + "mlp.moe.gate.", src + "mlp.moe.experts.experts."
        if m.router == "linear":
            out[dst + "moe.router.wg.weight"] = state[g + "wg.weight"]
        else:
            out[dst + "moe.router.wg.0.weight"] = state[g + "wg.0.weight"]
            out[dst + "moe.router.wg.2.weight"] = state[g + "wg.2.weight"]
        out[dst + "moe.router.gate_map.weight"] = state[g + "gate_map.weight"]
        out[dst + "moe.ffn.w_up"] = torch.stack([state[e + f"{j}.up_proj.weight"] for j in range(m.n_ffn)])
        out[dst + "moe.ffn.w_down"] = torch.stack([state[e + f"{j}.down_proj.weight"] for j in range(m.n_ffn)])
        consts = m.type_range("constant")
        out[dst + "moe.zc.const_v"] = torch.stack([state[e + f"{j}.constant"] for j in consts])
        out[dst + "moe.zc.const_wc"] = torch.stack([state[e + f"{j}.wg.weight"] for j in consts])
    return out


def _official_names(cfg: ModelConfig, router_names: list[str]) -> set[str]:
    """Every tensor name an official checkpoint of this config holds (for the unexpected-tensor check)."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.tie_embeddings:
        names.add("lm_head.weight")
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        if not cfg.is_moe_layer(i):
            names |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
            continue
        names |= {p + "mlp.moe.gate." + r for r in router_names} | {p + "mlp.moe.gate.gate_map.weight"}
        e = p + "mlp.moe.experts.experts."
        names |= {e + f"{j}.up_proj.weight" for j in range(cfg.moe.n_ffn)}
        names |= {e + f"{j}.down_proj.weight" for j in range(cfg.moe.n_ffn)}
        for j in cfg.moe.type_range("constant"):
            names |= {e + f"{j}.constant", e + f"{j}.wg.weight"}
    return names


def _load_official(ckpt: Path, raw: dict, dtype: torch.dtype | None) -> MoEDecoderLM:
    files = _weight_files(ckpt)
    state, origin = _load_state(files)
    state = {k: v for k, v in state.items() if not IGNORED_OFFICIAL.match(k)}
    cfg = official_config(raw, state, ckpt / "config.json")
    where = files[0] if len(files) == 1 else ckpt
    router_names = ["wg.weight"] if cfg.moe.router == "linear" else ["wg.0.weight", "wg.2.weight"]
    unexpected = sorted(set(state) - _official_names(cfg, router_names))
    if unexpected:
        raise CheckpointError(f"{origin[unexpected[0]]}: unexpected tensor {unexpected[0]!r}"
                              f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}")
    try:
        ours = official_to_ours(state, cfg)
    except KeyError as exc:
        raise CheckpointError(f"{where}: missing tensor {exc.args[0]!r}") from None
    except RuntimeError as exc:  # torch.stack of experts with unequal shapes
        raise CheckpointError(f"{where}: expert weights of unequal shapes ({str(exc).splitlines()[0]})") from None
    stored = state["model.embed_tokens.weight"].dtype  # not the first tensor: a router may be kept in float32
    model = _build(cfg, ours, where, dtype or stored)
    model.checkpoint_info = CheckpointInfo(str(ckpt), "official", [f.name for f in files], str(dtype or stored).removeprefix("torch."),
                                           tau_known=False, extra={"config": raw})
    return model


# Shared ----------------------------------------------------------------------------------------------------
def _build(cfg: ModelConfig, state: dict[str, torch.Tensor], where: Path, dtype: torch.dtype) -> MoEDecoderLM:
    with torch.device("meta"):
        shell = MoEDecoderLM(cfg)
    expected = shell.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise CheckpointError(f"{where}: missing tensor {name!r}")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                                  f"the config implies {tuple(tensor.shape)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]!r}")
    # No random init of weights about to be overwritten: allocate empty, then copy the checkpoint in.
    # Router tensors stay float32 (Router._apply); everything else takes the requested dtype.
    model = shell.to_empty(device="cpu").to(dtype)
    if cfg.tie_embeddings:  # to_empty from the meta device gives lm_head its own tensor; tie them again
        model.lm_head.weight = model.embed.weight
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def load_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    backend: str | None = None) -> MoEDecoderLM:
    """Load a checkpoint directory in our format or the official MoE++ format.

    dtype: convert to this dtype (default: the stored one; routers always stay float32).
    backend: override the dispatch backend recorded in the config.
    """
    ckpt = Path(path)
    if not ckpt.exists():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a directory (a checkpoint is a directory with config.json)")
    raw = _read_json(ckpt / "config.json")
    if raw.get("format") == FORMAT_NAME:
        model = _load_ours(ckpt, raw, dtype)
    elif raw.get("model_type") == "MoE++":
        model = _load_official(ckpt, raw, dtype)
    else:
        kind = raw.get("model_type", raw.get("format"))
        raise CheckpointError(f"{ckpt / 'config.json'}: unknown model_type {kind!r} "
                              f"(expected an official 'MoE++' checkpoint or one saved by moepp)")
    if backend is not None:
        set_backend(model, backend)
    return model


def set_backend(model: MoEDecoderLM, backend: str) -> None:
    """Switch every MoE layer's dispatch backend (configs are frozen, so layers get a replaced config)."""
    for layer in model.moe_layers:
        layer.cfg = layer.cfg.replace(backend=backend)
    model.cfg = model.cfg.replace(moe=model.cfg.moe.replace(backend=backend))


# Our format ------------------------------------------------------------------------------------------------
def _load_ours(ckpt: Path, raw: dict, dtype: torch.dtype | None) -> MoEDecoderLM:
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt / 'config.json'}: format_version {version!r} is not supported "
                              f"(this moepp reads version {FORMAT_VERSION}; upgrade moepp)")
    try:
        cfg = ModelConfig.from_dict(raw["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt / 'config.json'}: invalid model config ({exc})") from None
    weights = ckpt / OUR_WEIGHTS
    state = _load_tensor_file(weights)
    if cfg.tie_embeddings and "lm_head.weight" not in state and "embed.weight" in state:
        state["lm_head.weight"] = state["embed.weight"]
    non_router = [v for k, v in state.items() if ".router." not in k]
    stored = non_router[0].dtype if non_router else torch.float32
    model = _build(cfg, state, weights, dtype or stored)
    model.checkpoint_info = CheckpointInfo(str(ckpt), FORMAT_NAME, [OUR_WEIGHTS], str(dtype or stored).removeprefix("torch."),
                                           tau_known=True, extra=raw.get("meta", {}))
    return model


def save_pretrained(model: MoEDecoderLM, path: str | os.PathLike, *, meta: dict | None = None,
                    extra_files: dict[str, str | os.PathLike | bytes] | None = None) -> Path:
    """Write config.json + model.safetensors (+ extra files such as tokenizer.json) atomically.

    A new directory appears whole (written beside it, then renamed); in an existing one each file is replaced
    atomically, weights before config.
    """
    from safetensors.torch import save_file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    config = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model": model.cfg.to_dict(),
              "meta": meta or {}}
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; a checkpoint is for everyone who may read here
        save_file(state, str(staging / OUR_WEIGHTS), metadata={"format": FORMAT_NAME})
        for name, content in (extra_files or {}).items():
            if isinstance(content, bytes):
                (staging / name).write_bytes(content)
            else:
                shutil.copyfile(content, staging / name)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for f in staging.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if not target.exists():
            os.replace(staging, target)
            return target
        names = [OUR_WEIGHTS, *(extra_files or {}), "config.json"]
        for name in names:
            os.replace(staging / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
