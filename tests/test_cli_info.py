"""`moepp-bench info` on an official fixture and on a preset; bad input exits 2 with one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from moepp import load_pretrained, model_preset
from moepp_bench.app import app
from moepp_bench.measure.params import model_params
from moe_testing import official_fixture

pytestmark = pytest.mark.usefixtures("single_thread")

runner = CliRunner()
WIDE = {"COLUMNS": "200", "NO_COLOR": "1"}  # Rich must not wrap or colour the tables we parse


def _row(text: str, label: str) -> list[str]:
    """The cells of the table row whose first cell is `label`."""
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│|┃]", line) if c.strip()]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in:\n{text}")


def test_info_on_an_official_fixture():
    path = official_fixture("official-release-options")
    result = runner.invoke(app, ["info", str(path)], env=WIDE)
    assert result.exit_code == 0, result.output
    out = result.output
    assert _row(out, "format")[1] == "official"
    assert _row(out, "tau")[1] == "0.75 (not recorded; assumed)"
    # The fixture's mix: 12 FFN experts, then 2 constant, 1 copy and 1 zero expert.
    assert _row(out, "ffn")[1:] == ["12", "0..11"]
    assert _row(out, "constant")[1:] == ["2", "12..13"]
    assert _row(out, "copy")[1:] == ["1", "14..14"]
    assert _row(out, "zero")[1:] == ["1", "15..15"]
    model = load_pretrained(path)
    in_checkpoint = sum(p.numel() for p in model.parameters())
    assert _row(out, "total (tensors in checkpoint)")[1] == f"{in_checkpoint:,}"
    # The analytic count agrees with the tensors actually loaded.
    assert _row(out, "total")[1] == f"{in_checkpoint:,}"


def test_info_on_a_preset():
    result = runner.invoke(app, ["info", "--preset", "1b"], env=WIDE)
    assert result.exit_code == 0, result.output
    out = result.output
    assert _row(out, "ffn")[1] == "16" and _row(out, "zero")[1] == "1" and _row(out, "constant")[1] == "2"
    counts = model_params(model_preset("1b"))
    assert _row(out, "total")[1] == f"{counts['total']:,.0f}"
    assert _row(out, "ffn_experts")[1] == f"{12 * 16 * 3 * 768 * 2048:,}"
    assert "rho = 0.750" in out  # tau 0.75, 16 FFN + 4 ZC: 12 / 16


def test_bad_path_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    env = {**os.environ, **WIDE}
    exe = os.path.join(os.path.dirname(sys.executable), "moepp-bench")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-c", "from moepp_bench.app import main; main()"]
    proc = subprocess.run([*cmd, "info", str(missing)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no-such-checkpoint" in lines[0], proc.stderr
