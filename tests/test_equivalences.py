"""MoE++ reduces to known things in the limits, backends agree with each other, and the losses match their
definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moepp import BACKENDS, MoEConfig, MoEDecoderLM, model_preset
from moepp.dispatch import dispatch_combine
from moepp.losses import heterogeneous_balance_loss, router_z_loss
from moepp.model import DenseMLP
from moepp.reference import balance_loss, moe_forward
from moe_testing import assert_close, make_layer

pytestmark = pytest.mark.usefixtures("single_thread")


# Limits --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_zc_experts_is_a_plain_top_k_moe(backend):
    cfg = MoEConfig(d_model=32, d_expert=48, n_ffn=6).vanilla()
    assert cfg.n_zc == 0
    layer = make_layer(cfg)
    x_TD = torch.randn(19, cfg.d_model)
    with torch.no_grad():
        y_TD = layer(x_TD, backend=backend).y
        # A plain top-k MoE, token by token: softmax over the FFN experts, keep the top K, no renormalisation.
        W_ND, H = layer.router.wg.weight, cfg.d_expert
        want_TD = torch.zeros_like(x_TD)
        for t in range(x_TD.shape[0]):
            p_N = torch.softmax(W_ND @ x_TD[t], dim=0)
            top_p, top_e = p_N.topk(cfg.top_k)
            for p, e in zip(top_p, top_e.tolist()):
                w_up, w_down = layer.ffn.w_up[e], layer.ffn.w_down[e]
                want_TD[t] += p * (w_down @ (F.silu(w_up[:H] @ x_TD[t]) * (w_up[H:] @ x_TD[t])))
    assert_close(y_TD, want_TD, torch.float32, "vanilla MoE")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_ffn_expert_top1_is_a_dense_swiglu(backend):
    cfg = MoEConfig(d_model=48, d_expert=80, n_ffn=1, n_zero=0, n_copy=0, n_constant=0, top_k=1)
    layer = make_layer(cfg)
    dense = DenseMLP(cfg.d_model, cfg.d_expert)
    H = cfg.d_expert
    with torch.no_grad():
        dense.gate_proj.weight.copy_(layer.ffn.w_up[0, :H])
        dense.up_proj.weight.copy_(layer.ffn.w_up[0, H:])
        dense.down_proj.weight.copy_(layer.ffn.w_down[0])
        x_TD = torch.randn(2, 7, cfg.d_model)  # [B, S, D]: the layer keeps the input's shape
        out = layer(x_TD, return_record=True, backend=backend)
        assert out.record.gates.eq(1.0).all()  # softmax over one expert
        assert out.y.shape == x_TD.shape
        assert_close(out.y, dense(x_TD), torch.float32, "one-expert MoE vs dense SwiGLU")


def _layer_forced_to(kind: str, gate_mode: str = "paper"):
    """A top-1 layer whose gating residual (identity map, large previous logit) sends every token to the first
    expert of `kind`."""
    cfg = MoEConfig(d_model=32, d_expert=48, n_ffn=4, top_k=1, gate_mode=gate_mode)
    layer = make_layer(cfg)
    target = cfg.type_range(kind).start
    with torch.no_grad():
        layer.router.gate_map.weight.copy_(torch.eye(cfg.n_experts))
        layer.router.wg.weight.mul_(0.2)  # router logits of std ~0.4
    T = 11
    prev_TN = torch.zeros(T, cfg.n_experts)
    prev_TN[:, target] = 4.0  # wins for every token, while the gate stays visibly below 1
    return layer, target, torch.randn(T, cfg.d_model), prev_TN


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["zero", "copy", "constant"])
def test_routing_forced_to_a_zc_expert_gives_the_closed_form(kind, backend):
    layer, target, x_TD, prev_TN = _layer_forced_to(kind)
    with torch.no_grad():
        out = layer(x_TD, prev_TN, return_record=True, backend=backend)
    assert out.record.topk_ids.eq(target).all()
    g_T1 = out.record.gates  # [T, 1]
    assert (g_T1 < 1).all() and (g_T1 > 0.5).all()
    if kind == "zero":
        want_TD = torch.zeros_like(x_TD)
    elif kind == "copy":
        want_TD = g_T1 * x_TD
    else:
        wc_2D, v_D = layer.zc.const_wc[0].detach(), layer.zc.const_v[0].detach()
        s_T2 = x_TD @ wc_2D.T
        a1_T1 = 1.0 / (1.0 + torch.exp(s_T2[:, 1:] - s_T2[:, :1]))  # softmax of two scores
        want_TD = g_T1 * (a1_T1 * x_TD + (1.0 - a1_T1) * v_D)
    if kind == "zero":
        assert torch.equal(out.y, want_TD)  # nothing is computed, so exactly zero
    else:
        assert_close(out.y, want_TD, torch.float32, f"forced to {kind}")


def test_zero_gate_map_equals_no_residual():
    layer = make_layer(MoEConfig(d_model=32, d_expert=48, n_ffn=4, capacity_factor=1.0))
    with torch.no_grad():
        layer.router.gate_map.weight.zero_()
        x_TD = torch.randn(21, 32)
        with_map = layer(x_TD, 3.0 * torch.randn(21, layer.cfg.n_experts), return_record=True)
        without = layer(x_TD, None, return_record=True)
    assert torch.equal(with_map.record.topk_ids, without.record.topk_ids)
    assert torch.equal(with_map.y, without.y)


def test_zero_gate_maps_equal_no_residual_in_the_model():
    model = MoEDecoderLM(model_preset("tiny")).eval()
    with torch.no_grad():
        for layer in model.moe_layers:
            layer.router.gate_map.weight.zero_()
        ids_BS = torch.randint(0, model.cfg.vocab_size, (2, 12))
        assert torch.equal(model(ids_BS).logits, model(ids_BS, gating_residual=False).logits)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_every_backend_gives_the_same_output_on_the_same_routing(dtype):
    cfg = MoEConfig(d_model=48, d_expert=80, n_ffn=8, n_constant=6, capacity_factor=0.9)
    layer = make_layer(cfg, dtype)
    T = 45
    x_TD = torch.randn(T, cfg.d_model).to(dtype)
    ids_TK = torch.stack([torch.randperm(cfg.n_experts)[:2] for _ in range(T)])
    gates_TK = torch.rand(T, 2)
    with torch.no_grad():
        results = {b: dispatch_combine(x_TD, ids_TK, gates_TK, layer.ffn, layer.zc, cfg, b) for b in BACKENDS}
    y0, plan0 = results["sorted"]
    assert plan0.dropped_TK.any()
    for backend, (y, plan) in results.items():
        assert torch.equal(plan.dropped_TK, plan0.dropped_TK)
        # Backends differ only in summation order: float32 agrees to rounding; bf16 rounding differs per op.
        assert_close(y, y0, dtype, f"{backend} vs sorted")


# Losses ------------------------------------------------------------------------------------------------------
def _random_routing(T, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs_TN = torch.softmax(2.0 * torch.randn(T, cfg.n_experts, generator=g), dim=1)
    ids_TK = probs_TN.topk(cfg.top_k, dim=1).indices
    return probs_TN, ids_TK


@pytest.mark.parametrize("tau", [0.1, 0.75, 1.0])
def test_balance_loss_matches_its_definition(tau):
    cfg = MoEConfig(d_model=16, d_expert=16, n_ffn=8, n_constant=6, tau=tau)
    probs_TN, ids_TK = _random_routing(40, cfg)
    assert math.isclose(heterogeneous_balance_loss(probs_TN, ids_TK, cfg).item(),
                        balance_loss(probs_TN, ids_TK, cfg).item(), rel_tol=1e-6)
    valid_T = torch.rand(40) > 0.3  # padding must leave both f_i and P_i
    assert math.isclose(heterogeneous_balance_loss(probs_TN, ids_TK, cfg, valid_T).item(),
                        balance_loss(probs_TN, ids_TK, cfg, valid_T).item(), rel_tol=1e-6)


def test_layer_reports_the_balance_loss_of_its_routing():
    layer = make_layer(MoEConfig(d_model=32, d_expert=48, n_ffn=6, gate_mode="official", logits_norm=True))
    x_TD = torch.randn(30, 32)
    out = layer(x_TD)
    ref = moe_forward(layer, x_TD)
    assert math.isclose(out.balance_loss.item(), balance_loss(ref.probs_TN, ref.topk_ids_TK, layer.cfg).item(),
                        rel_tol=1e-5)
    assert out.balance_loss.requires_grad  # it trains the router through P_i


def _loss_at_ffn_share(share: float, cfg: MoEConfig, T: int = 600) -> float:
    """The balance loss of a routing that sends `share` of the slots to FFN experts, spread evenly within
    each kind, with router probabilities that agree with it."""
    S = T * cfg.top_k
    n_ffn_slots = round(share * S)
    slot_S = torch.arange(S)
    ids_S = torch.where(slot_S < n_ffn_slots, slot_S % cfg.n_ffn, cfg.n_ffn + slot_S % cfg.n_zc)
    p_N = torch.cat([torch.full((cfg.n_ffn,), share / cfg.n_ffn), torch.full((cfg.n_zc,), (1 - share) / cfg.n_zc)])
    return heterogeneous_balance_loss(p_N.expand(T, -1), ids_S.view(T, cfg.top_k), cfg).item()


@pytest.mark.parametrize("tau", [0.1, 0.25, 0.5, 0.75, 1.0])
def test_balance_loss_is_minimised_at_the_ffn_share_rho(tau):
    cfg = MoEConfig(d_model=16, d_expert=16, n_ffn=8, tau=tau)
    shares = [i / 100 for i in range(1, 100)]
    losses = [_loss_at_ffn_share(s, cfg) for s in shares]
    best = shares[losses.index(min(losses))]
    # L(s) = K s^2 / N_FFN + tau K (1-s)^2 / N_ZC, whose minimum is rho = tau N_FFN / (tau N_FFN + N_ZC).
    assert abs(best - cfg.rho) <= 0.011, (best, cfg.rho)


def test_tau_scales_only_the_zc_terms():
    cfg = MoEConfig(d_model=16, d_expert=16, n_ffn=8, n_constant=2, tau=1.0)
    probs_TN, ids_TK = _random_routing(50, cfg, seed=3)
    f_N = torch.bincount(ids_TK.reshape(-1), minlength=cfg.n_experts) / 50
    fp_N = f_N * probs_TN.mean(0)
    ffn_part, zc_part = fp_N[: cfg.n_ffn].sum().item(), fp_N[cfg.n_ffn :].sum().item()
    assert zc_part > 0
    for tau in (1.0, 0.5, 0.1):
        loss = heterogeneous_balance_loss(probs_TN, ids_TK, cfg.replace(tau=tau)).item()
        assert math.isclose(loss, ffn_part + tau * zc_part, rel_tol=1e-6)


def test_z_loss_by_hand():
    # Row 1: logsumexp(0, 0) = ln 2. Row 2: logsumexp(ln 3, 0) = ln 4 = 2 ln 2. Mean of squares: 2.5 (ln 2)^2.
    logits_TN = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert math.isclose(router_z_loss(logits_TN).item(), 2.5 * math.log(2) ** 2, rel_tol=1e-6)
    # The padding row is left out.
    assert math.isclose(router_z_loss(logits_TN, torch.tensor([True, False])).item(), math.log(2) ** 2,
                        rel_tol=1e-6)

