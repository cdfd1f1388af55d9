"""`moepp-bench train` and the training loop: schedule, data order, losses, validation, bit-for-bit resume,
the command's files and errors, and the two shipped checkpoints."""

from __future__ import annotations

import json
import math
import os
import sys
from importlib import resources
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from moepp import load_pretrained, save_pretrained
from moepp_bench.app import app
from moepp_bench.corpus import shakespeare_plays
from moepp_bench.errors import BenchError
from moepp_bench.measure import training as T
from moepp_bench.tokenizer import encode, load_tokenizer
from moepp_bench.train_presets import train_config

pytestmark = pytest.mark.usefixtures("single_thread")

runner = CliRunner()
DATA = Path(str(resources.files("moepp_bench").joinpath("data")))
SHIPPED = {"moepp-tau0.75": DATA / "checkpoints/moepp-tau0.75", "moe": DATA / "checkpoints/moe"}


def settings(**changes) -> T.TrainSettings:
    base = dict(preset="lm-tiny", tau=0.75, vanilla=False, steps=8, batch_size=2, seq_len=32, lr=3e-3,
                warmup_steps=2, seed=0, vocab_size=512, save_every=100, log_every=2, val_tokens=4096)
    return T.TrainSettings(**{**base, **changes})


def synthetic_data(vocab: int = 512, n: int = 20_000) -> T.TrainData:
    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    return T.TrainData(ids[: n - 2000], ids[n - 2000:], "synthetic")


def tiny_model(s: T.TrainSettings):
    cfg = train_config(s.preset, vocab_size=s.vocab_size, seq_len=s.seq_len, tau=s.tau, vanilla=s.vanilla,
                       capacity_factor=s.capacity_factor, balance_coef=s.balance_coef, zloss_coef=s.zloss_coef)
    model = T.build_model(cfg, s.seed)
    return model, T.build_optimizer(model, s)


# Schedule and data -----------------------------------------------------------------------------------------
def test_learning_rate_warms_up_then_decays_by_cosine():
    s = settings(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [T.lr_at(i, s) for i in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half-way through the cosine
    assert T.lr_at(100, s) == pytest.approx(1e-4)


def test_batches_are_a_pure_function_of_seed_and_step():
    ids = torch.arange(1000, dtype=torch.int32)
    a = T.batch_at(ids, 5, 0, 4, 16)
    assert a.shape == (4, 16) and a.dtype == torch.long
    assert torch.equal(a, T.batch_at(ids, 5, 0, 4, 16))
    assert not torch.equal(a, T.batch_at(ids, 6, 0, 4, 16))
    assert not torch.equal(a, T.batch_at(ids, 5, 1, 4, 16))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 15, dtype=torch.long))  # contiguous windows
    with pytest.raises(ValueError, match="fewer than one sequence"):
        T.batch_at(ids[:10], 0, 0, 1, 16)


def test_weight_decay_skips_vectors():
    model, opt = tiny_model(settings())
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] > 0 and plain["weight_decay"] == 0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


# Losses and measurements -----------------------------------------------------------------------------------
def test_routing_shares_count_zero_computation_slots():
    s = settings()
    model, _ = tiny_model(s)
    x = synthetic_data().train_ids[:64].view(2, 32).long()
    out = model(x, return_routing=True)
    zc, dropped = T.routing_shares(out, model.cfg)
    n_ffn = model.cfg.moe.n_ffn
    ids = torch.cat([r.topk_ids.reshape(-1) for r in out.routing])
    assert zc == pytest.approx(float((ids >= n_ffn).float().mean()))
    assert dropped == 0.0
    vanilla, _ = tiny_model(settings(vanilla=True))
    assert T.routing_shares(vanilla(x, return_routing=True), vanilla.cfg)[0] == 0.0


def test_routing_shares_count_capacity_drops():
    model, _ = tiny_model(settings(capacity_factor=0.25))
    out = model(synthetic_data().train_ids[:64].view(2, 32).long(), return_routing=True)
    zc, dropped = T.routing_shares(out, model.cfg)
    n_dropped = sum(int(r.dropped.sum()) for r in out.routing)
    slots = sum(r.topk_ids.numel() for r in out.routing)
    assert n_dropped > 0 and dropped == pytest.approx(n_dropped / slots)
    assert zc + dropped <= 1.0


