"""Expert parallelism (moepp.parallel) against the single-process layer, on 2 and 4 gloo ranks, and the launcher's
failure handling. Each launch runs all its checks inside the ranks and returns numbers the test asserts on."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from moepp import MoEConfig, MoELayer
from moepp.parallel import ExpertParallelMoE, allreduce_replicated_grads
from moepp_bench.measure.launch import RankFailure, run_local

T_RANK = 24  # tokens per rank
CONFIGS = {
    # official gates (zero expert's gate 0, renormalised), expert input x K, linear router
    "official": MoEConfig(d_model=32, d_expert=48, n_ffn=8, tau=0.5, gate_mode="official", scale_input_by_k=True),
    # paper gates, two-layer router, more constant experts
    "paper-mlp": MoEConfig(d_model=32, d_expert=40, n_ffn=8, n_constant=3, router="mlp", router_mult=2),
    "vanilla": MoEConfig(d_model=32, d_expert=48, n_ffn=8).vanilla(),
}


def _max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """Max difference relative to b's largest entry; a missing gradient counts as zeros."""
    if a is None and b is None:
        return 0.0
    a = torch.zeros_like(b) if a is None else a.detach()
    b = torch.zeros_like(a) if b is None else b.detach()
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max()) / max(1e-12, float(b.abs().max()))


def _compare(cfg: MoEConfig, rank: int, P: int) -> dict:
    """One config: EP forward and gradients vs the single-process layer on all ranks' tokens."""
    torch.manual_seed(1234)  # same weights and data on every rank
    layer = MoELayer(cfg)
    N = cfg.n_experts
    x_all = torch.randn(P * T_RANK, cfg.d_model, requires_grad=True)
    prev_all = torch.randn(P * T_RANK, N)  # a previous layer's logits: exercises the gating residual
    w_all = torch.randn(P * T_RANK, cfg.d_model)  # loss = sum(y * w): every output element gets its own weight
    ref = layer(x_all, prev_all, return_record=True)
    (ref.y * w_all).sum().backward()

    ep = ExpertParallelMoE.from_layer(layer)
    mine = slice(rank * T_RANK, (rank + 1) * T_RANK)
    x = x_all.detach()[mine].clone().requires_grad_()
    out = ep(x, prev_all[mine])
    (out.y * w_all[mine]).sum().backward()
    allreduce_replicated_grads(ep)

    lo, hi = ep.first_expert, ep.first_expert + ep.experts_per_rank
    diffs = {
        "y": _max_diff(out.y, ref.y[mine]),
        "x.grad": _max_diff(x.grad, x_all.grad[mine]),
        "w_up.grad": _max_diff(ep.ffn.w_up.grad, layer.ffn.w_up.grad[lo:hi]),
        "w_down.grad": _max_diff(ep.ffn.w_down.grad, layer.ffn.w_down.grad[lo:hi]),
    }
    for name, p in [*ep.router.named_parameters(prefix="router"), *ep.zc.named_parameters(prefix="zc")]:
        ref_p = layer.get_parameter(name)
        diffs[f"{name}.grad"] = _max_diff(p.grad, ref_p.grad)
    # Forced routing: the single-process routing injected, without the router.
    with torch.no_grad():
        forced = ep(x.detach(), topk_ids_TK=ref.record.topk_ids[mine], gates_TK=ref.record.gates[mine])
    diffs["y forced"] = _max_diff(forced.y, ref.y[mine])
    same_routing = bool(torch.equal(out.logits_TN.argsort(1)[:, -cfg.top_k:].sort(1).values,
                                    ref.record.topk_ids[mine].sort(1).values))
    sent, received = out.plan.remote_rows(rank)
    return {"diffs": diffs, "same_routing": same_routing, "sent": sent, "received": received,
            "ffn_slots": int((ref.record.topk_ids[mine] < cfg.n_ffn).sum()),
            "send_splits": out.plan.send_splits, "recv_splits": out.plan.recv_splits}


def _layer_checks(rank: int, P: int, payload, report) -> dict:
    results = {name: _compare(cfg, rank, P) for name, cfg in CONFIGS.items()}
    report("compared")
    # Capacity is applied per rank, to the rank's own tokens: equal to the single layer on that rank's tokens.
    cfg = CONFIGS["official"].replace(capacity_factor=1.0)
    torch.manual_seed(99)
    layer = MoELayer(cfg)
    x = torch.randn(T_RANK, cfg.d_model) * (1 + rank)  # every rank different
    with torch.no_grad():
        cap = _max_diff(ExpertParallelMoE.from_layer(layer)(x).y, layer(x).y)
    try:
        ExpertParallelMoE(cfg.replace(n_ffn=7))
        uneven = "accepted"
    except ValueError as exc:
        uneven = str(exc)
    return {"configs": results, "capacity": cap, "uneven": uneven}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"P{p}")
def layer_run(request):
    P = request.param
    return P, run_local(_layer_checks, P, stall_timeout_s=120)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_gradients_match_single_process(layer_run, name):
    P, results = layer_run
    for rank, res in enumerate(results):
        r = res["configs"][name]
        assert r["same_routing"], f"rank {rank}: EP routed differently from the single-process layer"
        for what, diff in r["diffs"].items():
            assert diff < 2e-5, f"{name}, rank {rank} of {P}: {what} differs by {diff:.2e} (relative)"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_split_sizes_are_consistent_across_ranks(layer_run, name):
    P, results = layer_run
    send = [res["configs"][name]["send_splits"] for res in results]
    recv = [res["configs"][name]["recv_splits"] for res in results]
    # What rank p sends to rank q is what q receives from p, and every FFN slot is sent exactly once.
    assert all(send[p][q] == recv[q][p] for p in range(P) for q in range(P))
    for rank, res in enumerate(results):
        assert sum(send[rank]) == res["configs"][name]["ffn_slots"]
    if name == "vanilla":
        assert all(sum(s) == T_RANK * CONFIGS[name].top_k for s in send)


def test_capacity_is_per_rank_and_uneven_sharding_is_refused(layer_run):
    P, results = layer_run
    for res in results:
        assert res["capacity"] < 2e-5
        assert "cannot be sharded evenly" in res["uneven"] and "n_ffn=7" in res["uneven"]


# Failure handling ------------------------------------------------------------------------------------------
def _fail_on_rank_1(rank: int, P: int, how: str, report) -> int:
    t = torch.ones(4)
    dist.all_reduce(t)  # everyone is up
    report("up")
    if rank == 1:
        if how == "raise":
            raise RuntimeError("injected failure")
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "exit":
            os._exit(3)
    dist.all_reduce(t)  # the others wait here for rank 1
    return rank


@pytest.mark.parametrize("how, reason", [("raise", "RuntimeError: injected failure"),
                                         ("kill", "killed by signal 9"),
                                         ("exit", "exited with code 3")])
def test_a_failing_rank_stops_the_run_naming_it(how, reason):
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_local(_fail_on_rank_1, 2, how, stall_timeout_s=60)
    assert info.value.rank == 1
    assert str(info.value).startswith("rank 1 failed: ") and reason in str(info.value)
    assert "\n" not in str(info.value)
    assert time.monotonic() - start < 20  # bounded by the poll and grace periods, not by the 60 s stall timeout


def _stall_on_rank_1(rank: int, P: int, payload, report) -> int:
    report("up")
    if rank == 1:
        time.sleep(600)
    return rank


def test_a_silent_rank_is_named_after_the_stall_timeout():
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"^rank 1 failed: no progress for 2 s"):
        run_local(_stall_on_rank_1, 2, stall_timeout_s=2)
    assert time.monotonic() - start < 20
