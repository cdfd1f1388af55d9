"""Checkpoints: the official MoE++ layout in every variant the loader claims to read, its failure messages, and
our own format's bit-exact round trip and atomic save."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moepp import CheckpointError, ModelConfig, MoEConfig, MoEDecoderLM, load_pretrained, save_pretrained

from official_writer import write_official

pytestmark = pytest.mark.usefixtures("single_thread")

def official_style_model(router: str, dtype: torch.dtype, **moe) -> MoEDecoderLM:
    """A random model whose config is exactly what the loader infers from an official checkpoint."""
    torch.manual_seed(0)
    opts = dict(gate_mode="official", logits_norm=router == "linear", scale_input_by_k=router == "mlp")
    opts.update(moe)
    m = MoEConfig(d_model=32, d_expert=48, n_ffn=4, n_zero=1, n_copy=1, n_constant=2, top_k=2, tau=0.75,
                  router=router, router_mult=8, **opts)
    cfg = ModelConfig(vocab_size=96, n_layers=2, n_heads=4, n_kv_heads=2, moe=m, max_seq_len=64)
    model = MoEDecoderLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)  # larger than init so every part visibly affects the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(1.0)
            if ".router." in name:
                # The released checkpoint stores routers in bfloat16 too; the loader upcasts them to float32.
                p.copy_(p.to(dtype).float())
    return model.to(dtype).eval()


def _logits(model, seed=1):
    ids_BS = torch.randint(0, model.cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids_BS).logits


LAYOUTS = ("safetensors", "safetensors-sharded", "bin", "bin-sharded")


@pytest.mark.parametrize("router", ["linear", "mlp"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_official_layout_loads_to_the_same_model(tmp_path, layout, dtype, router):
    source = official_style_model(router, dtype)
    # The config's moe_2layer_gate contradicts the weights on purpose: the weights decide the router kind.
    ckpt = write_official(source, tmp_path / "ckpt", layout, dtype, moe_2layer_gate=router == "linear")
    loaded = load_pretrained(ckpt)
    assert loaded.cfg == source.cfg
    assert loaded.checkpoint_info.format == "official" and not loaded.checkpoint_info.tau_known
    assert len(loaded.checkpoint_info.weight_files) == (3 if layout.endswith("sharded") else 1)
    for name, p in loaded.named_parameters():
        assert p.dtype == (torch.float32 if ".router." in name else dtype), name
    assert torch.equal(_logits(loaded), _logits(source))


def test_official_mixtral_gating_and_rotary_buffers(tmp_path):
    """moe_use_mixtral_gating selects the mixtral gate (and no K-times input scaling); the rotary inv_freq
    buffers some official checkpoints carry are ignored."""
    source = official_style_model("linear", torch.float32, gate_mode="mixtral", logits_norm=False,
                                  scale_input_by_k=False)
    rotary = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(4) for i in range(2)}
    ckpt = write_official(source, tmp_path / "ckpt", "safetensors", torch.float32, moe_2layer_gate=False,
                          extra_tensors=rotary)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["moe_feature_no_mul_topk"] = False  # the code default; mixtral gating alone turns the scaling off
    (ckpt / "config.json").write_text(json.dumps(raw))
    loaded = load_pretrained(ckpt)
    assert loaded.cfg.moe.gate_mode == "mixtral" and not loaded.cfg.moe.scale_input_by_k
    assert torch.equal(_logits(loaded), _logits(source))


def test_load_with_another_dtype_and_backend(tmp_path):
    source = official_style_model("linear", torch.float32)
    ckpt = write_official(source, tmp_path / "ckpt", "safetensors", torch.float32, moe_2layer_gate=False)
    loaded = load_pretrained(ckpt, dtype=torch.bfloat16, backend="grouped_mm")
    assert loaded.embed.weight.dtype == torch.bfloat16 and loaded.checkpoint_info.dtype == "bfloat16"
    assert all(layer.cfg.backend == "grouped_mm" for layer in loaded.moe_layers)
    assert loaded.layers[0].moe.router.wg.weight.dtype == torch.float32


# Failure messages -------------------------------------------------------------------------------------------
def _good(tmp_path, layout="safetensors") -> Path:
    return write_official(official_style_model("linear", torch.float32), tmp_path / "ckpt", layout, torch.float32,
                          moe_2layer_gate=False)


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_state(ckpt: Path, edit):
    from safetensors.torch import load_file

    state = load_file(str(ckpt / "model.safetensors"))
    edit(state)
    save_file(state, str(ckpt / "model.safetensors"))


def _edit_config(ckpt: Path, **changes):
    raw = json.loads((ckpt / "config.json").read_text())
    raw.update(changes)
    (ckpt / "config.json").write_text(json.dumps(raw))


GONE_TENSOR = "model.layers.1.mlp.moe.experts.experts.2.up_proj.weight"


def _drop_tensor(ckpt):
    _edit_state(ckpt, lambda s: s.pop(GONE_TENSOR))


def _reshape_tensor(ckpt):
    _edit_state(ckpt, lambda s: s.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 16)}))


# breakage: (how to break a good checkpoint, the file the message must name, the problem it must state)
BREAKAGES = {
    "missing directory": (lambda c: c.rename(c.parent / "moved"), "ckpt", "no such checkpoint directory"),
    "missing config.json": (lambda c: (c / "config.json").unlink(), "config.json", "not found"),
    "missing weight file": (lambda c: (c / "model.safetensors").unlink(), "ckpt", "no weights found"),
    "missing tensor": (_drop_tensor, "model.safetensors", f"missing tensor '{GONE_TENSOR}'"),
    "wrong shape": (_reshape_tensor, "model.safetensors", "shape (32, 16)"),
    "unknown model_type": (lambda c: _edit_config(c, model_type="llama"), "config.json", "unknown model_type 'llama'"),
    "truncated safetensors": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors",
                              "corrupt or truncated"),
    "invalid JSON": (lambda c: (c / "config.json").write_text('{"model_type": "MoE++",'), "config.json",
                     "not valid JSON"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_checkpoint_fails_with_one_line_naming_file_and_problem(tmp_path, breakage):
    ckpt = _good(tmp_path)
    load_pretrained(ckpt)  # intact before the breakage
    breaker, names, problem = BREAKAGES[breakage]
    breaker(ckpt)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(ckpt)
    message = str(info.value)
    assert "\n" not in message
    assert names in message and problem in message, message


def test_truncated_bin_fails_with_one_line(tmp_path):
    ckpt = _good(tmp_path, "bin")
    _truncate(ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        load_pretrained(ckpt)
    message = str(info.value)
    assert "\n" not in message and "pytorch_model.bin" in message and "corrupt or truncated" in message, message


def test_missing_shard_and_invalid_index_fail_with_one_line(tmp_path):
    ckpt = _good(tmp_path, "safetensors-sharded")
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors: weight file not found$"):
        load_pretrained(ckpt)
    (ckpt / "model.safetensors.index.json").write_text("not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not valid JSON"):
        load_pretrained(ckpt)


def test_unexpected_tensor_is_named(tmp_path):
    ckpt = _good(tmp_path)
    _edit_state(ckpt, lambda s: s.update({"model.layers.0.mlp.moe.experts.experts.9.up_proj.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.mlp\.moe"
                                              r"\.experts\.experts\.9\.up_proj\.weight'"):
        load_pretrained(ckpt)


# Our format -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_our_format_round_trips_bit_exactly(tmp_path, dtype, tied):
    torch.manual_seed(0)
    m = MoEConfig(d_model=32, d_expert=48, n_ffn=4, n_constant=3, tau=0.3, router="mlp", router_mult=2,
                  gate_mode="mixtral", capacity_factor=1.5, zloss_coef=1e-3)
    cfg = ModelConfig(vocab_size=80, n_layers=3, n_heads=2, moe=m, moe_interval=2, d_dense=40, tie_embeddings=tied)
    model = MoEDecoderLM(cfg).to(dtype).eval()
    save_pretrained(model, tmp_path / "ours", meta={"note": "round trip"})
    loaded = load_pretrained(tmp_path / "ours")
    assert loaded.cfg == model.cfg
    assert loaded.checkpoint_info.tau_known and loaded.checkpoint_info.extra == {"note": "round trip"}
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for name in want:
        assert want[name].dtype == got[name].dtype and torch.equal(want[name], got[name]), name
    assert torch.equal(_logits(loaded), _logits(model))


def test_tied_embeddings_stay_tied_after_loading(tmp_path):
    cfg = ModelConfig(vocab_size=80, n_layers=1, n_heads=2, moe=MoEConfig(d_model=32, d_expert=48, n_ffn=4),
                      tie_embeddings=True)
    model = MoEDecoderLM(cfg)
    save_pretrained(model, tmp_path / "ours")
    loaded = load_pretrained(tmp_path / "ours")
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert loaded.lm_head.weight is loaded.embed.weight


def test_save_into_an_existing_directory_replaces_the_files(tmp_path):
    first = official_style_model("linear", torch.float32)
    second = official_style_model("mlp", torch.float32)
    target = tmp_path / "ours"
    save_pretrained(first, target)
    (target / "README.md").write_text("kept")
    old_weights = (target / "model.safetensors").read_bytes()
    with open(target / "model.safetensors", "rb") as reader:  # a reader of the old checkpoint, mid-save
        save_pretrained(second, target, extra_files={"tokenizer.json": b"{}"})
        # Files are renamed into place, never rewritten: the open reader still sees the whole old file.
        assert reader.read() == old_weights
    loaded = load_pretrained(target)
    assert loaded.cfg == second.cfg and torch.equal(_logits(loaded), _logits(second))
    assert sorted(os.listdir(target)) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    assert (target / "README.md").read_text() == "kept"
    assert sorted(os.listdir(tmp_path)) == ["ours"]  # no staging directory left behind


def test_a_failed_save_leaves_the_existing_checkpoint_intact(tmp_path, monkeypatch):
    first = official_style_model("linear", torch.float32)
    target = tmp_path / "ours"
    save_pretrained(first, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(official_style_model("mlp", torch.float32), target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["ours"]
    assert torch.equal(_logits(load_pretrained(target)), _logits(first))
