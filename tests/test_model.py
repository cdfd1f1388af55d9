"""The decoder LM: training step in float32 and bfloat16, float32 routers, padding, the routing record."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moepp import MoEDecoderLM, model_preset
from moepp.reference import moe_forward
from moe_testing import assert_close

pytestmark = pytest.mark.usefixtures("single_thread")

B, S = 4, 32  # 256 routing slots over 8 experts: every expert, constant ones included, gets some


def _model(dtype=torch.float32, **moe_overrides):
    torch.manual_seed(0)
    return MoEDecoderLM(model_preset("tiny", **moe_overrides)).to(dtype)


def _batch(model, b=B, s=S):
    return torch.randint(0, model.cfg.vocab_size, (b, s))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_training_step_reaches_every_parameter(dtype):
    model = _model(dtype, zloss_coef=1e-3)
    ids_BS = _batch(model)
    out = model(ids_BS, labels=ids_BS)
    assert out.logits.dtype == torch.float32 and out.logits.shape == (B, S, model.cfg.vocab_size)
    assert torch.isfinite(out.loss)
    # Untrained with uniform-ish predictions: cross-entropy near ln(vocab).
    assert abs(out.ce_loss.item() - torch.log(torch.tensor(model.cfg.vocab_size)).item()) < 0.5
    assert torch.allclose(out.loss, out.ce_loss + out.aux_loss)
    assert out.aux_loss > 0 and out.balance_loss > 0 and out.z_loss > 0
    out.loss.backward()
    # The first MoE layer has no previous logits, so its gating-residual map is the one parameter without a
    # gradient (the official checkpoints carry it too, unused).
    no_grad = {"layers.0.moe.router.gate_map.weight"}
    for name, p in model.named_parameters():
        if name in no_grad:
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
            assert p.grad.dtype == p.dtype, name


def test_routers_stay_float32_in_bfloat16():
    model = _model(torch.bfloat16)
    for name, p in model.named_parameters():
        want = torch.float32 if ".router." in name else torch.bfloat16
        assert p.dtype == want, name
    assert any(".router." in n for n, _ in model.named_parameters())
    # And they stay float32 through another conversion round.
    model.to(torch.float16).to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".router." in n)


def test_dense_layers_between_moe_layers_train_too():
    torch.manual_seed(0)
    cfg = model_preset("tiny").replace(n_layers=4, moe_interval=2)
    model = MoEDecoderLM(cfg)
    assert [layer.is_moe for layer in model.layers] == [False, True, False, True]
    ids_BS = _batch(model, 2, 16)
    out = model(ids_BS, labels=ids_BS)
    out.loss.backward()
    assert model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert model.layers[1].moe.router.gate_map.weight.grad is None  # first MoE layer: no residual
    assert model.layers[3].moe.router.gate_map.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_right_padding_does_not_change_the_real_tokens(dtype):
    model = _model(dtype).eval()
    short, full = 11, 16
    ids_2S = _batch(model, 2, full)
    mask_2S = torch.ones(2, full, dtype=torch.long)
    mask_2S[0, short:] = 0
    ids_2S[0, short:] = 0  # padding id
    with torch.no_grad():
        padded = model(ids_2S, attention_mask=mask_2S).logits
        alone = model(ids_2S[:1, :short]).logits
        unmasked_full = model(ids_2S[1:]).logits
    # Same tokens, different batch and attention kernels: float32 to rounding; bf16 rounds differently
    # along the way, and logits are float32 from a bf16 model, so the bf16 tolerance applies.
    assert_close(padded[0, :short], alone[0], dtype, "padded sequence vs alone")
    assert_close(padded[1], unmasked_full[0], dtype, "full row of a padded batch")


def test_routing_record_is_consistent():
    model = _model(capacity_factor=0.6).eval()  # drops happen, so `dropped` is exercised
    ids_BS = _batch(model, 2, 24)
    T, K, N = 2 * 24, model.cfg.moe.top_k, model.cfg.moe.n_experts
    with torch.no_grad():
        out = model(ids_BS, return_routing=True)
    assert len(out.routing) == len(model.moe_layers) == model.cfg.n_layers
    total_dropped = 0
    for rec in out.routing:
        assert rec.topk_ids.shape == (T, K) and rec.topk_ids.dtype == torch.long
        assert rec.gates.shape == (T, K) and rec.gates.dtype == torch.float32
        assert rec.logits.shape == (T, N) and rec.logits.dtype == torch.float32
        assert rec.dropped.shape == (T, K) and rec.dropped.dtype == torch.bool
        assert rec.expert_counts.shape == (N,)
        assert ((rec.topk_ids >= 0) & (rec.topk_ids < N)).all()
        assert (rec.topk_ids[:, 0] != rec.topk_ids[:, 1]).all()  # two different experts per token
        kept = torch.bincount(rec.topk_ids[~rec.dropped], minlength=N)
        assert torch.equal(rec.expert_counts, kept)
        assert rec.expert_counts.sum() + rec.dropped.sum() == T * K
        total_dropped += int(rec.dropped.sum())
    assert total_dropped > 0 and out.n_dropped.item() == total_dropped
    # Without return_routing nothing is recorded.
    with torch.no_grad():
        assert model(ids_BS).routing is None


def test_each_moe_layer_routes_like_the_reference_with_the_previous_layers_logits():
    """The model threads layer i-1's logits into layer i's gating residual; the reference, given the same layer
    input and those logits, reproduces each layer's routing and output."""
    model = _model(gate_mode="official", logits_norm=True, scale_input_by_k=True).eval()
    seen = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: seen.append((mod, args, out)))
             for layer in model.moe_layers]
    with torch.no_grad():
        out = model(_batch(model, 2, 20), return_routing=True)
    for h in hooks:
        h.remove()
    assert len(seen) == 2
    for i, (layer, (h_BSD, prev_TN), layer_out) in enumerate(seen):
        if i == 0:
            assert prev_TN is None
        else:
            assert torch.equal(prev_TN, out.routing[i - 1].logits)
        ref = moe_forward(layer, h_BSD, prev_TN)
        assert torch.equal(out.routing[i].topk_ids, ref.topk_ids_TK)
        assert_close(layer_out.y.reshape(-1, model.cfg.d_model), ref.y_TD, torch.float32, f"layer {i} output")


def test_the_gating_residual_carries_gradient_to_the_previous_router():
    """Layer i gets layer i-1's logits themselves (not a detached copy), as in the official code, so the
    residual trains the earlier router too."""
    model = _model()
    seen = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: seen.append((args, out)))
             for layer in model.moe_layers]
    ids_BS = _batch(model, 2, 8)
    model(ids_BS, labels=ids_BS)
    for h in hooks:
        h.remove()
    (_, first_out), ((_, prev_TN), second_out) = seen
    assert prev_TN is first_out.logits_TN and prev_TN.requires_grad
    (d_prev,) = torch.autograd.grad(second_out.logits_TN.sum(), prev_TN, retain_graph=True)
    assert d_prev.abs().sum() > 0


def test_labels_are_shifted_inside():
    model = _model().eval()
    ids_BS = _batch(model, 2, 10)
    labels_BS = ids_BS.clone()
    labels_BS[0, 5:] = -100
    with torch.no_grad():
        out = model(ids_BS, labels=labels_BS)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, model.cfg.vocab_size), labels_BS[:, 1:].reshape(-1),
                           ignore_index=-100)
    assert torch.allclose(out.ce_loss, want)


def test_bad_input_shape_and_length_raise():
    model = _model()
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, model.cfg.max_seq_len + 1, dtype=torch.long))
