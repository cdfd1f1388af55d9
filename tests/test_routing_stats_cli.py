"""routing-stats as a user meets it: bad input gives one line and exit code 2 with no output left behind, a
finished run replaces its output directory, and the command works with no arguments on the shipped checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moepp_bench.commands import routing_stats as command

from routing_testing import read_csv, run_cli, save_forced


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_forced(tmp_path_factory.mktemp("cli") / "ckpt")


@pytest.fixture
def ids(tmp_path) -> Path:
    path = tmp_path / "ids.json"
    path.write_text(json.dumps([[0, 1, 2, 3], [3, 2]]))
    return path


def assert_bad_input(result, *fragments: str) -> None:
    code, out, err = result
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


def no_output(out: Path) -> bool:
    leftovers = list(out.parent.glob(f".{out.name}.*")) if out.parent.exists() else []
    return not out.exists() and not leftovers


def test_a_path_that_is_not_a_checkpoint(tmp_path, ids, capsys, monkeypatch):
    out = tmp_path / "out"
    assert_bad_input(run_cli([tmp_path / "missing", "--token-ids", ids, "--out", out], capsys, monkeypatch),
                     "missing", "no such checkpoint directory")
    (tmp_path / "empty-dir").mkdir()
    assert_bad_input(run_cli([tmp_path / "empty-dir", "--token-ids", ids, "--out", out], capsys, monkeypatch),
                     "config.json", "file not found")
    text = tmp_path / "notes.txt"
    text.write_text("a b")
    assert_bad_input(run_cli([text, "--out", out], capsys, monkeypatch), "notes.txt", "name the checkpoint first")
    assert no_output(out)


def test_a_truncated_weight_file(ckpt, tmp_path, ids, capsys, monkeypatch):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    assert_bad_input(run_cli([broken, "--token-ids", ids, "--out", out], capsys, monkeypatch),
                     "model.safetensors", "corrupt or truncated")
    assert no_output(out)


def test_token_ids_outside_the_vocabulary(ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    for name, rows in (("big.json", [[0, 1, 8]]), ("negative.json", [[0, -1]])):
        path = tmp_path / name
        path.write_text(json.dumps(rows))
        assert_bad_input(run_cli([ckpt, "--token-ids", path, "--out", out], capsys, monkeypatch),
                         name, "outside the model's vocabulary 0..7")
    torch.save(torch.tensor([[1.0, 2.0]]), tmp_path / "floats.pt")
    assert_bad_input(run_cli([ckpt, "--token-ids", tmp_path / "floats.pt", "--out", out], capsys, monkeypatch),
                     "floats.pt", "must be integers")
    (tmp_path / "ragged.json").write_text('[[1, 2], "x"]')
    assert_bad_input(run_cli([ckpt, "--token-ids", tmp_path / "ragged.json", "--out", out], capsys, monkeypatch),
                     "ragged.json", "list of token-id lists")
    assert no_output(out)


def test_a_tokenizer_that_does_not_match_the_checkpoint(ckpt, tmp_path, capsys, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "far": 20, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "wide.json"))
    text = tmp_path / "task.txt"
    text.write_text("a far a")
    out = tmp_path / "out"
    assert_bad_input(run_cli([ckpt, text, "--tokenizer", tmp_path / "wide.json", "--out", out], capsys, monkeypatch),
                     "task.txt", "token id 20", "wide.json")
    assert no_output(out)


def test_empty_and_non_utf8_text_files(ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    good, empty, blank, latin = (tmp_path / n for n in ("good.txt", "empty.txt", "blank.txt", "latin1.txt"))
    good.write_text("a b c")
    empty.write_bytes(b"")
    blank.write_text("  \n\n ")
    latin.write_bytes("a b caf\u00e9".encode("latin-1"))
    for path, message in ((empty, "empty text file"), (blank, "empty text file"), (latin, "not UTF-8 text")):
        assert_bad_input(run_cli([ckpt, good, path, "--out", out], capsys, monkeypatch), path.name, message)
    assert_bad_input(run_cli([ckpt, good, tmp_path / "nope.txt", "--out", out], capsys, monkeypatch),
                     "nope.txt", "no such text file")
    assert no_output(out)


def test_text_without_a_tokenizer_asks_for_token_ids(ckpt, tmp_path, capsys, monkeypatch):
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare)
    (bare / "tokenizer.json").unlink()
    text = tmp_path / "t.txt"
    text.write_text("a b")
    out = tmp_path / "out"
    assert_bad_input(run_cli([bare, text, "--out", out], capsys, monkeypatch), "no tokenizer", "--token-ids")
    (bare / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    try:
        import sentencepiece  # noqa: F401

        expected = "not a readable SentencePiece model"
    except ImportError:
        expected = "pip install sentencepiece"
    assert_bad_input(run_cli([bare, text, "--out", out], capsys, monkeypatch), "tokenizer.model", expected)
    assert no_output(out)


def test_conflicting_or_impossible_options(ckpt, tmp_path, ids, capsys, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("a b")
    out = tmp_path / "out"
    assert_bad_input(run_cli([ckpt, text, "--token-ids", ids, "--out", out], capsys, monkeypatch), "not both")
    assert_bad_input(run_cli([ckpt, "--token-ids", ids, "--seq-len", 65, "--out", out], capsys, monkeypatch),
                     "--seq-len 65", "1..64")
    assert_bad_input(run_cli([ckpt, "--token-ids", ids, "--max-tokens", 0, "--out", out], capsys, monkeypatch),
                     "--max-tokens")
    assert_bad_input(run_cli([ckpt, "--token-ids", ids, "--threads", -1, "--out", out], capsys, monkeypatch),
                     "--threads")
    assert no_output(out)
    out.write_text("a file")
    assert_bad_input(run_cli([ckpt, "--token-ids", ids, "--out", out], capsys, monkeypatch), "is a file")


def test_a_failed_run_leaves_nothing_behind(ckpt, tmp_path, ids, capsys, monkeypatch):
    """Interrupted after routing began: the staging directory, spill files and the parents it made are gone,
    and an existing output directory keeps its earlier results."""
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while routing")

    monkeypatch.setattr(command, "collect_routing_stats", crash)
    nested = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError):
        run_cli([ckpt, "--token-ids", ids, "--out", nested], capsys, monkeypatch)
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "kept"
    existing.mkdir()
    (existing / "expert_load.csv").write_text("earlier results\n")
    with pytest.raises(RuntimeError):
        run_cli([ckpt, "--token-ids", ids, "--out", existing], capsys, monkeypatch)
    assert (existing / "expert_load.csv").read_text() == "earlier results\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_second_run_replaces_the_first_and_its_stale_files(ckpt, tmp_path, ids, capsys, monkeypatch):
    out = tmp_path / "out"
    code, _, err = run_cli([ckpt, "--token-ids", ids, "--out", out, "--trace", "--no-plots"], capsys, monkeypatch)
    assert code == 0, err
    assert (out / "trace.jsonl").is_file() and (out / "ffn_per_token_no_residual.csv").is_file()
    (out / "notes.md").write_text("a user's own file")
    other = tmp_path / "other.json"
    other.write_text(json.dumps([[1, 1, 1]]))
    code, _, err = run_cli([ckpt, "--token-ids", other, "--out", out, "--no-plots", "--no-ablate-gating-residual"],
                           capsys, monkeypatch)
    assert code == 0, err
    assert not (out / "trace.jsonl").exists() and not (out / "ffn_per_token_no_residual.csv").exists()
    assert (out / "notes.md").is_file()  # only routing-stats' own files are replaced or removed
    assert sum(int(r["tokens"]) for r in read_csv(out / "expert_load.csv")) == 2 * 2 * 3  # 2 layers x K x 3 tokens
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the private mode of a temporary directory


def test_threads_are_set_for_the_run_and_restored(ckpt, tmp_path, ids, capsys, monkeypatch):
    torch.set_num_threads(2)
    try:
        code, _, err = run_cli([ckpt, "--token-ids", ids, "--out", tmp_path / "out", "--no-plots"], capsys,
                               monkeypatch)
        assert code == 0, err
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["provenance"]["threads"] == 1  # the default --threads 1, recorded with the result


def test_the_entry_point_prints_one_line_and_exits_2(tmp_path):
    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.run([sys.executable, "-c", "from moepp_bench.app import main; main()", "routing-stats",
                           str(tmp_path / "nothing-here"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nothing-here'}: no such checkpoint directory"]
    assert not (tmp_path / "out").exists()


def test_no_arguments_uses_the_shipped_checkpoint_and_evaluation_texts(tmp_path, capsys, monkeypatch):
    shipped = command.SHIPPED_CHECKPOINTS / command.DEFAULT_CHECKPOINT
    if not (shipped / "config.json").is_file() or not list(command.EVAL_DIR.glob("*.txt")):
        pytest.skip(f"the shipped checkpoint or evaluation texts are not in this checkout ({shipped})")
    monkeypatch.chdir(tmp_path)  # the default --out is results/routing/<checkpoint> under the working directory
    code, stdout, err = run_cli(["--max-tokens", 64, "--no-plots", "--no-ablate-gating-residual"], capsys,
                                monkeypatch)
    assert code == 0, err
    out = tmp_path / "results" / "routing" / command.DEFAULT_CHECKPOINT
    summary = json.loads((out / "summary.json").read_text())
    texts = sorted(command.EVAL_DIR.glob("*.txt"))
    assert [t["name"] for t in summary["tasks"]] == [p.stem for p in texts]
    assert all(t["tokens"] == 64 for t in summary["tasks"])
    assert summary["checkpoint_name"] == command.DEFAULT_CHECKPOINT and summary["tau_known"] is True
    assert "Routing per MoE layer" in stdout


def test_a_sentencepiece_tokenizer_where_installed(ckpt, tmp_path, capsys, monkeypatch):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a b c d\n" * 200)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=5,
                                   model_type="word", minloglevel=2, bos_id=-1, eos_id=-1)
    text = tmp_path / "t.txt"
    text.write_text("a b c d a")
    out = tmp_path / "out"
    code, _, err = run_cli([ckpt, text, "--tokenizer", tmp_path / "sp.model", "--out", out, "--no-plots"],
                           capsys, monkeypatch)
    assert code == 0, err
    assert sum(int(r["occurrences"]) for r in read_csv(out / "token_ffn.csv")) == 5
