"""`moepp-bench report` on small result files written here: the tables' numbers, every figure a valid PNG and
SVG, the self-contained HTML, --compare with its ratios, and bad input refused with exit code 2 and nothing
written."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from moepp_bench.app import main
from moepp_bench.report.files import result_document, rows_to_csv, write_atomic, write_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_FFN_1B, N_ZC_1B = 16, 4  # the 1b preset: 16 FFN experts, 4 zero-computation experts, K = 2


def prov(**extra) -> dict:
    return {"command": "moepp-bench test", "git_revision": "abc123", "moepp_version": "0.1.0", "torch": "2.13.0",
            "python": "3.11", "device": "cpu", "device_name": "Test CPU", "cpu_count": 2, "threads": 2,
            "dtype": "float32", "hostname": "host-a", "utc_time": "2026-01-01T00:00:00Z", **extra}


def rho(tau: float, n_ffn: int = N_FFN_1B, n_zc: int = N_ZC_1B) -> float:
    return tau * n_ffn / (tau * n_ffn + n_zc)


# Result files ----------------------------------------------------------------------------------------------------
def throughput_rows(preset: str = "1b", time_scale: float = 1.0) -> list[dict]:
    """MoE 100 ms per 1024 tokens; MoE++ tau 0.25 at 50 ms (speedup 2.0), tau 0.75 at 80 ms (1.25)."""
    rows = []
    for tokens in (1024, 2048):
        f = tokens / 1024 * time_scale
        moe_ms = 100.0 * f

        def row(model, tau, ms, frac, backend="sorted"):
            ideal = 1.0 / frac
            return {"model": model, "preset": preset, "tau": tau, "tokens": tokens, "dtype": "float32",
                    "backend": backend, "routing": "balanced", "pass": "fwd", "ffn_slot_fraction": frac,
                    "time_ms_median": ms, "time_ms_iqr": 0.02 * ms, "tokens_per_s": tokens / ms * 1e3,
                    "speedup": moe_ms / ms, "ideal_speedup": ideal, "efficiency": moe_ms / ms / ideal,
                    "gflops_per_s": 50.0, "vs_dense_ceiling": 0.4}
        rows += [row("moe", None, moe_ms, 1.0), row("moe-loop", None, 300.0 * f, 1.0, "loop"),
                 row("dense-ceiling", None, 40.0 * f, 1.0, "dense"),
                 row("moepp", 0.25, 50.0 * f, rho(0.25)), row("moepp", 0.75, 80.0 * f, rho(0.75))]
    return rows


def flops_rows(preset: str = "1b") -> list[dict]:
    """Forward FLOPs per component (backward twice that): router 1e8, FFN 8e9 * FFN share, constant 1e6."""
    rows = []
    for model, tau in (("moe", None), ("moepp", 0.25)):
        share = 1.0 if model == "moe" else rho(0.25)
        comps = {"router": 1e8, "ffn_experts": 8e9 * share, "constant_experts": 0.0 if model == "moe" else 1e6,
                 "copy_experts": 0.0, "zero_experts": 0.0}
        for phase, mult in (("forward", 1), ("backward", 2)):
            for comp, flops in [*comps.items(), ("total", sum(comps.values()))]:
                rows.append({"model": model, "preset": preset, "checkpoint": None, "layer": None, "tau": tau,
                             "tokens": 4096, "dtype": "float32", "backend": "sorted", "routing": "balanced",
                             "gating_residual": True, "input": "random activations", "pass": phase,
                             "component": comp, "slots": 0, "flops": int(flops * mult),
                             "counted_flops": int(flops * mult), "flops_rel_diff": 0.0, "weight_bytes": 0,
                             "gather_bytes": 0, "combine_bytes": 0, "bytes": int(2e6 * mult),
                             "activated_params_per_token": 1000.0, "ffn_slot_fraction": share,
                             "rho": 1.0 if model == "moe" else rho(0.25), "ffn_flops_ratio_vs_vanilla": share})
    return rows


def comm_row(model: str, tau: float, P: int, measured: bool, preset: str = "1b") -> dict:
    share = 1.0 if model == "moe" else rho(tau)
    per_token = 2 * share * (P - 1) / P * 768 * 2
    row = {"model": model, "preset": preset, "world_size": P, "tau": tau, "tokens_per_rank": 1024,
           "routing": "balanced", "dtype": "bfloat16", "d_model": 768, "top_k": 2, "n_ffn": N_FFN_1B,
           "n_zc": N_ZC_1B, "bytes_per_element": 2, "rho": share, "ffn_slot_fraction": share,
           "bytes_per_token_balance": per_token, "bytes_ratio_vs_moe": share}
    if measured:
        row.update(bytes_per_token_measured=per_token * 1.01, analytic_matches=True, dispatch_ms=1.0,
                   combine_ms=1.0, count_exchange_ms=0.1, expert_ms=2.0)
    return row


def write_routing_run(out: Path, name: str = "tiny-moepp", zero_share: float = 0.2, **provenance) -> None:
    """A 2-layer routing-stats output: summary.json and the CSV tables beside it."""
    out.mkdir(parents=True)
    ffn = []
    for task, mean in (("all", 1.2), ("prose", 1.1), ("code", 1.3)):
        for layer in (0, 1, "all"):
            ffn.append({"task": task, "layer": layer, "tokens": 100, "ffn_0": 10, "ffn_1": 60, "ffn_2": 30,
                        "mean_ffn_experts": mean, "k_rho": 0.857, "k_rho_assumed_tau": None,
                        "share_ffn": mean / 2, "share_constant": 0.2, "share_copy": 0.6 - mean / 2 - zero_share,
                        "share_zero": zero_share})
    hist, scores, imbalance = [], [], []
    for residual in ("on", "off"):
        for layer in (0, 1):
            for rank in ("top1", "top2"):
                for b in range(100):
                    hist.append({"gating_residual": residual, "layer": layer, "rank": rank, "bin_lo": b / 100,
                                 "bin_hi": (b + 1) / 100, "tokens": 50 if 20 <= b < 22 + (residual == "off") else 0})
                scores.append({"gating_residual": residual, "layer": layer, "rank": rank, "tokens": 100,
                               "mean": 0.21, "variance": 1e-4, "min": 0.2, "max": 0.23})
    for layer in (0, 1):
        for group, n in (("ffn", 4), ("all", 8)):
            imbalance.append({"layer": layer, "experts": group, "n_experts": n, "slots": 200, "cv": 0.125,
                              "max_over_mean": 1.2, "maxvio": 0.2, "gini": 0.07, "entropy": 1.3,
                              "entropy_norm": 0.99, "jain": 0.98,
                              "maxvio_vs_tau_target": 0.4 if group == "all" else None, "drop_rate": None})
    tables = {"ffn_per_token": ffn, "ffn_per_token_no_residual": ffn, "routing_score_hist": hist,
              "routing_scores": scores, "imbalance": imbalance}
    for table, rows in tables.items():
        write_atomic(out / f"{table}.csv", rows_to_csv(rows))
    summary_rows = [{"layer": layer, "tokens": 100, "mean_ffn_experts": 1.2, "k_rho": 0.857, "share_ffn": 0.6,
                     "share_zero": zero_share, "cv_ffn": 0.125} for layer in (0, 1)]
    tokens = [{"token_id": i, "token": f" tok{i}", "occurrences": 10 + i, "mean_ffn_experts": 2.0 - i / 10}
              for i in range(3)]
    doc = result_document("routing-stats", 1, summary_rows, prov(**provenance), checkpoint=f"ckpts/{name}",
                          checkpoint_name=name, format="moepp", tau=0.75, tau_known=True, rho=0.4286, k_rho=0.857,
                          top_k=2, n_experts=8, n_ffn=4, n_zc=4,
                          expert_types=["ffn"] * 4 + ["constant"] * 2 + ["copy", "zero"],
                          tasks=[{"name": "prose"}, {"name": "code"}], tokens=200, min_count=10,
                          highest_tokens=tokens, lowest_tokens=tokens[::-1])
    write_atomic(out / "summary.json", json.dumps(doc))


def write_checkpoint(path: Path) -> None:
    """A checkpoint directory: its config.json and tokenizer.json are not results, training.json is."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"format": "moepp", "model": {}}))
    (path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    (path / "model.safetensors").write_bytes(b"\0" * 16)
    card = result_document("training", 1, [{"model": path.name, "val_loss": 3.21, "val_ppl": 24.78,
                                            "val_zc_share": 0.55, "target_zc_share": 0.5714, "tokens_seen": 2000000,
                                            "parameters": 16000000}], prov())
    (path / "training.json").write_text(json.dumps(card))


def write_study(root: Path, preset: str = "1b", time_scale: float = 1.0, routing_name: str = "tiny-moepp",
                zero_share: float = 0.2, **provenance) -> Path:
    write_results(root / "throughput", "throughput", 1, throughput_rows(preset, time_scale), prov(**provenance))
    write_results(root / "flops", "flops", 1, flops_rows(preset), prov(**provenance))
    measured = [comm_row(m, t, P, True, preset) for P in (2, 4) for t in (0.25, 0.75) for m in ("moepp", "moe")]
    write_results(root / "comm", "comm", 1, measured, prov(**provenance))
    predicted = [comm_row(m, t, P, False, preset) for P in (2, 4, 8, 16) for t in (0.25, 0.75)
                 for m in ("moepp", "moe")]
    write_results(root / "comm", "comm_predict", 1, predicted, prov(**provenance))
    write_routing_run(root / "routing" / routing_name, routing_name, zero_share, **provenance)
    return root


# Running the command ---------------------------------------------------------------------------------------------
def run_report(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """The console entry point in this process: its exit code and stderr."""
    monkeypatch.setattr(sys, "argv", ["moepp-bench", "report", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def md_table(md: str, caption_start: str) -> list[dict]:
    """The rows of the Markdown table whose caption starts with caption_start, as {header: cell}."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"*{caption_start}"))
    head = lines[start + 2]
    headers = [h.strip() for h in head.strip("|").split("|")]
    rows = []
    for line in lines[start + 4:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(headers, (c.strip() for c in line.strip("|").split("|")))))
    return rows


class _TagCounter(HTMLParser):
    """Counts elements and checks that every one that opens also closes, in order."""

    VOID = {"meta", "img", "br", "hr", "link"}

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open.pop() == tag, f"</{tag}> closes nothing open"


def check_figures(report: Path) -> list[str]:
    """Every figure the Markdown links exists, as a valid PNG with an SVG beside it; returns the stems."""
    md = (report / "report.md").read_text()
    pngs = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", md)
    assert pngs and len(pngs) == len(set(pngs))
    for rel in pngs:
        png = report / rel
        assert png.read_bytes()[:8] == PNG_MAGIC
        height, width = mpimg.imread(png).shape[:2]
        assert width > 300 and height > 200
        root = ET.parse(png.with_suffix(".svg")).getroot()
        assert root.tag.endswith("svg")
    on_disk = sorted(p.relative_to(report).as_posix() for p in (report / "figures").iterdir())
    assert on_disk == sorted([*pngs, *(p[:-4] + ".svg" for p in pngs)])
    return [Path(p).stem for p in pngs]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = write_study(tmp_path_factory.mktemp("study") / "results")
    write_checkpoint(root / "checkpoints" / "tiny-moepp")
    return root


@pytest.fixture(scope="module")
def report(study, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "report"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["moepp-bench", "report", str(study), "--out", str(out)])
        with pytest.raises(SystemExit) as exc:
            main()
    assert exc.value.code == 0
    return out


# A report ---------------------------------------------------------------------------------------------------------
def test_report_writes_markdown_html_and_every_figure(report):
    stems = check_figures(report)
    assert set(stems) == {"throughput_speedup_vs_tau", "throughput_tokens_per_s", "flops_breakdown",
                          "comm_bytes_per_token", "routing_task_expert_types", "routing_ffn_per_layer",
                          "routing_tokens", "routing_scores"}
    html = (report / "report.html").read_text()
    # self-contained: every figure embedded, nothing fetched from elsewhere
    assert html.count('src="data:image/png;base64,') == len(stems)
    assert not re.search(r'(src|href)="(?!data:)', html)
    assert sorted(p.name for p in report.iterdir()) == ["figures", "report.html", "report.md"]
    # the HTML holds what the Markdown holds: the same tables and headings, well nested
    parser = _TagCounter()
    parser.feed(html)
    md = (report / "report.md").read_text()
    assert parser.open == [] and parser.counts["table"] == len(re.findall(r"^\|---", md, flags=re.M))
    assert parser.counts["h2"] == len(re.findall(r"^## ", md, flags=re.M)) >= 5
    assert not [p for p in report.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_throughput_table_has_speedup_ideal_efficiency_and_table3(report):
    md = (report / "report.md").read_text()
    rows = md_table(md, "MoE++ against the vanilla MoE")
    by = {(r["tokens"], r["tau"]): r for r in rows}
    assert len(rows) == 4
    r = by[("1,024", "0.25")]
    assert (r["MoE ms"], r["MoE++ ms"], r["speedup"], r["ideal"], r["efficiency"]) == ("100.0", "50.00", "2.00",
                                                                                        "2.00", "1.00")
    # the paper's Table 3 for 1b at tau 0.25: 1.59 of an ideal 2.00
    assert (r["paper speedup"], r["paper ideal 1/rho"], r["paper efficiency"]) == ("1.59", "2.00", "0.80")
    r = by[("2,048", "0.75")]
    assert (r["MoE ms"], r["MoE++ ms"], r["speedup"], r["ideal"], r["efficiency"]) == ("200.0", "160.0", "1.25",
                                                                                        "1.33", "0.94")
    assert r["paper speedup"] == "1.22"
    base = md_table(md, "The vanilla layer against the naive per-expert loop")
    assert [(b["tokens"], b["loop / MoE"]) for b in base] == [("1,024", "3.00"), ("2,048", "3.00")]
    # settings shared by every row move into the caption
    assert "preset 1b" in md and "backend sorted" in md


def test_flops_comm_and_routing_tables(report):
    md = (report / "report.md").read_text()
    flops = {r["model"]: r for r in md_table(md, "Matmul FLOPs per layer call")}
    assert flops["moe"]["forward GFLOP"] == "8.100" and flops["moe"]["backward GFLOP"] == "16.20"
    assert flops["moepp"]["FFN GFLOP"] == "4.000" and flops["moepp"]["FFN vs MoE"] == "0.500"
    comm = md_table(md, "Measured all-to-all bytes per token")
    row = next(r for r in comm if r["P"] == "4" and r["model"] == "moepp" and r["tau"] == "0.25")
    # K rho (P-1)/P D b = 2 * 0.5 * 3/4 * 768 * 2 = 1152 bytes per token at balance
    assert (row["predicted B/token"], row["measured / predicted"], row["vs MoE"]) == ("1152", "1.010", "0.500")
    predict = md_table(md, "Predicted bytes per token at balance")
    assert next(r for r in predict if r["model"] == "moe")["P=16"] == "2880"
    overview = md_table(md, "Routing over all layers and tasks")
    assert [(r["run"], r["FFN experts per token"], r["zero %"]) for r in overview] == [("tiny-moepp", "1.200", "20.0")]
    tasks = md_table(md, "tiny-moepp: routing per task")
    assert [(r["task"], r["FFN experts per token"]) for r in tasks] == [("prose", "1.100"), ("code", "1.300")]
    imbalance = md_table(md, "tiny-moepp: load imbalance per layer")
    assert len(imbalance) == 4 and {r["CV"] for r in imbalance} == {"0.125"}


def test_report_lists_provenance_and_skips_checkpoint_files(report):
    md = (report / "report.md").read_text()
    kinds = re.findall(r"^\| [^|]+\.json \| ([a-z_-]+) \|", md, flags=re.M)
    assert sorted(kinds) == ["comm", "comm_predict", "flops", "routing-stats", "throughput", "training"]
    assert "config.json" not in md and "tokenizer.json" not in md
    card = md_table(md, "Checkpoints found beside the results")
    assert card[0]["validation perplexity"] == "24.78"
    assert "moepp-bench test" in md and "abc123" in md


def test_report_reads_what_the_commands_write(tmp_path, monkeypatch, capsys):
    """The reader against the real writers: throughput, flops, comm --predict and routing-stats, run here on
    tiny settings, then reported; the report's numbers are the result files' numbers."""
    from routing_testing import save_forced

    res = tmp_path / "res"
    ckpt = save_forced(tmp_path / "ckpt")
    (tmp_path / "verse.txt").write_text("a b c d " * 40)
    (tmp_path / "prose.txt").write_text("d c b a a " * 40)
    commands = [
        ["throughput", "--preset", "tiny", "--tokens", "64", "--tokens", "128", "--tau", "0.5", "--tau", "1.0",
         "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", res / "throughput"],
        ["flops", "--preset", "tiny", "--tokens", "64", "--tau", "0.5", "--no-cross-check", "--out", res / "flops"],
        ["comm", "--preset", "tiny", "--predict", "--tau", "0.5", "--out", res / "comm"],
        ["routing-stats", ckpt, tmp_path / "verse.txt", tmp_path / "prose.txt", "--no-plots", "--min-count", "1",
         "--out", res / "routing"],
    ]
    for args in commands:
        monkeypatch.setattr(sys, "argv", ["moepp-bench", *map(str, args)])
        with pytest.raises(SystemExit) as exc:
            main()
        assert exc.value.code == 0, capsys.readouterr().err
    code, err = run_report([res, "--out", tmp_path / "rep"], monkeypatch, capsys)
    assert code == 0, err
    md = (tmp_path / "rep" / "report.md").read_text()
    written = json.loads((res / "throughput" / "throughput.json").read_text())["rows"]
    speedups = {(r["tokens"], r["tau"]): f"{r['speedup']:.2f}" for r in written if r["model"] == "moepp"}
    shown = {(int(r["tokens"].replace(",", "")), float(r["tau"])): r["speedup"]
             for r in md_table(md, "MoE++ against the vanilla MoE")}
    assert shown == speedups
    tasks = {r["task"]: r["FFN experts per token"] for r in md_table(md, "ckpt: routing per task")}
    with open(res / "routing" / "ffn_per_token.csv", newline="") as fh:
        per_task = {r["task"]: f"{float(r['mean_ffn_experts']):.3f}" for r in csv.DictReader(fh)
                    if r["layer"] == "all" and r["task"] != "all"}
    assert tasks == per_task and set(tasks) == {"verse", "prose"}
    assert {"throughput_speedup_vs_tau", "throughput_tokens_per_s", "flops_breakdown", "comm_bytes_per_token",
            "routing_task_expert_types", "routing_scores"} <= set(check_figures(tmp_path / "rep"))


# --compare --------------------------------------------------------------------------------------------------------
def test_compare_puts_runs_side_by_side_with_ratios(study, report, tmp_path, monkeypatch, capsys):
    b = write_study(tmp_path / "b", time_scale=0.5, routing_name="tiny-moepp-b", zero_share=0.25,
                    git_revision="def456", hostname="host-b")
    out = tmp_path / "cmp"
    code, err = run_report(["--compare", study, b, "--out", out], monkeypatch, capsys)
    assert code == 0, err
    md = (out / "report.md").read_text()
    ratios = md_table(md, "B against A for every setting")
    assert len(ratios) == 10 and {r["time B/A"] for r in ratios} == {"0.500"}
    assert {r["tokens/s B/A"] for r in ratios} == {"2.000"}
    differs = {r["what differs"]: (r["A"], r["B"]) for r in md_table(md, "Environment and code of A and B")}
    assert differs == {"git": ("abc123", "def456"), "host": ("host-a", "host-b")}
    routing = md_table(md, "Per layer, B against A")
    assert [r["B zero %"] for r in routing] == ["25.0", "25.0"]
    assert "*Per layer, B against A (run tiny-moepp vs tiny-moepp-b)*" in md
    flops = md_table(md, "Whole-layer FLOPs and bytes, B against A")
    assert {r["FLOPs B/A"] for r in flops} == {"1.000"}
    stems = check_figures(out)
    assert "routing_scores" in stems and "comm_bytes_per_token" in stems
    # side by side: a compare figure is about twice as wide as the same figure alone
    alone = mpimg.imread(report / "figures" / "flops_breakdown.png").shape[1]
    assert mpimg.imread(out / "figures" / "flops_breakdown.png").shape[1] > 1.7 * alone


def test_compare_shows_a_kind_only_one_side_has_on_that_side(tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write_results(a / "flops", "flops", 1, flops_rows(), prov())
    write_results(a / "comm", "comm", 1, [comm_row("moepp", 0.25, 2, True), comm_row("moe", 0.25, 2, True)], prov())
    write_results(b / "flops", "flops", 1, flops_rows(), prov())
    out = tmp_path / "cmp"
    code, err = run_report(["--compare", a, b, "--out", out], monkeypatch, capsys)
    assert code == 0, err
    md = (out / "report.md").read_text()
    assert "Only A holds comm results; they are shown on its side only, without ratios." in md
    assert [r["P"] for r in md_table(md, "Measured all-to-all bytes per token")] == ["2", "2"]
    assert check_figures(out) == ["flops_breakdown", "comm_bytes_per_token"]
    wide = mpimg.imread(out / "figures" / "flops_breakdown.png").shape[1]
    alone = mpimg.imread(out / "figures" / "comm_bytes_per_token.png").shape[1]
    assert alone < 0.7 * wide  # drawn alone, not beside an empty B panel


# Bad input --------------------------------------------------------------------------------------------------------
def test_compare_refuses_different_presets(study, tmp_path, monkeypatch, capsys):
    b = write_study(tmp_path / "b", preset="0.6b")
    out = tmp_path / "cmp"
    code, err = run_report(["--compare", study, b, "--out", out], monkeypatch, capsys)
    assert code == 2
    assert err.startswith("error: --compare: A's throughput results are for preset 1b and B's for 0.6b")
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_compare_refuses_what_it_cannot_pair(study, tmp_path, monkeypatch, capsys):
    only_flops = tmp_path / "flops-only"
    write_results(only_flops, "flops", 1, flops_rows(), prov())
    routing_only = tmp_path / "routing-only"
    write_routing_run(routing_only / "run")
    code, err = run_report(["--compare", only_flops, routing_only, "--out", tmp_path / "c1"], monkeypatch, capsys)
    assert code == 2 and "no kind of result in common" in err
    twice = tmp_path / "twice"
    write_results(twice / "one", "flops", 1, flops_rows(), prov())
    write_results(twice / "two", "flops", 1, flops_rows(), prov())
    code, err = run_report(["--compare", study, twice, "--out", tmp_path / "c2"], monkeypatch, capsys)
    assert code == 2 and "B holds two flops results for the same setting" in err
    code, err = run_report([study, "--compare", study, twice, "--out", tmp_path / "c3"], monkeypatch, capsys)
    assert code == 2 and "not both" in err
    assert not any((tmp_path / name).exists() for name in ("c1", "c2", "c3"))


def test_empty_directory_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_report([tmp_path / "empty", "--out", tmp_path / "rep"], monkeypatch, capsys)
    assert code == 2 and "no moepp-bench result files" in err and "Traceback" not in err
    assert not (tmp_path / "rep").exists()


def test_newer_schema_version_is_refused(tmp_path, monkeypatch, capsys):
    write_results(tmp_path / "res", "flops", 2, flops_rows(), prov())
    code, err = run_report([tmp_path / "res", "--out", tmp_path / "rep"], monkeypatch, capsys)
    assert code == 2
    assert "version 2 is newer than this moepp-bench reads (version 1)" in err
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("content, message", [
    ({"schema": "moepp-bench/unheard-of", "schema_version": 1, "rows": []}, "unknown result schema"),
    ({"schema": "someone-else/thing", "schema_version": 1, "rows": []}, "unknown result schema"),
    ({"rows": [1, 2]}, "not a moepp-bench result (no \"schema\" key)"),
])
def test_unknown_json_is_refused(tmp_path, monkeypatch, capsys, content, message):
    write_results(tmp_path / "res", "flops", 1, flops_rows(), prov())
    (tmp_path / "res" / "other.json").write_text(json.dumps(content))
    code, err = run_report([tmp_path / "res", "--out", tmp_path / "rep"], monkeypatch, capsys)
    assert code == 2 and message in err and "other.json" in err
    assert not (tmp_path / "rep").exists()


def test_routing_summary_without_its_tables_is_refused(tmp_path, monkeypatch, capsys):
    write_routing_run(tmp_path / "res" / "run")
    (tmp_path / "res" / "run" / "imbalance.csv").unlink()
    code, err = run_report([tmp_path / "res", "--out", tmp_path / "rep"], monkeypatch, capsys)
    assert code == 2 and "without imbalance.csv" in err


def test_out_must_not_hold_the_inputs_or_other_files(study, tmp_path, monkeypatch, capsys):
    code, err = run_report([study, "--out", study], monkeypatch, capsys)
    assert code == 2 and "would replace the results" in err
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    code, err = run_report([study, "--out", other], monkeypatch, capsys)
    assert code == 2 and "not a report directory" in err
    assert (other / "keep.txt").read_text() == "mine"


def test_rerun_replaces_the_report_and_a_failure_keeps_the_old_one(tmp_path, monkeypatch, capsys):
    res = tmp_path / "res"
    write_results(res / "flops", "flops", 1, flops_rows(), prov())
    out = res / "report"  # inside the result directory: the report's own files are not read back
    assert run_report([res, "--out", out], monkeypatch, capsys)[0] == 0
    (out / "figures" / "stale.png").write_bytes(PNG_MAGIC)
    before = (out / "report.md").read_text()
    from moepp_bench.report import study as study_module

    def broken(*args):
        raise RuntimeError("disk full")
    monkeypatch.setattr(study_module, "SECTIONS", (*study_module.SECTIONS, broken))
    with pytest.raises(RuntimeError):
        run_report([res, "--out", out], monkeypatch, capsys)
    assert (out / "report.md").read_text() == before and (out / "figures" / "stale.png").exists()
    assert not [p for p in res.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert run_report([res, "--out", out], monkeypatch, capsys)[0] == 0
    assert not (out / "figures" / "stale.png").exists()
    assert [f.stem for f in (out / "figures").glob("*.png")] == ["flops_breakdown"]


def test_console_script_exits_2_with_one_line(tmp_path):
    """The installed `moepp-bench` entry point, as a user runs it."""
    (tmp_path / "empty").mkdir()
    exe = Path(sys.executable).with_name("moepp-bench")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moepp_bench.app"]
    proc = subprocess.run([*cmd, "report", str(tmp_path / "empty"), "--out", str(tmp_path / "rep")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "rep").exists()