def test_the_step_loss_is_cross_entropy_plus_weighted_balance_and_z_loss():
    s = settings(balance_coef=0.05, zloss_coef=0.01)
    model, _ = tiny_model(s)
    x = synthetic_data().train_ids[:64].view(2, 32).long()
    out = model(x, labels=x)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 512), x[:, 1:].reshape(-1))
    expected = ce + 0.05 * out.balance_loss + 0.01 * out.z_loss
    assert out.z_loss > 0 and out.balance_loss > 0
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_unigram_baseline_is_the_cross_entropy_of_train_frequencies():
    train = torch.tensor([0, 0, 0, 1], dtype=torch.int32)
    val = torch.tensor([0, 1], dtype=torch.int32)
    # add-one smoothing over a 3-token vocabulary: p = (4/7, 2/7, 1/7)
    expected = -(math.log(4 / 7) + math.log(2 / 7)) / 2
    assert T.unigram_baseline(train, val, 3) == pytest.approx(expected)


def test_evaluate_is_the_mean_next_token_cross_entropy():
    s = settings()
    model, _ = tiny_model(s)
    ids = synthetic_data().val_ids[:100]
    result = T.evaluate(model, ids, seq_len=32, batch_size=2)
    windows = ids[:96].view(3, 32).long()
    with torch.no_grad():
        logits = model(windows).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), windows[:, 1:].reshape(-1))
    assert result["val_tokens"] == 3 * 31
    assert result["val_loss"] == pytest.approx(float(ce), rel=1e-5)
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))
    assert 0 < result["val_zc_share"] < 1
    assert model.training  # restored


# Training --------------------------------------------------------------------------------------------------
def test_training_learns_a_repeating_text():
    pattern = torch.arange(20, dtype=torch.int32).repeat(300)  # next token is fully predictable
    data = T.TrainData(pattern, pattern[:200].clone(), "pattern")
    s = settings(steps=60, lr=1e-2, warmup_steps=5)
    model, opt = tiny_model(s)
    before = T.evaluate(model, data.val_ids, 32, 4)["val_loss"]
    result = T.train(model, opt, data, s, T.TrainerState(), None)
    assert result.finished and result.state.step == 60 and result.state.tokens_seen == 60 * 64
    assert before > 5.5 and result.validation["val_loss"] < 1.0
    log = result.state.log
    assert [r["step"] for r in log] == list(range(2, 61, 2))
    assert log[-1]["ce_loss"] < log[0]["ce_loss"] / 3
    assert all(0 <= r["zc_share"] <= 1 and r["tokens_per_s"] > 0 for r in log)


def test_tau_moves_the_share_of_slots_on_zero_computation_experts():
    """The heterogeneous balance loss: small tau makes ZC experts cheap, so more slots go there."""
    data = synthetic_data()
    shares = {}
    for tau in (0.1, 3.0):
        s = settings(tau=tau, steps=40, balance_coef=0.5, lr=1e-2, log_every=40)
        model, opt = tiny_model(s)
        result = T.train(model, opt, data, s, T.TrainerState(), None, validate=False)
        shares[tau] = result.state.log[-1]["zc_share"]
    cfg = train_config("lm-tiny", vocab_size=512, seq_len=32, tau=0.1).moe
    assert shares[0.1] > shares[3.0] + 0.15, shares
    assert 1 - cfg.rho > 0.8  # tau 0.1 aims at more than 80% of slots on ZC experts


def test_resume_continues_bit_for_bit(tmp_path):
    data = synthetic_data()
    s = settings(steps=8, save_every=3)
    straight, opt = tiny_model(s)
    T.train(straight, opt, data, s, T.TrainerState(), None, validate=False)

    first, opt1 = tiny_model(s)
    polls = iter(range(100))
    stopped = T.train(first, opt1, data, s, T.TrainerState(), tmp_path, "{}",
                      should_stop=lambda: next(polls) >= 4, validate=False)
    assert not stopped.finished and stopped.state.step == 4
    torch.manual_seed(123)  # a resume in a new process starts from other RNG state
    model, opt2, state, saved = T.restore(T.load_state_file(tmp_path))
    assert state.step == 4 and saved == s
    T.train(model, opt2, data, saved, state, tmp_path, "{}", validate=False)
    for (name, a), b in zip(straight.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    for key, value in straight.state_dict().items():  # the final checkpoint holds the same weights
        assert torch.equal(load_file(str(tmp_path / "model.safetensors"))[key], value), key


def test_saved_checkpoint_loads_and_keeps_routers_in_float32(tmp_path):
    data = synthetic_data()
    s = settings(steps=2, save_dtype="bfloat16")
    model, opt = tiny_model(s)
    T.train(model, opt, data, s, T.TrainerState(), tmp_path, '{"tokenizer": 1}', validate=False)
    assert (tmp_path / "trainer_state.pt").is_file() and (tmp_path / "tokenizer.json").read_text() == '{"tokenizer": 1}'
    loaded = load_pretrained(tmp_path)
    assert loaded.checkpoint_info.dtype == "bfloat16" and loaded.checkpoint_info.extra["step"] == 2
    for name, p in loaded.named_parameters():
        assert p.dtype == (torch.float32 if ".router." in name else torch.bfloat16), name
    x = data.val_ids[:32].view(1, 32).long()
    with torch.no_grad():
        ref = model(x).logits
        got = load_pretrained(tmp_path, dtype=torch.float32)(x).logits
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()  # bfloat16 rounding only


def test_state_file_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="no training state"):
        T.load_state_file(tmp_path)
    (tmp_path / T.STATE_FILE).write_bytes(b"not a state")
    with pytest.raises(ValueError, match="corrupt training state"):
        T.load_state_file(tmp_path)


