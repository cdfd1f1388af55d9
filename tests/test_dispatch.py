"""Every dispatch backend against the slow reference (moepp.reference): outputs, routing, drops and gradients."""

from __future__ import annotations

import pytest
import torch

from moepp import BACKENDS, MoEConfig
from moepp.dispatch import dispatch_combine
from moepp.reference import ReferenceParams, combine, moe_forward
from moe_testing import assert_close, grad_targets, grads, make_layer

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPES = (torch.float32, torch.bfloat16)

# D and H are multiples of 16 (torch._grouped_mm needs 16-byte-aligned strides) but odd multiples where it
# matters (48 = 3*16, 80 = 5*16, 112 = 7*16); T is 1 or not a multiple of anything.
CASES = {
    "T1-linear-paper": dict(T=1, cfg=dict(d_model=32, d_expert=48, n_ffn=4)),
    "T37-mlp-official-norm-xK": dict(T=37, prev=True, cfg=dict(
        d_model=48, d_expert=80, n_ffn=6, router="mlp", router_mult=4, gate_mode="official", logits_norm=True,
        logits_norm_std=1.5, scale_input_by_k=True)),
    "T50-mixtral-drops-residual": dict(T=50, prev=True, cfg=dict(
        d_model=48, d_expert=112, n_ffn=4, gate_mode="mixtral", capacity_factor=0.5)),
    "T64-2B-mix-drops-xK": dict(T=64, prev=True, cfg=dict(
        d_model=32, d_expert=80, n_ffn=8, n_zero=1, n_copy=1, n_constant=6, capacity_factor=1.0,
        scale_input_by_k=True)),
    "T23-official-top3-token-capacity": dict(T=23, cfg=dict(
        d_model=48, d_expert=48, n_ffn=5, top_k=3, gate_mode="official", capacity_factor=0.8,
        capacity_base="tokens")),
    "T41-paper-no-residual": dict(T=41, prev=True, cfg=dict(d_model=32, d_expert=48, n_ffn=4,
                                                             gating_residual=False)),
}


def _inputs(layer, T, dtype, prev):
    cfg = layer.cfg
    x_TD = torch.randn(T, cfg.d_model).to(dtype).requires_grad_(True)
    prev_TN = (2.0 * torch.randn(T, cfg.n_experts)) if prev else None
    dy_TD = torch.randn(T, cfg.d_model)
    return x_TD, prev_TN, dy_TD


