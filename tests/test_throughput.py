"""moepp-bench throughput: the rows' arithmetic, the result files' schema, bad input, and the timer."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

from moepp_bench.app import main
from moepp_bench.measure.throughput import ThroughputSettings, layer_forward_flops, run_throughput
from moepp_bench.measure.timing import StageClock, time_interleaved

pytestmark = pytest.mark.usefixtures("single_thread")

REQUIRED_COLUMNS = {"model", "preset", "tau", "tokens", "dtype", "backend", "routing", "pass", "ffn_slot_fraction",
                    "time_ms_median", "time_ms_iqr", "tokens_per_s", "speedup", "ideal_speedup", "efficiency",
                    "gflops_per_s"}
PROVENANCE_KEYS = {"command", "git_revision", "torch", "device", "threads", "dtype", "seed", "allocator",
                   "utc_time"}


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["moepp-bench", "throughput", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tiny_settings(**changes) -> ThroughputSettings:
    base = dict(preset="tiny", tokens=(96,), taus=(0.25, 1.0), dtype="float32", backends=("sorted",),
                routing="balanced", backward=False, device="cpu", repeats=2, warmup=1, seed=0)
    base.update(changes)
    return ThroughputSettings(**base)


def test_rows_arithmetic_and_baselines():
    rows, stages = run_throughput(tiny_settings())
    assert stages == []
    by_model = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    assert set(by_model) == {"moe", "moepp", "moe-loop", "dense-ceiling"}
    moe = by_model["moe"][0]
    assert moe["speedup"] == 1.0 and moe["ffn_slot_fraction"] == 1.0 and moe["ffn_slots"] == 96 * 2
    for r in rows:
        assert r["time_ms_median"] > 0 and r["time_ms_iqr"] >= 0 and r["repeats"] == 2
        assert r["speedup"] == pytest.approx(moe["time_ms_median"] / r["time_ms_median"])
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
        assert r["tokens_per_s"] == pytest.approx(96 / r["time_ms_median"] * 1e3)
    for r in by_model["moepp"]:
        # balanced routing realises rho(tau) exactly (up to rounding of slot counts)
        from moepp.config import layer_preset

        rho = layer_preset("tiny", tau=r["tau"]).rho
        assert r["ffn_slot_fraction"] == pytest.approx(rho, abs=1 / (96 * 2))
        assert r["ideal_speedup"] == pytest.approx(moe["ffn_slots"] / r["ffn_slots"])
    assert by_model["moe-loop"][0]["ideal_speedup"] == 1.0


def test_several_backends_compare_against_their_own_vanilla():
    rows, _ = run_throughput(tiny_settings(backends=("sorted", "padded"), taus=(0.5,)))
    moe = {r["backend"]: r for r in rows if r["model"] == "moe"}
    assert set(moe) == {"sorted", "padded"}
    for r in rows:
        if r["model"] == "moepp":
            assert r["speedup"] == pytest.approx(moe[r["backend"]]["time_ms_median"] / r["time_ms_median"])
    assert sum(r["model"] == "moe-loop" for r in rows) == 1 and sum(r["model"] == "dense-ceiling" for r in rows) == 1


def test_forward_flops_by_hand():
    from moepp.config import layer_preset

    cfg = layer_preset("tiny")  # D=64, H=96, 4 FFN + 2 constant + 1 copy + 1 zero
    ids = torch.tensor([[0, 4], [1, 6], [4, 7]])  # 2 FFN slots, 2 constant slots (4 twice), 1 copy, 1 zero
    router = 2 * 3 * 64 * 8
    ffn = 2 * 6 * 64 * 96
    const = 2 * 2 * 64 * 2
    assert layer_forward_flops(cfg, 3, ids) == router + ffn + const


def test_backward_and_breakdown_run():
    rows, stages = run_throughput(tiny_settings(backward=True, breakdown=True, taus=(0.5,)))
    assert {r["pass"] for r in rows} == {"fwd+bwd"}
    names = {s["stage"] for s in stages if s["model"] == "moepp"}
    assert {"router", "sort", "gather", "expert_matmuls", "combine", "zc_experts"} <= names
    for s in stages:
        assert s["time_ms"] >= 0 and 0 <= s["share"] <= 1.0 + 1e-9


def test_command_writes_schema_and_plot(tmp_path, monkeypatch, capsys):
    out = tmp_path / "tp"
    code, stdout, _ = run_cli(monkeypatch, capsys, "--preset", "tiny", "--tokens", "64", "--tau", "0.5", "--tau",
                              "1.0", "--repeats", "2", "--warmup", "1", "--threads", "1", "--out", str(out),
                              "--format", "csv")
    assert code == 0
    with open(out / "throughput.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert REQUIRED_COLUMNS <= set(rows[0])
    assert {r["model"] for r in rows} == {"moe", "moepp", "moe-loop", "dense-ceiling"}
    doc = json.loads((out / "throughput.json").read_text())
    assert doc["schema"] == "moepp-bench/throughput" and doc["schema_version"] == 1
    assert PROVENANCE_KEYS <= set(doc["provenance"])
    assert doc["provenance"]["threads"] == 1
    assert len(doc["rows"]) == len(rows)
    assert (out / "speedup_vs_tau.png").stat().st_size > 0 and (out / "speedup_vs_tau.svg").exists()
    assert stdout.splitlines()[0].startswith("model,")  # --format csv prints the table as CSV


@pytest.mark.parametrize("args, message", [
    (["--preset", "9b"], "unknown preset"),
    (["--tau", "0"], "--tau must be > 0"),
    (["--tokens", "-5"], "--tokens must be positive"),
    (["--routing", "forced:1.5"], "forced share"),
    (["--backend", "loop"], "--backend"),
    (["--preset", "7b", "--tokens", "100000000"], "needs an estimated"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, args, message):
    out = tmp_path / "never"
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", str(out))
    assert code == 2
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_replay_of_wrong_expert_count_is_refused(tmp_path, monkeypatch, capsys):
    from moepp.config import MoEConfig
    from moepp_bench.measure.routing_gen import write_routing_file

    other = MoEConfig(d_model=8, d_expert=8, n_ffn=3)
    write_routing_file(tmp_path / "routing.safetensors", [torch.zeros(10, 2, dtype=torch.long)], other)
    code, _, err = run_cli(monkeypatch, capsys, "--preset", "tiny", "--routing", f"replay:{tmp_path}",
                           "--out", str(tmp_path / "out"))
    assert code == 2 and "experts" in err
    assert not (tmp_path / "out").exists()


def test_time_interleaved_alternates_and_counts():
    calls = []
    stats = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rounds in alternating order
    assert all(len(s.times_ms) == 3 and s.median >= 0 and s.iqr >= 0 for s in stats.values())


def test_stage_clock_collects_marks():
    clock = StageClock()
    clock.start()
    clock("first")
    clock("second")
    assert set(clock.medians()) == {"first", "second"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_with_grouped_mm(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "--preset", "tiny", "--tokens", "256", "--device", "cuda",
                           "--backend", "grouped_mm", "--cuda-graphs", "--repeats", "3", "--out", str(tmp_path))
    assert code == 0, err
    rows = json.loads((tmp_path / "throughput.json").read_text())["rows"]
    assert all(r["time_ms_median"] > 0 for r in rows)