# The command -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    play = next(p.text for p in shakespeare_plays() if p.name == "hamlet")
    path = tmp_path_factory.mktemp("text") / "hamlet.txt"
    path.write_text(play[:40_000], encoding="utf-8")
    return path


def cli(*args):
    argv = ["train", *map(str, args)]
    with mock.patch.object(sys, "argv", ["moepp-bench", *argv]):  # what the console script would see
        return runner.invoke(app, argv, env={"COLUMNS": "200", "NO_COLOR": "1"})


TINY = ("--preset", "lm-tiny", "--batch-size", "2", "--seq-len", "32", "--save-every", "3", "--log-every", "2")


def test_cli_trains_writes_the_checkpoint_and_resumes_bit_for_bit(text_file, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli(*TINY, "--text", text_file, "--steps", "6", "--out", straight).exit_code == 0
    names = {p.name for p in straight.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt", "TRAINING.md",
            "training.json", "train-log.csv", "train-log.json"} <= names

    card = json.loads((straight / "training.json").read_text())
    assert card["schema"] == "moepp-bench/training"
    row = card["rows"][0]
    assert row["steps"] == 6 and row["tokens_seen"] == 6 * 64 and row["val_loss"] > 0
    assert card["commands"][0].startswith("moepp-bench train --preset lm-tiny")
    assert card["provenance"]["torch"] == torch.__version__
    md = (straight / "TRAINING.md").read_text()
    assert "validation loss" in md and card["commands"][0] in md
    log = (straight / "train-log.csv").read_text().splitlines()
    assert log[0].startswith("step,tokens_seen,lr,loss") and len(log) == 1 + 3

    model = load_pretrained(straight)
    tok = load_tokenizer(straight / "tokenizer.json")
    assert model.cfg.vocab_size == tok.get_vocab_size() and model.cfg.moe.tau == 0.75
    ids = torch.tensor([encode(tok, "To be, or not to be")])
    assert model(ids).logits.shape == (1, ids.shape[1], model.cfg.vocab_size)

    stopped = cli(*TINY, "--text", text_file, "--steps", "6", "--stop-after", "4", "--out", split,
                  "--save-dtype", "float32")
    assert stopped.exit_code == 0 and "stopped at step 4 of 6" in stopped.output
    assert not (split / "training.json").exists()  # no result card for an unfinished run
    resumed = cli("--out", split, "--resume")
    assert resumed.exit_code == 0, resumed.output
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = json.loads((split / "training.json").read_text())
    assert len(card["commands"]) == 2 and card["rows"][0]["steps"] == 6


def test_cli_trains_on_the_embedded_corpus_by_default(tmp_path):
    """No --text: the embedded corpus, its fixed validation split and its fingerprint."""
    result = cli("--preset", "lm-tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--vocab-size",
                 "300", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "run" / "training.json").read_text())
    corpus = card["corpus"]
    assert corpus["source"] == "embedded" and len(corpus["fingerprint"]) == 64
    assert set(corpus["train"]) == {"shakespeare", "python-docs", "python-code", "pydoc-topics"}
    assert corpus["train_tokens"] > 20 * corpus["val_tokens"] > 0
    assert load_tokenizer(tmp_path / "run" / "tokenizer.json").get_vocab_size() == 300
    assert card["rows"][0]["val_tokens"] > 10_000


def test_cli_vanilla_has_the_same_ffn_experts(text_file, tmp_path):
    assert cli(*TINY, "--text", text_file, "--steps", "2", "--vanilla", "--out", tmp_path / "v").exit_code == 0
    assert cli(*TINY, "--text", text_file, "--steps", "2", "--out", tmp_path / "p").exit_code == 0
    vanilla, moepp = load_pretrained(tmp_path / "v"), load_pretrained(tmp_path / "p")
    assert vanilla.cfg.moe.n_zc == 0 and moepp.cfg.moe.n_zc == 4
    assert vanilla.cfg.moe == moepp.cfg.moe.vanilla()
    row = json.loads((tmp_path / "v" / "training.json").read_text())["rows"][0]
    assert row["val_zc_share"] == 0 and row["target_zc_share"] == 0


