"""routing-stats against hand-computed values on a tiny model whose routing is forced token by token, and
against the official MoE++ router on checkpoints in the official layout."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moepp import load_pretrained
from moepp_bench.measure import token_input
from moepp_bench.measure.imbalance import imbalance

from routing_testing import (FORCED, OFFICIAL_FIXTURE_NAMES, forced_logit, forced_scores, official_fixture,
                             official_model, read_csv, run_cli, save_forced, write_official_routing)

ROWS = [[0, 1, 2, 3, 0, 0], [3, 2, 1]]  # ragged: the second row is padded in a batch of 2
TOKENS = [t for row in ROWS for t in row]
T, K = len(TOKENS), 2


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def forced_ckpt(tmp_path_factory) -> Path:
    return save_forced(tmp_path_factory.mktemp("forced") / "ckpt")


@pytest.fixture(scope="module")
def forced_ids(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ids") / "ids.json"
    path.write_text(json.dumps(ROWS))
    return path


@pytest.fixture(scope="module")
def forced_run(forced_ckpt, forced_ids, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    mp = pytest.MonkeyPatch()
    try:
        code, _, err = run_cli([forced_ckpt, "--token-ids", forced_ids, "--out", out, "--batch-size", 2,
                                "--no-plots", "--no-ablate-gating-residual", "--trace", "--min-count", 2, "--top", 2],
                               _NoCapture(), mp)
    finally:
        mp.undo()
    assert code == 0, err
    return out


class _NoCapture:
    """capsys stand-in for module-scoped fixtures (output is not checked there)."""

    def readouterr(self):
        return type("Captured", (), {"out": "", "err": ""})()


def by_layer_expert(rows):
    return {(int(r["layer"]), int(r["expert"])): r for r in rows}


def test_expert_load_counts_every_real_token_once(forced_run):
    load = by_layer_expert(read_csv(forced_run / "expert_load.csv"))
    # Worked out from FORCED: token 0 three times, tokens 1, 2, 3 twice each.
    expected = {0: [5, 5, 2, 0, 2, 4], 1: [5, 4, 0, 2, 2, 5]}
    for layer, counts in expected.items():
        assert [int(load[(layer, e)]["tokens"]) for e in range(6)] == counts
        assert sum(float(load[(layer, e)]["share"]) for e in range(6)) == pytest.approx(1.0)
        assert float(load[(layer, 0)]["share"]) == pytest.approx(5 / 18)
        assert [load[(layer, e)]["expert_type"] for e in range(6)] == ["ffn", "ffn", "constant", "constant", "copy",
                                                                      "zero"]
        assert all(int(load[(layer, e)]["dropped"]) == 0 for e in range(6))  # dropless


def test_ffn_experts_per_token_histogram_mean_and_type_shares(forced_run):
    rows = {(r["task"], r["layer"]): r for r in read_csv(forced_run / "ffn_per_token.csv")}
    l0, l1, both = rows[("all", "0")], rows[("all", "1")], rows[("all", "all")]
    # Layer 0: token 0 -> 2 FFN (x3), token 1 -> 1 (x2), token 2 -> 0 (x2), token 3 -> 1 (x2).
    assert [int(l0[f"ffn_{j}"]) for j in range(3)] == [2, 4, 3]
    assert float(l0["mean_ffn_experts"]) == pytest.approx(10 / 9)
    # Layer 1: token 0 -> 1 (x3), token 1 -> 0 (x2), token 2 -> 2 (x2), token 3 -> 1 (x2).
    assert [int(l1[f"ffn_{j}"]) for j in range(3)] == [2, 5, 2]
    assert float(l1["mean_ffn_experts"]) == pytest.approx(1.0)
    assert [int(both[f"ffn_{j}"]) for j in range(3)] == [4, 9, 5]
    assert float(both["mean_ffn_experts"]) == pytest.approx(19 / 18)
    # K * rho with tau 0.75, 2 FFN and 4 ZC experts: 2 * 1.5 / 5.5.
    assert float(l0["k_rho"]) == pytest.approx(2 * 1.5 / 5.5)
    # Slots per type in layer 0: FFN 5 + 5, constant 2, copy 2, zero 4 of 18.
    assert [float(l0[f"share_{t}"]) for t in ("ffn", "constant", "copy", "zero")] == pytest.approx(
        [10 / 18, 2 / 18, 2 / 18, 4 / 18])


def test_per_token_means_over_layers(forced_run):
    rows = {int(r["token_id"]): r for r in read_csv(forced_run / "token_ffn.csv")}
    assert {t: int(r["occurrences"]) for t, r in rows.items()} == {0: 3, 1: 2, 2: 2, 3: 2}
    # (layer 0 + layer 1) / 2: token 0 (2 + 1), token 1 (1 + 0), token 2 (0 + 2), token 3 (1 + 1).
    assert {t: float(r["mean_ffn_experts"]) for t, r in rows.items()} == {0: 1.5, 1: 0.5, 2: 1.0, 3: 1.0}
    assert rows[0]["token"] == "a" and rows[3]["token"] == "d"  # strings from the checkpoint's tokenizer
    summary = json.loads((forced_run / "summary.json").read_text())
    assert [r["token_id"] for r in summary["highest_tokens"]] == [0, 2]  # ties broken by occurrences, then id
    assert [r["token_id"] for r in summary["lowest_tokens"]] == [1, 2]


def test_routing_scores_mean_and_variance(forced_run):
    rows = {(int(r["layer"]), r["rank"]): r for r in read_csv(forced_run / "routing_scores.csv")}
    hist = read_csv(forced_run / "routing_score_hist.csv")
    for layer in (0, 1):
        scores = [sorted(forced_scores(layer, t), reverse=True)[:2] for t in TOKENS]
        for r, rank in enumerate(("top1", "top2")):
            values = [s[r] for s in scores]
            row = rows[(layer, rank)]
            assert float(row["mean"]) == pytest.approx(statistics.fmean(values), rel=1e-5)
            assert float(row["variance"]) == pytest.approx(statistics.pvariance(values), rel=1e-4, abs=1e-9)
            assert float(row["max"]) == pytest.approx(max(values), rel=1e-5)
            counts = Counter(min(int(v * 100), 99) for v in values)
            got = {int(round(float(h["bin_lo"]) * 100)): int(h["tokens"]) for h in hist
                   if int(h["layer"]) == layer and h["rank"] == rank and int(h["tokens"])}
            assert got == dict(counts)


def test_imbalance_rows_use_the_routed_loads(forced_run):
    rows = {(int(r["layer"]), r["experts"]): r for r in read_csv(forced_run / "imbalance.csv")}
    # Layer 0, all experts: loads 5, 5, 2, 0, 2, 4; mean 3, variance 20/6; Jain 18^2 / (6 * 74).
    all0 = rows[(0, "all")]
    assert float(all0["cv"]) == pytest.approx(math.sqrt(20 / 6) / 3)
    assert float(all0["max_over_mean"]) == pytest.approx(5 / 3)
    assert float(all0["jain"]) == pytest.approx(324 / 444)
    # Layer 0, FFN experts: 5 and 5 are balanced.
    assert float(rows[(0, "ffn")]["cv"]) == pytest.approx(0.0)
    assert float(rows[(0, "ffn")]["gini"]) == pytest.approx(0.0)
    # Layer 1, FFN experts 5 and 4; compared with the same function on the hand-counted loads.
    expected = imbalance([5, 4])
    for name in ("cv", "maxvio", "gini", "entropy", "jain"):
        assert float(rows[(1, "ffn")][name]) == pytest.approx(expected[name])
    # tau-weighted target for layer 0 (FFN 0.75, ZC 1 over 18 slots): 2.4545 per FFN, 3.2727 per ZC expert.
    target = [18 * w / 5.5 for w in (0.75, 0.75, 1, 1, 1, 1)]
    worst = max(c / t for c, t in zip([5, 5, 2, 0, 2, 4], target))
    assert float(all0["maxvio_vs_tau_target"]) == pytest.approx(worst - 1)
    assert all0["drop_rate"] == ""  # dropless: no drop rate


def test_coactivation_pairs(forced_run):
    rows = {(int(r["layer"]), int(r["expert_a"]), int(r["expert_b"])): r
            for r in read_csv(forced_run / "coactivation.csv")}
    nonzero = {k: int(r["tokens"]) for k, r in rows.items() if k[0] == 0 and int(r["tokens"])}
    assert nonzero == {(0, 0, 1): 3, (0, 1, 5): 2, (0, 4, 5): 2, (0, 0, 2): 2}
    # Of the 5 tokens that chose expert 0 in layer 0, 3 also chose expert 1.
    assert float(rows[(0, 0, 1)]["p_b_given_a"]) == pytest.approx(3 / 5)
    assert float(rows[(0, 0, 1)]["share"]) == pytest.approx(3 / 9)
    assert len(rows) == 2 * 15  # every unordered pair of 6 experts, per layer


def test_correlation_of_ffn_counts_between_adjacent_layers(forced_run):
    (row,) = read_csv(forced_run / "layer_correlation.csv")
    ffn = [{t: sum(e < 2 for e in FORCED[layer][t]) for t in range(4)} for layer in (0, 1)]
    a, b = [ffn[0][t] for t in TOKENS], [ffn[1][t] for t in TOKENS]
    assert float(row["pearson_r"]) == pytest.approx(statistics.correlation(a, b))
    assert float(row["mean_a"]) == pytest.approx(10 / 9)


def test_routing_file_holds_real_tokens_in_input_order(forced_run, forced_ckpt):
    with safe_open(str(forced_run / "routing.safetensors"), "pt") as fh:
        meta = fh.metadata()
        ids = {name: fh.get_tensor(name) for name in fh.keys()}
    assert set(ids) == {"layer0.topk_ids", "layer1.topk_ids"}
    assert meta["n_experts"] == "6"
    assert json.loads(meta["expert_types"]) == ["ffn", "ffn", "constant", "constant", "copy", "zero"]
    assert meta["checkpoint"]
    for layer in (0, 1):
        got = ids[f"layer{layer}.topk_ids"]
        assert got.dtype == torch.int64 and got.shape == (T, K)
        assert got.tolist() == [list(FORCED[layer][t]) for t in TOKENS]


def test_trace_has_every_real_token(forced_run):
    lines = [json.loads(line) for line in (forced_run / "trace.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == TOKENS
    assert [r["pos"] for r in lines] == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert [r["seq"] for r in lines] == [0] * 6 + [1] * 3
    assert lines[1]["token"] == "b"
    for r in lines:
        for layer, entry in enumerate(r["layers"]):
            assert entry["experts"] == list(FORCED[layer][r["id"]])
            assert len(entry["gates"]) == K


def test_batching_and_padding_do_not_change_any_count(forced_ckpt, forced_ids, forced_run, tmp_path, capsys,
                                                      monkeypatch):
    out = tmp_path / "one-by-one"
    code, _, err = run_cli([forced_ckpt, "--token-ids", forced_ids, "--out", out, "--batch-size", 1, "--no-plots",
                            "--no-ablate-gating-residual"], capsys, monkeypatch)
    assert code == 0, err
    for name in ("expert_load.csv", "ffn_per_token.csv", "token_ffn.csv", "coactivation.csv", "imbalance.csv"):
        assert (out / name).read_text() == (forced_run / name).read_text(), name


def test_per_task_rows_from_text_files(forced_ckpt, tmp_path, capsys, monkeypatch):
    (tmp_path / "first.txt").write_text("a b c d\na a\n")
    (tmp_path / "second.txt").write_text("d c b")
    out = tmp_path / "out"
    code, stdout, err = run_cli([forced_ckpt, tmp_path / "first.txt", tmp_path / "second.txt", "--out", out,
                                 "--no-plots", "--no-ablate-gating-residual"], capsys, monkeypatch)
    assert code == 0, err
    rows = {(r["task"], r["layer"]): r for r in read_csv(out / "ffn_per_token.csv")}
    first, second = rows[("first", "0")], rows[("second", "0")]
    assert [int(first[f"ffn_{j}"]) for j in range(3)] == [1, 2, 3]  # tokens a b c d a a
    assert float(first["mean_ffn_experts"]) == pytest.approx(8 / 6)
    assert [int(second[f"ffn_{j}"]) for j in range(3)] == [1, 2, 0]  # tokens d c b
    # Layer 0 slots of d, c, b: (constant, FFN), (copy, zero), (FFN, zero).
    assert [float(second[f"share_{t}"]) for t in ("ffn", "constant", "copy", "zero")] == pytest.approx(
        [2 / 6, 1 / 6, 1 / 6, 2 / 6])
    assert int(rows[("all", "0")]["tokens"]) == 9
    summary = json.loads((out / "summary.json").read_text())
    assert [(t["name"], t["tokens"]) for t in summary["tasks"]] == [("first", 6), ("second", 3)]
    assert summary["schema"] == "moepp-bench/routing-stats" and summary["provenance"]["torch"]
    assert "Routing per MoE layer" in stdout


def test_capacity_drops_counted_per_layer(tmp_path, capsys, monkeypatch):
    ckpt = save_forced(tmp_path / "cap", capacity_factor=1.0)
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[0, 1, 2, 3, 0, 0, 3, 2, 1]]))  # one unpadded sequence: capacity sees 9 tokens
    out = tmp_path / "out"
    code, _, err = run_cli([ckpt, "--token-ids", ids, "--out", out, "--no-plots", "--no-ablate-gating-residual"],
                           capsys, monkeypatch)
    assert code == 0, err
    # 18 slots; C_FFN = ceil(0.75 * 18 / 5.5) = 3, C_ZC = ceil(18 / 5.5) = 4.
    load = by_layer_expert(read_csv(out / "expert_load.csv"))
    assert [int(load[(0, e)]["kept"]) for e in range(6)] == [3, 3, 2, 0, 2, 4]
    assert [int(load[(1, e)]["kept"]) for e in range(6)] == [3, 3, 0, 2, 2, 4]
    assert [int(load[(0, e)]["tokens"]) for e in range(6)] == [5, 5, 2, 0, 2, 4]  # routed, before drops
    rows = {(int(r["layer"]), r["experts"]): r for r in read_csv(out / "imbalance.csv")}
    assert float(rows[(0, "all")]["drop_rate"]) == pytest.approx(4 / 18)
    assert float(rows[(1, "all")]["drop_rate"]) == pytest.approx(4 / 18)


def test_gating_residual_ablation_changes_scores_as_computed(tmp_path, forced_ids, capsys, monkeypatch):
    residual = 0.3
    ckpt = save_forced(tmp_path / "res", residual=residual)
    out = tmp_path / "out"
    code, _, err = run_cli([ckpt, "--token-ids", forced_ids, "--out", out, "--no-plots", "--ablate-gating-residual"],
                           capsys, monkeypatch)
    assert code == 0, err
    rows = {(r["gating_residual"], int(r["layer"]), r["rank"]): float(r["mean"])
            for r in read_csv(out / "routing_scores.csv")}
    for residual_state, scale in (("on", residual), ("off", 0.0)):
        for layer in (0, 1):
            scores = []
            for t in TOKENS:
                prev = [forced_logit(0, t, e) for e in range(6)] if layer == 1 else None
                scores.append(sorted(forced_scores(layer, t, prev, scale), reverse=True)[0])
            assert rows[(residual_state, layer, "top1")] == pytest.approx(statistics.fmean(scores), rel=1e-5)
    assert rows[("on", 0, "top1")] == rows[("off", 0, "top1")]  # layer 0 has no residual input
    assert rows[("on", 1, "top1")] != pytest.approx(rows[("off", 1, "top1")], rel=1e-3)
    summary = json.loads((out / "summary.json").read_text())
    assert "mean_ffn_experts_no_residual" in summary["rows"][1]


def test_plots_are_drawn_as_png_and_svg(forced_ckpt, forced_ids, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    code, _, err = run_cli([forced_ckpt, "--token-ids", forced_ids, "--out", out, "--min-count", 1], capsys,
                           monkeypatch)
    assert code == 0, err
    for name in ("expert_load", "ffn_per_token", "task_expert_types", "token_ffn", "routing_scores", "imbalance",
                 "coactivation"):
        for ext in ("png", "svg"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000, f"{name}.{ext}"
    assert not list(out.glob(".*"))  # no temporary or spill files left


# Official format -------------------------------------------------------------------------------------------
def official_top2_counts(ckpt: Path, input_ids: torch.Tensor) -> list[list[int]]:
    """Expert counts per layer computed the way the official code routes, from the tensors in the official file:
    logits = wg(x) (+ gate_map(previous logits) after layer 0), optional std normalisation, softmax, top-2.
    Only the router inputs come from the model, captured by hooks."""
    config = json.loads((ckpt / "config.json").read_text())
    state = load_file(str(ckpt / "model.safetensors"))
    model = load_pretrained(ckpt)
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach().double()))
             for layer in model.moe_layers]
    with torch.no_grad():
        model(input_ids)
    for h in hooks:
        h.remove()
    counts, prev = [], None
    n = config["num_experts"][0]
    for i, x in enumerate(inputs):
        x = x.reshape(-1, x.shape[-1])
        g = f"model.layers.{i}.mlp.moe.gate."
        if config["moe_2layer_gate"]:
            logits = torch.tanh(x @ state[g + "wg.0.weight"].double().T) @ state[g + "wg.2.weight"].double().T
        else:
            logits = x @ state[g + "wg.weight"].double().T
        if prev is not None:
            logits = logits + prev @ state[g + "gate_map.weight"].double().T
        prev = logits
        z = logits / logits.std(dim=1, keepdim=True) * config["moe_gate_norm_std"] if config["moe_use_logits_norm"] \
            else logits
        top2 = torch.softmax(z, dim=1).topk(2, dim=1).indices
        counts.append(torch.bincount(top2.reshape(-1), minlength=n).tolist())
    return counts


def expert_tokens_from_csv(path: Path, n_layers: int, n_experts: int) -> list[list[int]]:
    load = by_layer_expert(read_csv(path))
    return [[int(load[(layer, e)]["tokens"]) for e in range(n_experts)] for layer in range(n_layers)]


@pytest.mark.parametrize("style", ["release", "defaults"])
def test_official_layout_counts_equal_the_official_router(style, tmp_path, capsys, monkeypatch):
    ckpt = write_official_routing(official_model(style), tmp_path / f"official-{style}")
    input_ids = torch.randint(0, 96, (4, 40), generator=torch.Generator().manual_seed(1))
    ids = tmp_path / "ids.pt"
    torch.save(input_ids, ids)
    out = tmp_path / "out"
    code, _, err = run_cli([ckpt, "--token-ids", ids, "--out", out, "--no-plots", "--no-ablate-gating-residual"],
                           capsys, monkeypatch)
    assert code == 0, err
    expected = official_top2_counts(ckpt, input_ids)
    assert expert_tokens_from_csv(out / "expert_load.csv", 3, 10) == expected
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "official" and summary["tau_known"] is False
    ffn = read_csv(out / "ffn_per_token.csv")
    assert ffn[0]["k_rho"] == "" and float(ffn[0]["k_rho_assumed_tau"]) == pytest.approx(2 * 4.5 / 8.5)


@pytest.mark.parametrize("name", OFFICIAL_FIXTURE_NAMES)
def test_official_fixture_counts_equal_what_the_official_code_counted(name, tmp_path, capsys, monkeypatch):
    fixture = official_fixture(name)
    expected = json.loads((fixture / "expected.json").read_text())
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(expected["input_ids"]))
    out = tmp_path / "out"
    code, _, err = run_cli([fixture, "--token-ids", ids, "--out", out, "--no-plots", "--no-ablate-gating-residual"],
                           capsys, monkeypatch)
    assert code == 0, err
    want = [layer["expert_tokens"] for layer in expected["layers"]]
    assert expert_tokens_from_csv(out / "expert_load.csv", len(want), expected["num_experts"]) == want
    with safe_open(str(out / "routing.safetensors"), "pt") as fh:
        for i, layer in enumerate(expected["layers"]):
            got = fh.get_tensor(f"layer{i}.topk_ids")
            assert [sorted(p) for p in got.tolist()] == [sorted(p) for p in layer["top2"]]


# Token input -----------------------------------------------------------------------------------------------
def byte_level_bpe(path: Path, text: str) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return path


CODE = 'def first(xs):\n    """The first item."""\n    return xs[0]\n\n\nclass Box:\n    pass\n  \n'
VERSE = "Is this a dagger which I see before me,\nThe handle toward my hand?\n\n"


def test_text_is_streamed_in_blocks_without_changing_the_tokens(tmp_path, monkeypatch):
    text = CODE * 40 + VERSE * 20
    tok = token_input.load_tokenizer(byte_level_bpe(tmp_path / "bpe.json", text))
    path = tmp_path / "long.txt"
    path.write_text(text)
    monkeypatch.setattr(token_input, "BLOCK_BYTES", 37)  # many blocks: cuts next to blank lines and indents
    blocks = list(token_input._text_blocks(path))
    assert len(blocks) > 20 and "".join(blocks) == text
    whole = tok.encode(text)
    streamed = torch.cat(list(token_input._text_token_stream(path, tok))).tolist()
    assert streamed == whole
    inputs = token_input.open_inputs(texts=[path], token_ids=None, tokenizer=tok, vocab_size=300, seq_len=16,
                                     batch_size=3, max_tokens=100)
    batches = list(inputs.batches())
    assert inputs.total_tokens == 100 == sum(b.n_tokens for b in batches)
    joined = torch.cat([b.input_ids_BS[b.mask_BS] for b in batches]).tolist()
    assert joined == whole[:100]
    starts = torch.cat([b.start_B for b in batches]).tolist()
    assert starts == list(range(0, 100, 16))


def test_utf8_error_names_the_byte_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(token_input, "BLOCK_BYTES", 8)
    path = tmp_path / "bad.txt"
    path.write_bytes("héllo wörld ".encode() * 3 + b"\xff tail")
    with pytest.raises(token_input.BenchError, match=r"bad.txt: not UTF-8 text \(invalid byte at offset 42\)"):
        list(token_input._text_blocks(path))


def test_token_id_files_in_every_format(tmp_path):
    import numpy as np

    rows = [[1, 2, 3, 0, 0], [4, 5, 6, 7, 0]]
    paths = {"json": tmp_path / "ids.json", "pt": tmp_path / "ids.pt", "npy": tmp_path / "ids.npy"}
    paths["json"].write_text(json.dumps(rows))
    torch.save(torch.tensor(rows), paths["pt"])
    np.save(paths["npy"], np.array(rows, dtype=np.int32))
    for kind, path in paths.items():
        inputs = token_input.open_inputs(texts=[], token_ids=path, tokenizer=None, vocab_size=8, seq_len=3,
                                         batch_size=8, max_tokens=None, pad_id=0)
        (batch,) = list(inputs.batches())
        # pad id 0 dropped, rows cut into windows of 3: [1 2 3] [4 5 6] [7]
        assert batch.input_ids_BS[batch.mask_BS].tolist() == [1, 2, 3, 4, 5, 6, 7], kind
        assert batch.mask_BS.sum(1).tolist() == [3, 3, 1], kind
        assert batch.start_B.tolist() == [0, 3, 6], kind  # offsets in the stream without padding