def _check_against_reference(layer, x_TD, prev_TN, dy_TD, dtype, backend):
    out = layer(x_TD, prev_TN, return_record=True, backend=backend)
    ref = moe_forward(layer, x_TD, prev_TN)
    rec = out.record

    # Routing decisions are exact: same experts, same drops, same counts.
    assert torch.equal(rec.topk_ids, ref.topk_ids_TK)
    assert torch.equal(rec.dropped, ref.dropped_TK)
    assert torch.equal(rec.expert_counts, ref.expert_counts_N)
    assert out.n_dropped.item() == int(ref.dropped_TK.sum())
    # Gates and logits come from the float32 router in both: float32 tolerance whatever the model dtype.
    assert_close(rec.logits, ref.logits_TN, torch.float32, "router logits")
    assert_close(rec.gates, ref.gates_TK, torch.float32, "gates")

    assert out.y.dtype == dtype
    assert_close(out.y, ref.y_TD, dtype, f"{backend} output")
    targets = {"x": x_TD, **grad_targets(layer)}
    got, want = grads(out.y, dy_TD, targets), grads(ref.y_TD, dy_TD, targets)
    for name in targets:
        assert_close(got[name], want[name] if want[name] is not None else torch.zeros_like(targets[name]),
                     dtype, f"{backend} d/d{name}")
    return out, ref, got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_reference(case, backend, dtype):
    spec = CASES[case]
    layer = make_layer(MoEConfig(**spec["cfg"]), dtype)
    x_TD, prev_TN, dy_TD = _inputs(layer, spec["T"], dtype, spec.get("prev", False))
    out, ref, _ = _check_against_reference(layer, x_TD, prev_TN, dy_TD, dtype, backend)
    if layer.cfg.capacity_factor is not None and spec["T"] > 1:
        assert ref.dropped_TK.any(), "the capacity cases must actually drop slots"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ffn_experts_without_tokens(backend, dtype):
    """The first, a middle and the last FFN expert get no tokens: the gating residual pushes them far down."""
    cfg = MoEConfig(d_model=48, d_expert=80, n_ffn=6)
    layer = make_layer(cfg, dtype)
    empty = [0, 3, 5]
    with torch.no_grad():
        layer.router.gate_map.weight.copy_(torch.eye(cfg.n_experts))
    x_TD, _, dy_TD = _inputs(layer, 29, dtype, prev=False)
    prev_TN = torch.zeros(29, cfg.n_experts)
    prev_TN[:, empty] = -100.0
    out, _, got = _check_against_reference(layer, x_TD, prev_TN, dy_TD, dtype, backend)
    assert out.record.expert_counts[empty].eq(0).all()
    assert out.record.expert_counts[: cfg.n_ffn].sum() > 0, "the other FFN experts must still get tokens"
    for name in ("w_up", "w_down"):
        assert got[name][empty].eq(0).all(), f"{name}: an expert without tokens must get an exactly zero gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_slot_reaches_an_ffn_expert(backend):
    """All slots on zero-computation experts: no FFN rows at all (an empty grouped matmul)."""
    cfg = MoEConfig(d_model=32, d_expert=48, n_ffn=4)
    layer = make_layer(cfg)
    T = 9
    x_TD = torch.randn(T, cfg.d_model, requires_grad=True)
    zc_ids = torch.tensor(list(range(cfg.n_ffn, cfg.n_experts)))
    ids_TK = torch.stack([zc_ids[torch.arange(T) % len(zc_ids)], zc_ids[(torch.arange(T) + 1) % len(zc_ids)]], 1)
    gates_TK = torch.rand(T, 2)
    y_TD, plan = dispatch_combine(x_TD, ids_TK, gates_TK, layer.ffn, layer.zc, cfg, backend)
    assert plan.counts_N1[: cfg.n_ffn].eq(0).all()
    want_TD = combine(x_TD, ids_TK, gates_TK, ReferenceParams.from_layer(layer), cfg)
    assert_close(y_TD, want_TD, torch.float32, f"{backend} output")
    dy_TD = torch.randn(T, cfg.d_model)
    got = grads(y_TD, dy_TD, {"x": x_TD, "const_v": layer.zc.const_v, "const_wc": layer.zc.const_wc})
    want = grads(want_TD, dy_TD, {"x": x_TD, "const_v": layer.zc.const_v, "const_wc": layer.zc.const_wc})
    for name in got:
        assert_close(got[name], want[name], torch.float32, f"{backend} d/d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_of_a_plain_sum(backend):
    """loss = y.sum() sends an expanded (stride-0) gradient into the backward; every backend must take it."""
    cfg = MoEConfig(d_model=48, d_expert=80, n_ffn=4, capacity_factor=1.0)
    layer = make_layer(cfg)
    x_TD = torch.randn(31, cfg.d_model, requires_grad=True)
    layer(x_TD, backend=backend).y.sum().backward()
    ref_x = x_TD.detach().clone().requires_grad_(True)
    want = grads(moe_forward(layer, ref_x).y_TD.sum(), torch.ones(()), {"x": ref_x, "w_up": layer.ffn.w_up})
    assert_close(x_TD.grad, want["x"], torch.float32, f"{backend} d/dx")
    assert_close(layer.ffn.w_up.grad, want["w_up"], torch.float32, f"{backend} d/dw_up")


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_drop_priority(backend):
    """First choices are served before any second choice, earlier tokens first, per-type capacities."""
    cfg = MoEConfig(d_model=32, d_expert=48, n_ffn=4, capacity_factor=0.5)
    T = 10
    c_ffn, c_zc = cfg.capacities(T)
    assert (c_ffn, c_zc) == (2, 2)  # ceil(0.5 * 0.75 * 20 / 7) and ceil(0.5 * 20 / 7)
    layer = make_layer(cfg)
    # Every token: first choice FFN expert 0, second choice the copy expert.
    copy = cfg.type_range("copy").start
    ids_TK = torch.tensor([[0, copy]] * T)
    # Token 9 puts the copy expert first: it must win a copy slot over every token's second choice.
    ids_TK[9] = torch.tensor([copy, 1])
    gates_TK = torch.full((T, 2), 0.5)
    x_TD = torch.randn(T, cfg.d_model)
    _, plan = dispatch_combine(x_TD, ids_TK, gates_TK, layer.ffn, layer.zc, cfg, backend)
    want = torch.zeros(T, 2, dtype=torch.bool)
    want[2:9, 0] = True  # expert 0 keeps tokens 0 and 1
    want[1:9, 1] = True  # copy: token 9 (first choice) then token 0 (first second choice)
    assert torch.equal(plan.dropped_TK, want)
    assert plan.counts_N1[-1].item() == int(want.sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_official_gate_gives_the_other_expert_weight_one(backend):
    """official mode: a token whose top-2 holds the zero expert gets gate exactly 1 on its other expert."""
    cfg = MoEConfig(d_model=32, d_expert=48, n_ffn=4, gate_mode="official")
    layer = make_layer(cfg)
    zero = cfg.type_range("zero").start
    with torch.no_grad():
        layer.router.gate_map.weight.copy_(torch.eye(cfg.n_experts))
    T = 13
    prev_TN = torch.zeros(T, cfg.n_experts)
    prev_TN[:, zero] = 10.0  # the zero expert is everyone's first choice
    x_TD = torch.randn(T, cfg.d_model)
    out = layer(x_TD, prev_TN, return_record=True, backend=backend)
    rec = out.record
    assert rec.topk_ids[:, 0].eq(zero).all()
    assert rec.gates[:, 0].eq(0).all() and rec.gates[:, 1].eq(1).all()
    ref = moe_forward(layer, x_TD, prev_TN)
    assert_close(out.y, ref.y_TD, torch.float32, "output")


def test_official_gate_renormalises_even_when_the_other_gate_is_tiny():
    """A logit gap of ~100 (reachable without logits normalisation) leaves the other expert a subnormal
    probability; dividing by the sum still gives exactly 1, as the official code does."""
    from moepp.router import gate

    cfg = MoEConfig(d_model=32, d_expert=48, n_ffn=4, gate_mode="official")
    zero = cfg.type_range("zero").start
    logits_TN = torch.zeros(3, cfg.n_experts)
    logits_TN[:, zero] = torch.tensor([20.0, 90.0, 100.0])
    g = gate(logits_TN, cfg)
    assert g.topk_ids_TK[:, 0].eq(zero).all()
    assert g.gates_TK[:, 1].eq(1).all(), g.gates_TK