@pytest.mark.parametrize("args, message", [
    (("--steps", "0"), "--steps must be positive"),
    (("--steps", "3", "--tokens", "100"), "not both"),
    (("--preset", "huge"), "unknown preset 'huge'"),
    (("--save-dtype", "int8"), "--save-dtype must be one of"),
    (("--seq-len", "1"), "at least 2"),
])
def test_cli_rejects_bad_options_before_any_work(args, message, tmp_path):
    result = cli(*args, "--out", tmp_path / "run")
    assert isinstance(result.exception, BenchError) and message in str(result.exception)
    assert not (tmp_path / "run").exists()


def test_cli_resume_errors(text_file, tmp_path):
    run = tmp_path / "run"
    err = cli("--out", run, "--resume").exception
    assert isinstance(err, BenchError) and "no training state" in str(err)
    assert cli(*TINY, "--text", text_file, "--steps", "2", "--out", run).exit_code == 0
    err = cli(*TINY, "--text", text_file, "--steps", "2", "--out", run).exception
    assert isinstance(err, BenchError) and "not empty; pass --resume" in str(err)
    err = cli("--out", run, "--resume", "--lr", "0.5").exception
    assert isinstance(err, BenchError) and "--lr 0.5 differs" in str(err)
    err = cli("--out", run, "--resume").exception
    assert isinstance(err, BenchError) and "already reached step 2 of 2" in str(err)


def test_cli_text_too_short_for_the_sequence(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words only\n" * 3, encoding="utf-8")
    err = cli("--preset", "lm-tiny", "--text", short, "--steps", "2", "--out", tmp_path / "run").exception
    assert isinstance(err, BenchError) and "too few for --seq-len" in str(err)


# The shipped checkpoints -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_checkpoint_is_complete_small_and_trained(name):
    path = SHIPPED[name]
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "TRAINING.md", "training.json"} <= files
    assert "trainer_state.pt" not in files  # optimizer state stays out of the package
    assert sum(p.stat().st_size for p in path.iterdir()) <= 10 * 1024 * 1024
    card = json.loads((path / "training.json").read_text())
    row = card["rows"][0]
    assert card["commands"][0].startswith("moepp-bench train --preset lm-small")
    assert row["val_loss"] < row["unigram_baseline"] - 1.0  # clearly better than ignoring context
    assert row["train_seconds"] > 0 and row["tokens_seen"] > 500_000

    model = load_pretrained(path)
    assert model.checkpoint_info.dtype == "bfloat16"
    tok = load_tokenizer(path / "tokenizer.json")
    text = (DATA / "eval" / "shakespeare-verse.txt").read_text(encoding="utf-8")
    seq = model.cfg.max_seq_len
    assert seq == card["settings"]["seq_len"] == 256  # routing-stats reads its default window from here
    ids = torch.tensor(encode(tok, text)[: 8 * seq]).view(8, seq)
    with torch.no_grad():
        out = model(ids, labels=ids, return_routing=True)
    assert float(out.ce_loss) < row["unigram_baseline"] - 1.0  # on held-out text too
    zc, _ = T.routing_shares(out, model.cfg)
    if name == "moe":
        assert model.cfg.moe.n_zc == 0 and zc == 0
    else:
        target = 1 - model.cfg.moe.rho
        assert model.cfg.moe.tau == 0.75 and abs(zc - target) < 0.1, (zc, target)
        assert abs(row["val_zc_share"] - target) < 0.1


def test_shipped_pair_shares_ffn_experts():
    moepp, moe = (json.loads((SHIPPED[n] / "config.json").read_text())["model"] for n in ("moepp-tau0.75", "moe"))
    assert moe["moe"]["n_zero"] == moe["moe"]["n_copy"] == moe["moe"]["n_constant"] == 0
    assert {**moepp["moe"], "n_zero": 0, "n_copy": 0, "n_constant": 0} == moe["moe"]
    assert {k: v for k, v in moepp.items() if k != "moe"} == {k: v for k, v in moe.items() if k != "moe"}


def test_a_new_checkpoint_directory_is_readable_by_others(tmp_path):
    model, _ = tiny_model(settings())
    path = save_pretrained(model, tmp_path / "new")
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o777 & ~umask
    assert ((path / "model.safetensors").stat().st_mode & 0o777) == 0o666 & ~umask
