"""`moepp-bench flops`: hand-computed FLOPs of the tiny layer, the FlopCounterMode cross-check, the MoE++/vanilla
FFN ratio, the result files, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import csv
import json
import re
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moepp import model_preset, save_pretrained
from moepp.config import layer_preset
from moepp.layer import MoELayer
from moepp.model import MoEDecoderLM
from moepp_bench.app import main
from moepp_bench.measure.flops import (COMPONENTS, SlotCounts, analytic_layer_costs, measure_layer_flops,
                                      _grouped_mm_flop)
from moepp_bench.measure.memory import estimate_layer_memory
from moepp_bench.measure.routing_gen import generate_routing, write_routing_file

pytestmark = pytest.mark.usefixtures("single_thread")

REQUIRED_COLUMNS = {"model", "preset", "layer", "tau", "tokens", "dtype", "backend", "routing", "pass", "component",
                    "flops", "counted_flops", "flops_rel_diff", "weight_bytes", "gather_bytes", "combine_bytes",
                    "activated_params_per_token", "ffn_slot_fraction", "ffn_flops_ratio_vs_vanilla"}


def tiny_hand_routing(T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiny layer (experts 0-3 FFN, 4-5 constant, 6 copy, 7 zero): token t picks FFN expert t % 4 and ZC expert
    4 + t % 4, so T FFN slots, T/2 constant, T/4 copy and T/4 zero slots."""
    t = torch.arange(T)
    ids = torch.stack([t % 4, 4 + t % 4], dim=1)
    return ids, torch.full((T, 2), 0.5)


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["moepp-bench", "flops", *args])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


# Hand-computed counts ----------------------------------------------------------------------------------------
def test_tiny_layer_by_hand():
    cfg = layer_preset("tiny")  # D=64, H=96, 4 FFN + 2 constant + 1 copy + 1 zero, K=2, linear router
    assert (cfg.d_model, cfg.d_expert, cfg.n_experts, cfg.n_constant) == (64, 96, 8, 2)
    T = 64
    ids, _ = tiny_hand_routing(T)
    costs = analytic_layer_costs(cfg, SlotCounts.from_routing(ids, cfg), residual=True, backend="sorted",
                                 dtype=torch.float32, backward=True)
    fwd = {c: costs[("forward", c)] for c in COMPONENTS}
    # router: logits 64x64 @ 64x8, plus the gating residual 64x8 @ 8x8; 2 FLOPs per multiply-add.
    assert fwd["router"].flops == 2 * 64 * 64 * 8 + 2 * 64 * 8 * 8 == 73_728
    # FFN: 64 slots, each up-projection 64 -> 192 and down-projection 96 -> 64.
    assert fwd["ffn_experts"].flops == 64 * (2 * 64 * 192 + 2 * 96 * 64) == 2_359_296
    # Constant experts: [a1, a2] of both constant experts (64 -> 4) for each of the 32 constant rows, then
    # the per-token coefficients of v applied as one [64 tokens x 2] @ [2 x 64] matmul.
    assert fwd["constant_experts"].flops == 32 * 2 * 64 * 4 + 2 * 64 * 2 * 64 == 32_768
    # Copy experts add x scaled by the gate: no matmul. Zero experts: nothing at all.
    assert fwd["copy_experts"].flops == 0
    assert fwd["zero_experts"].flops == 0
    for c in COMPONENTS:
        assert costs[("backward", c)].flops == 2 * fwd[c].flops
    # Bytes (float32): FFN gather moves 64 rows in and out, combine 5 row passes + gate + index per row.
    assert fwd["ffn_experts"].gather_bytes == 64 * (2 * 64 * 4 + 8)
    assert fwd["ffn_experts"].combine_bytes == 64 * (5 * 64 * 4 + 4 + 8)
    assert fwd["zero_experts"].gather_bytes == 0 and fwd["zero_experts"].combine_bytes == 0
    assert fwd["copy_experts"].gather_bytes == 0  # copy slots never materialise rows
    # The y += cx * x pass over [T, D] (3 passes of T*D*4 bytes) is split 32:16 between constant and copy.
    assert fwd["copy_experts"].combine_bytes == 3 * 64 * 64 * 4 // 3
    assert fwd["ffn_experts"].weight_bytes == 4 * 3 * 64 * 96 * 4  # all four experts have rows
    assert fwd["router"].weight_bytes == (64 * 8 + 8 * 8) * 4
    # Activated parameters per token: one FFN expert (3*D*H) and half a constant expert (3*D) on average.
    assert fwd["ffn_experts"].params_per_token == 3 * 64 * 96
    assert fwd["constant_experts"].params_per_token == 0.5 * 3 * 64


