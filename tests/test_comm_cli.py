"""`moepp-bench comm` end to end on the tiny preset: local ranks, torchrun, --predict, bad input, failing ranks."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from fractions import Fraction

import pytest
import torch
from typer.testing import CliRunner

from moepp.config import layer_preset
from moepp_bench.app import app
from moepp_bench.errors import BenchError
from moepp_bench.measure.routing_gen import write_routing_file

runner = CliRunner()
ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
REQUIRED = ("model", "world_size", "tau", "tokens_per_rank", "ffn_slot_fraction", "a2a_bytes_measured",
            "a2a_bytes_analytic", "a2a_bytes_dedup", "bytes_ratio_vs_moe", "count_exchange_ms", "dispatch_ms",
            "expert_ms", "combine_ms")
# tiny: 4 FFN + 4 ZC experts, K=2. At 64 tokens per rank, tau 1 and 3 give rho 1/2 and 3/4: 64 and 96 FFN slots
# per rank, a multiple of 4 experts, so balanced routing spreads them exactly evenly over ranks.
FAULT = "MOEPP_BENCH_COMM_FAULT"
TINY = ["--preset", "tiny", "--tokens-per-rank", "64", "--repeats", "2", "--warmup", "0"]


def _invoke(args: list[str], env: dict | None = None):
    """In this process (the ranks are still separate processes): saves importing the app and torch again."""
    return runner.invoke(app, ["comm", *args], env={"COLUMNS": "200", "NO_COLOR": "1", **(env or {})})


def _cli(args: list[str], env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """A real `moepp-bench comm` process: exit codes and what reaches stderr."""
    return subprocess.run([sys.executable, "-m", "moepp_bench.app", "comm", *args], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


@pytest.fixture(scope="module")
def balanced_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("comm")
    # Another program holds the port torchrun-style tools default to: a local run must not care.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(busy.getsockname()[1])}
        result = _invoke([*TINY, "--world-size", "2", "--world-size", "4", "--tau", "1", "--tau", "3",
                          "--out", str(out), "--format", "json"], env)
    assert result.exit_code == 0, repr(result.exception)
    return out, json.loads(result.stdout)


def test_files_and_columns(balanced_run):
    out, doc = balanced_run
    assert doc["schema"] == "moepp-bench/comm" and doc["provenance"]["launcher"] == "local processes"
    assert {p.name for p in out.iterdir()} == {"comm.csv", "comm.json", "comm.png", "comm.svg"}
    assert json.loads((out / "comm.json").read_text())["rows"] == doc["rows"]
    with open(out / "comm.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert set(REQUIRED) <= set(header)
    rows = doc["rows"]
    assert sorted((r["world_size"], r["tau"], r["model"]) for r in rows) == sorted(
        (P, tau, m) for P in (2, 4) for tau in (1.0, 3.0) for m in ("moepp", "moe"))
    for r in rows:
        assert r["tokens_per_rank"] == 64
        assert all(r[f"{p}_ms"] > 0 for p in ("count_exchange", "dispatch", "expert", "combine"))


def test_measured_bytes_equal_the_analytic_count(balanced_run):
    _, doc = balanced_run
    for r in doc["rows"]:
        assert isinstance(r["a2a_bytes_measured"], int) and r["a2a_bytes_measured"] > 0
        assert r["a2a_bytes_measured"] == r["a2a_bytes_analytic"] == r["combine_bytes_measured"]
        assert r["a2a_bytes_dedup"] <= r["a2a_bytes_analytic"]
    # The raw split sizes behind the byte columns are in the file: what p sends q, q receives from p.
    for entry in doc["split_sizes"]:
        send, recv = entry["send_splits"], entry["recv_splits"]
        P = entry["world_size"]
        assert all(send[p][q] == recv[q][p] for p in range(P) for q in range(P))


def test_ratio_is_the_ffn_slot_fraction_and_balance_is_exact(balanced_run):
    _, doc = balanced_run
    for r in doc["rows"]:
        ratio_expected = 1.0 if r["model"] == "moe" else r["ffn_slot_fraction"]
        assert r["bytes_ratio_vs_moe"] == ratio_expected
        # Balanced routing with these sizes is exactly even: measured = K rho (P-1)/P D b per token.
        assert r["a2a_bytes_measured"] == r["a2a_bytes_balance"]
        assert r["ffn_slot_fraction"] == pytest.approx({1.0: 0.5, 3.0: 0.75}[r["tau"]] if r["model"] == "moepp" else 1)


@pytest.fixture(scope="module")
def replay_run(tmp_path_factory):
    """Routing replayed from a file: skewed (random experts), dealt out to ranks in order."""
    out = tmp_path_factory.mktemp("replay")
    cfg = layer_preset("tiny")
    gen = torch.Generator().manual_seed(7)
    ids = torch.stack([torch.randperm(cfg.n_experts, generator=gen)[: cfg.top_k] for _ in range(300)])
    path = write_routing_file(out / "routing.safetensors", [ids], cfg)
    result = _invoke([*TINY, "--world-size", "2", "--tau", "0.5", "--routing", f"replay:{path}",
                      "--out", str(out / "run"), "--format", "json"])
    assert result.exit_code == 0, repr(result.exception)
    return ids, json.loads(result.stdout)


def test_replayed_routing_is_counted_exactly(replay_run):
    ids, doc = replay_run
    pp = next(r for r in doc["rows"] if r["model"] == "moepp")
    moe = next(r for r in doc["rows"] if r["model"] == "moe")
    assert pp["routing"].startswith("replay:") and moe["routing"] == "balanced"
    # Count by hand: rank r holds tokens [64r, 64r+64) of the recording and FFN experts {2r, 2r+1}.
    mine = ids[:128]
    rank_T = torch.arange(128) // 64
    remote = ((mine < 4) & (mine // 2 != rank_T[:, None])).sum().item()
    assert pp["a2a_bytes_measured"] == pp["a2a_bytes_analytic"] == remote * 64 * 2  # D = 64, bfloat16
    assert pp["ffn_slot_fraction"] == (mine < 4).sum().item() / mine.numel()
    # Skewed routing: the ratio is the FFN fraction times how much more or less often FFN slots leave the rank.
    ratio = Fraction(pp["a2a_bytes_measured"], moe["a2a_bytes_measured"])
    decomposed = Fraction(pp["ffn_slot_fraction"]) * Fraction(pp["remote_share"]) / Fraction(moe["remote_share"])
    assert float(ratio) == pytest.approx(float(decomposed), rel=1e-12)
    assert pp["bytes_ratio_vs_moe"] == pytest.approx(float(ratio), rel=1e-15)


def test_a_rank_that_raises_ends_the_run_naming_it(tmp_path):
    out = tmp_path / "run"
    start = time.monotonic()
    result = _invoke([*TINY, "--world-size", "4", "--tau", "1", "--out", str(out)], {FAULT: "2:raise"})
    assert isinstance(result.exception, BenchError)
    assert str(result.exception) == "P=4: rank 2 failed: RuntimeError: injected failure (MOEPP_BENCH_COMM_FAULT)"
    assert time.monotonic() - start < 30
    assert not out.exists()  # nothing half-written


def test_a_killed_rank_ends_the_process_with_one_line_naming_it(tmp_path):
    out = tmp_path / "run"
    start = time.monotonic()
    proc = _cli([*TINY, "--world-size", "4", "--tau", "1", "--out", str(out)], {**ENV, FAULT: "1:kill"}, timeout=60)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: P=4: rank 1 failed: killed by signal 9", proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < 45
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--world-size", "3"], "--world-size 3 does not divide the 4 FFN experts"),
    (["--world-size", "1"], "--world-size must be >= 2"),
    (["--tau", "0"], "--tau must be > 0"),
    (["--routing", "sideways"], "unknown routing 'sideways'"),
    (["--routing", "forced:1.5"], "forced share F must be in [0, 1]"),
    (["--dtype", "int8"], "--dtype must be one of"),
    (["--tokens-per-rank", "0"], "--tokens-per-rank must be >= 1"),
    (["--world-size", "64", "--preset", "7b"], "does not divide the 16 FFN experts"),
    (["--format", "xml"], "--format must be table, json or csv"),
])
def test_bad_input_is_one_error_before_anything_is_written(tmp_path, args, message):
    result = runner.invoke(app, ["comm", "--preset", "tiny", *args, "--out", str(tmp_path / "run")])
    assert isinstance(result.exception, BenchError), result.output
    assert message in str(result.exception) and "\n" not in str(result.exception)
    assert not (tmp_path / "run").exists()


def test_bad_input_exits_2_with_one_line(tmp_path):
    proc = _cli(["--preset", "tiny", "--world-size", "3", "--out", str(tmp_path / "run")], timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --world-size 3") and len(proc.stderr.strip().splitlines()) == 1


def test_predict_extrapolates_without_launching(tmp_path):
    result = runner.invoke(app, ["comm", "--predict", "--preset", "1b", "--world-size", "64", "--world-size", "256",
                                 "--tau", "0.75", "--dtype", "bfloat16", "--out", str(tmp_path), "--format", "json"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema"] == "moepp-bench/comm_predict"
    rho = 0.75 * 16 / (0.75 * 16 + 4)
    for r in doc["rows"]:
        P, share = r["world_size"], rho if r["model"] == "moepp" else 1.0
        assert r["bytes_per_token_balance"] == pytest.approx(2 * share * (P - 1) / P * 768 * 2)
        assert r["bytes_ratio_vs_moe"] == pytest.approx(share)
        # P >= E: each expert on its own rank, so a token never has two experts on one rank and dedup saves nothing.
        assert r["bytes_per_token_dedup_balance"] == pytest.approx(r["bytes_per_token_balance"])
    assert {p.name for p in tmp_path.iterdir()} >= {"comm_predict.csv", "comm_predict.json", "comm_predict.png"}


def test_under_torchrun_each_process_is_one_rank(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "moepp_bench.app", "comm", *TINY, "--tau", "1", "--out", str(out), "--format", "json"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "comm.json").read_text())
    assert doc["provenance"]["launcher"] == "torchrun" and doc["provenance"]["world_sizes"] == [2]
    assert json.loads(proc.stdout)["rows"] == doc["rows"]  # only rank 0 printed
    for r in doc["rows"]:
        assert r["a2a_bytes_measured"] == r["a2a_bytes_analytic"]