@pytest.mark.parametrize("backend", ["sorted", "loop", "padded", "grouped_mm"])
def test_counted_matches_analytic_per_component(backend):
    cfg = layer_preset("tiny")
    layer = MoELayer(cfg)
    ids, gates = tiny_hand_routing(64)
    lf = measure_layer_flops(layer, cfg, ids, gates, labels={}, prev_logits_TN=None, residual=True,
                             backend=backend, dtype=torch.float32, backward=True)
    for phase in ("forward", "backward"):
        for comp in COMPONENTS:
            assert lf.counted.get((phase, comp), 0) == lf.costs[(phase, comp)].flops, (backend, phase, comp)
        total = sum(lf.costs[(phase, c)].flops for c in COMPONENTS)
        assert lf.counted_totals[phase] == total
    if backend == "loop":  # constant expert c computes only its own coefficients: 2*D*2 per constant row
        assert lf.costs[("forward", "constant_experts")].flops == 32 * 2 * 64 * 2
        assert lf.costs[("forward", "copy_experts")].flops == 0
    if backend == "padded":  # every FFN expert padded to the largest count (16 each here: no padding)
        assert lf.costs[("forward", "ffn_experts")].flops == 64 * 6 * 64 * 96


@pytest.mark.parametrize("spec", ["balanced", "zipf:1.5", "forced:0.7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_check_within_one_percent(spec, dtype):
    cfg = layer_preset("tiny", tau=0.5)
    layer = MoELayer(cfg).to(dtype)
    ids, gates = generate_routing(spec, cfg, 200, seed=2)
    for backend in ("sorted", "grouped_mm", "padded"):
        lf = measure_layer_flops(layer, cfg, ids, gates, labels={}, prev_logits_TN=None, residual=True,
                                 backend=backend, dtype=dtype, backward=True)
        for phase in ("forward", "backward"):
            analytic = sum(lf.costs[(phase, c)].flops for c in COMPONENTS)
            assert abs(lf.counted_totals[phase] - analytic) <= 0.01 * analytic


def test_padded_counts_the_padding():
    cfg = layer_preset("tiny")
    ids = torch.tensor([[0, 1]] * 10 + [[2, 4]] * 2)  # expert 0 and 1 get 10 rows, expert 2 two, expert 3 none
    costs = analytic_layer_costs(cfg, SlotCounts.from_routing(ids, cfg), residual=False, backend="padded",
                                 dtype=torch.float32, backward=False)
    assert costs[("forward", "ffn_experts")].flops == 4 * 10 * 6 * 64 * 96  # 4 experts x 10 rows, not 22 rows


def test_grouped_mm_formula():
    offs = torch.tensor([3, 7, 9], dtype=torch.int32)
    a, w = torch.randn(10, 8), torch.randn(3, 8, 16)
    assert _grouped_mm_flop(a, w, offs) == 2 * 9 * 8 * 16  # rows past offs[-1] are not computed
    assert _grouped_mm_flop(torch.randn(16, 10), torch.randn(10, 8), offs) == 2 * 16 * 9 * 8
    with FlopCounterMode(display=False) as counter:  # registered, so FlopCounterMode counts it too
        torch._grouped_mm(a, w, offs=offs)
    assert counter.get_total_flops() == 2 * 9 * 8 * 16


def test_router_mlp_and_no_residual():
    cfg = layer_preset("tiny", router="mlp", router_mult=8)
    layer = MoELayer(cfg)
    ids, gates = tiny_hand_routing(32)
    lf = measure_layer_flops(layer, cfg, ids, gates, labels={}, prev_logits_TN=None, residual=False,
                             backend="sorted", dtype=torch.float32, backward=False)
    assert lf.costs[("forward", "router")].flops == 32 * (2 * 64 * 64 + 2 * 64 * 8)
    assert lf.counted[("forward", "router")] == lf.costs[("forward", "router")].flops
    assert ("backward", "router") not in lf.costs


# The command -------------------------------------------------------------------------------------------------
def test_command_files_ratio_and_schema(tmp_path, monkeypatch, capsys):
    out = tmp_path / "flops"
    code, stdout, _ = run_cli(monkeypatch, capsys, "--preset", "tiny", "--tokens", "96", "--tau", "0.25",
                              "--tau", "1.0", "--out", str(out), "--format", "json")
    assert code == 0
    doc = json.loads((out / "flops.json").read_text())
    assert doc["schema"] == "moepp-bench/flops" and doc["schema_version"] == 1
    assert {"command", "git_revision", "torch", "dtype", "seed"} <= set(doc["provenance"])
    assert json.loads(stdout)["rows"] == doc["rows"]
    with open(out / "flops.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert REQUIRED_COLUMNS <= set(csv_rows[0])
    assert len(csv_rows) == len(doc["rows"]) == 3 * 2 * (len(COMPONENTS) + 1)  # moe + 2 taus, 2 passes

    rows = doc["rows"]
    vanilla = {r["pass"]: r for r in rows if r["model"] == "moe" and r["component"] == "ffn_experts"}
    for r in rows:
        if r["component"] == "total" and r["counted_flops"] is not None:
            assert abs(r["flops_rel_diff"]) <= 0.01
        if r["model"] == "moepp" and r["component"] == "ffn_experts":
            # The paper's complexity table: MoE++ FFN FLOPs / vanilla FFN FLOPs = realised FFN slot fraction.
            ratio = r["flops"] / vanilla[r["pass"]]["flops"]
            assert ratio == pytest.approx(r["ffn_slot_fraction"], rel=1e-12)
            assert r["ffn_flops_ratio_vs_vanilla"] == pytest.approx(ratio, rel=1e-12)
            assert r["ffn_slot_fraction"] == pytest.approx(r["rho"], abs=1 / (96 * 2))
    assert {r["tau"] for r in rows if r["model"] == "moepp"} == {0.25, 1.0}


def test_command_table_shows_analytic_and_counted(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    code, stdout, stderr = run_cli(monkeypatch, capsys, "--preset", "tiny", "--tokens", "64", "--tau", "0.5",
                                   "--no-backward", "--out", str(tmp_path))
    assert code == 0
    assert "fwd cnt" in stdout and "diff %" in stdout and "FFN ratio" in stdout
    assert "random activations" in stdout
    assert (tmp_path / "flops.csv").is_file() and "wrote" in stderr


def test_command_on_a_checkpoint(tmp_path, monkeypatch, capsys):
    ckpt = save_pretrained(MoEDecoderLM(model_preset("tiny")), tmp_path / "ckpt")
    out = tmp_path / "out"
    code, stdout, _ = run_cli(monkeypatch, capsys, "--checkpoint", str(ckpt), "--tokens", "40", "--out", str(out),
                              "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(open(out / "flops.csv", newline="")))
    moepp_rows = [r for r in rows if r["model"] == "moepp"]
    assert {r["layer"] for r in moepp_rows} == {"0", "1"}
    assert all("random token ids" in r["input"] for r in moepp_rows)
    # Layer 0 has no previous layer, so no gating residual; layer 1 has one.
    assert {r["gating_residual"] for r in moepp_rows if r["layer"] == "0"} == {"False"}
    assert {r["gating_residual"] for r in moepp_rows if r["layer"] == "1"} == {"True"}
    for r in rows:
        assert int(r["counted_flops"]) == int(r["flops"]), (r["layer"], r["pass"], r["component"])
        if r["model"] == "moepp" and r["component"] == "ffn_experts":
            assert float(r["ffn_flops_ratio_vs_vanilla"]) == pytest.approx(float(r["ffn_slot_fraction"]))
    assert stdout.startswith("model,preset,checkpoint,layer")


# Bad input ---------------------------------------------------------------------------------------------------
def _replay_of_another_layer(tmp_path):
    ids, _ = generate_routing("balanced", layer_preset("2b"), 16)
    return "replay:" + str(write_routing_file(tmp_path / "rec", [ids], layer_preset("2b")))


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "unknown preset"),
    (["--preset", "tiny", "--tau", "0"], "--tau must be > 0"),
    (["--preset", "tiny", "--tau", "-0.5"], "--tau must be > 0"),
    (["--preset", "tiny", "--tokens", "0"], "--tokens must be positive"),
    (["--preset", "tiny", "--tokens", "-3"], "--tokens must be positive"),
    (["--preset", "tiny", "--routing", "REPLAY"], "recorded with 40 experts but the layer has 8"),
    (["--preset", "1b", "--tokens", str(10**9)], "needs an estimated"),
    (["--preset", "tiny", "--dtype", "float16"], "--dtype"),
    (["--preset", "tiny", "--routing", "forced:2"], r"\[0, 1\]"),
    (["--checkpoint", "CKPT", "--tau", "0.5"], "cannot be combined with --checkpoint"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, args, message):
    out = tmp_path / "out"
    args = [_replay_of_another_layer(tmp_path) if a == "REPLAY" else str(tmp_path) if a == "CKPT" else a
            for a in args]
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args, "--out", str(out))
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert re.search(message, lines[0]), lines[0]
    assert stdout == ""
    assert not out.exists()


def test_memory_refusal_names_the_estimate(tmp_path, monkeypatch, capsys):
    cfg = layer_preset("1b")
    estimate = estimate_layer_memory(cfg, 10**9, "float32", True)
    code, _, stderr = run_cli(monkeypatch, capsys, "--preset", "1b", "--tokens", str(10**9), "--out",
                              str(tmp_path / "o"))
    assert code == 2
    assert f"{estimate / 2**40:.1f} TiB" in stderr


def test_memory_estimate_grows_with_work():
    cfg = layer_preset("1b")
    f32 = estimate_layer_memory(cfg, 8192, "float32", False)
    assert estimate_layer_memory(cfg, 8192, "float32", True) > f32
    assert estimate_layer_memory(cfg, 16384, "float32", False) > f32
    assert estimate_layer_memory(cfg, 8192, "bfloat16", False) < f32
    # At least the FFN weights and the fused up-projection of every slot.
    assert f32 > cfg.n_ffn * 3 * cfg.d_model * cfg.d_expert * 4 + 8192 * 2 * 2 * cfg.d_expert * 4


def test_checkpoint_run_too_big_for_memory_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    ckpt = save_pretrained(MoEDecoderLM(model_preset("tiny")), tmp_path / "ckpt")
    out = tmp_path / "out"
    code, _, stderr = run_cli(monkeypatch, capsys, "--checkpoint", str(ckpt), "--tokens", str(10**9),
                              "--out", str(out))
    assert code == 2 and "needs an estimated" in stderr and "MemAvailable" in stderr
    assert not out.exists()
