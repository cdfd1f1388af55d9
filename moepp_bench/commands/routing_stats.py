"""`moepp-bench routing-stats`: how a checkpoint routes real text (the paper's Figures 4 to 6, and more).

The command parses and validates, measure.routing_stats accumulates, report.routing_files and
report.routing_plots write. Everything goes to a staging directory beside --out that replaces it only when the
run has finished, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional

import torch
import typer


from ..errors import BenchError
from ..measure.routing_stats import RoutingLayout, collect_routing_stats, extreme_tokens, layer_summary_rows
from ..measure.token_input import TextTokenizer, find_tokenizer, load_tokenizer, open_inputs
from ..provenance import provenance
from ..report.console import progress_bar, rich_table, stderr, stdout
from ..report.routing_files import (ROUTING_FILE, TRACE_FILE, RoutingIdsWriter, TraceWriter,
                                    write_routing_tables)

# From this file, not moepp_bench.__file__: a directory named moepp_bench in the working directory (the
# reference study's staging tree) can shadow the package as a namespace package whose __file__ is None.
PACKAGE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = PACKAGE_DIR / "data"
SHIPPED_CHECKPOINTS = DATA_DIR / "checkpoints"
DEFAULT_CHECKPOINT = "moepp-tau0.75"
EVAL_DIR = DATA_DIR / "eval"
DEFAULT_SEQ_LEN = 512
# Files a previous run may have left in --out that this run does not rewrite (so they would be stale).
PLOT_NAMES = ("expert_load", "ffn_per_token", "task_expert_types", "token_ffn", "routing_scores", "imbalance",
              "coactivation")
OPTIONAL_OUTPUTS = (TRACE_FILE, "ffn_per_token_no_residual.csv",
                    *(f"{name}.{ext}" for name in PLOT_NAMES for ext in ("png", "svg")))


def register(app: typer.Typer) -> None:
    app.command("routing-stats")(routing_stats)


def shipped_checkpoint_names() -> list[str]:
    if not SHIPPED_CHECKPOINTS.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_CHECKPOINTS.iterdir() if (p / "config.json").is_file())


def resolve_checkpoint(given: str | None) -> Path:
    """A path, or the name of a checkpoint that ships with moepp-bench (the MoE++ one when none is given)."""
    if given is None:
        path = SHIPPED_CHECKPOINTS / DEFAULT_CHECKPOINT
        if not (path / "config.json").is_file():
            raise BenchError(f"the shipped checkpoint {path} is missing; reinstall moepp-bench or give a CHECKPOINT")
        return path
    path = Path(given)
    if not path.exists() and given in shipped_checkpoint_names():
        return SHIPPED_CHECKPOINTS / given
    if path.is_file() and path.suffix.lower() in (".txt", ".json", ".pt", ".npy"):
        raise BenchError(f"{path}: a file where the CHECKPOINT goes; name the checkpoint first, e.g. "
                         f"`moepp-bench routing-stats {DEFAULT_CHECKPOINT} {path}`")
    return path


def default_texts() -> list[Path]:
    texts = sorted(EVAL_DIR.glob("*.txt")) if EVAL_DIR.is_dir() else []
    if not texts:
        raise BenchError(f"no evaluation texts in {EVAL_DIR}; give text files or --token-ids FILE")
    return texts


def _display_path(path: Path) -> str:
    """Paths in result files: relative to the repository or the working directory when inside them."""
    resolved = path.resolve()
    for root in (PACKAGE_DIR.parent, Path.cwd().resolve()):
        if resolved.is_relative_to(root):
            return str(resolved.relative_to(root))
    return str(path)


def _default_seq_len(checkpoint: Path, max_seq_len: int) -> int:
    """The training sequence length when the checkpoint records one (training.json), else 512."""
    try:
        training = json.loads((checkpoint / "training.json").read_text(encoding="utf-8"))
        value = int((training.get("settings") or {}).get("seq_len") or training.get("seq_len") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        value = 0
    return min(value or DEFAULT_SEQ_LEN, max_seq_len)


class _Staging:
    """A staging directory beside the output directory; commit() moves its files into place, abort() removes it
    (and any parent directories it had to create)."""

    def __init__(self, out: Path):
        self.out = out
        if out.exists() and not out.is_dir():
            raise BenchError(f"--out {out} is a file; give a directory")
        missing = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
        self.created_root = missing[-1] if missing else None
        out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        self.path.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result directory should not be

    def commit(self) -> None:
        if not self.out.exists():
            os.replace(self.path, self.out)
            return
        produced = {p.name for p in self.path.iterdir()}
        for name in produced:
            os.replace(self.path / name, self.out / name)
        for name in OPTIONAL_OUTPUTS:
            if name not in produced:
                (self.out / name).unlink(missing_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self.created_root is not None:
            shutil.rmtree(self.created_root, ignore_errors=True)


def routing_stats(
    checkpoint: Optional[str] = typer.Argument(
        None, help=f"Checkpoint directory (ours or the official MoE++ format), or the name of a shipped one "
                   f"({DEFAULT_CHECKPOINT}, moe). Default: the shipped MoE++ checkpoint.", show_default=False),
    texts: Optional[List[Path]] = typer.Argument(
        None, help="Text files, one task each (UTF-8). Default: the evaluation texts that ship with moepp-bench.",
        show_default=False),
    token_ids: Optional[Path] = typer.Option(
        None, "--token-ids", help="Token ids instead of text: a JSON list of token-id lists, or a 2-D .pt / .npy."),
    tokenizer: Optional[Path] = typer.Option(
        None, help="tokenizer.json or SentencePiece tokenizer.model. Default: the one in the checkpoint."),
    pad_id: Optional[int] = typer.Option(None, help="With --token-ids: this id marks padding; it is dropped."),
    max_tokens: Optional[int] = typer.Option(None, help="Route at most this many tokens of each input."),
    batch_size: int = typer.Option(8, help="Sequences per forward pass."),
    seq_len: Optional[int] = typer.Option(
        None, help="Tokens per sequence (text is cut into windows of this length). Default: the checkpoint's "
                   "training length (training.json), else 512.", show_default=False),
    out: Optional[Path] = typer.Option(None, help="Output directory (its files are replaced when the run "
                                                  "finishes).", show_default="results/routing/<checkpoint name>"),
    ablate_gating_residual: bool = typer.Option(
        True, "--ablate-gating-residual/--no-ablate-gating-residual",
        help="Also route with the gating residual switched off at inference (routing-score histograms as in "
             "the paper's Figure 6). Doubles the run time."),
    trace: bool = typer.Option(False, "--trace", help="Write trace.jsonl: every token's experts and gates per layer."),
    min_count: int = typer.Option(10, help="Tokens seen fewer times are left out of the highest/lowest lists."),
    top: int = typer.Option(10, help="How many highest and lowest tokens to list and plot."),
    device: str = typer.Option("cpu", help="cpu, or cuda where available."),
    threads: int = typer.Option(
        1, help="CPU threads for the forward passes (0: torch's default). One is the default: the shipped model "
                "is small, and on a busy two-core machine two threads ran 10 to 20 times slower than one."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Draw the PNG and SVG plots (tables are always "
                                                              "written)."),
) -> None:
    """Routing statistics of a checkpoint on text: expert load, FFN experts per token (per layer, per task,
    per token), routing scores with and without the gating residual, load imbalance, co-activation."""
    if min_count < 1 or top < 1:
        raise BenchError("--min-count and --top must be at least 1")
    if batch_size < 1:
        raise BenchError(f"--batch-size must be at least 1, got {batch_size}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BenchError(f"--device {device}: no CUDA device here; use --device cpu")
    elif device != "cpu":
        raise BenchError(f"--device must be cpu or cuda[:N], got {device!r}")
    if out is None:  # one directory per checkpoint, so runs on several checkpoints sit side by side
        out = Path("results/routing") / resolve_checkpoint(checkpoint).resolve().name
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {out} is a file; give a directory")
    if threads < 0:
        raise BenchError(f"--threads must be 0 (torch's default) or more, got {threads}")

    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        _run(checkpoint=checkpoint, texts=texts, token_ids=token_ids, tokenizer=tokenizer, pad_id=pad_id,
             max_tokens=max_tokens, batch_size=batch_size, seq_len=seq_len, out=out,
             ablate_gating_residual=ablate_gating_residual, trace=trace, min_count=min_count, top=top,
             device=device, plots=plots)
    finally:
        torch.set_num_threads(threads_before)


def _run(*, checkpoint, texts, token_ids, tokenizer, pad_id, max_tokens, batch_size, seq_len, out,
         ablate_gating_residual, trace, min_count, top, device, plots) -> None:
    """Everything after option checks: load, validate the inputs, route into a staging directory, commit."""
    from moepp import load_pretrained

    ckpt = resolve_checkpoint(checkpoint)
    model = load_pretrained(ckpt).to(device)
    cfg = model.cfg
    seq = seq_len if seq_len is not None else _default_seq_len(ckpt, cfg.max_seq_len)
    if not 1 <= seq <= cfg.max_seq_len:
        raise BenchError(f"--seq-len {seq} is outside 1..{cfg.max_seq_len} (the checkpoint's max_seq_len)")

    tokenizer_path = tokenizer if tokenizer is not None else find_tokenizer(ckpt)
    tok: TextTokenizer | None = load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    if token_ids is None and not texts:
        texts = default_texts()
    inputs = open_inputs(texts=list(texts or []), token_ids=token_ids, tokenizer=tok, vocab_size=cfg.vocab_size,
                         seq_len=seq, batch_size=batch_size, max_tokens=max_tokens, pad_id=pad_id)

    def token_string(token_id: int) -> str:
        return tok.token_string(token_id) if tok is not None else f"<{token_id}>"

    layout = RoutingLayout.from_model(model)
    staging = _Staging(out)
    try:
        routing_writer = RoutingIdsWriter(staging.path, layout.n_layers, layout.top_k, {
            "n_experts": str(layout.n_experts), "expert_types": json.dumps(list(layout.expert_types)),
            "checkpoint": _display_path(ckpt)})
        sinks = [routing_writer]
        trace_writer = None
        if trace:
            trace_writer = TraceWriter(staging.path / TRACE_FILE, [t.name for t in inputs.tasks], token_string)
            sinks.append(trace_writer)
        passes = 2 if ablate_gating_residual else 1
        with progress_bar("routing tokens", inputs.total_tokens * passes) as bar:
            run = collect_routing_stats(model, inputs, ablate_gating_residual=ablate_gating_residual,
                                        sinks=tuple(sinks), on_tokens=lambda n: bar.update(0, advance=n),
                                        device=device)
        routing_writer.finish()
        if trace_writer is not None:
            trace_writer.finish()
        info = model.checkpoint_info
        summary_extra = {
            "checkpoint": _display_path(ckpt), "checkpoint_name": ckpt.resolve().name, "format": info.format,
            "tau": layout.tau, "tau_known": layout.tau_known, "rho": layout.rho, "k_rho": layout.k_rho,
            "top_k": layout.top_k, "n_experts": layout.n_experts, "n_ffn": layout.n_ffn,
            "n_zc": layout.n_experts - layout.n_ffn, "expert_types": list(layout.expert_types),
            "gate_mode": cfg.moe.gate_mode, "logits_norm": cfg.moe.logits_norm, "capacity": layout.capacity,
            "capacity_factor": cfg.moe.capacity_factor,
            "tokenizer": _display_path(tok.path) if tok is not None else None,
            "tasks": [{"name": t.name, "path": _display_path(t.path), "kind": t.kind, "tokens": t.n_tokens,
                       "sequences": t.n_sequences} for t in inputs.tasks],
            "tokens": run.stats.n_tokens, "seq_len": seq, "batch_size": batch_size, "max_tokens": max_tokens,
            "pad_id": pad_id, "ablate_gating_residual": ablate_gating_residual, "min_count": min_count, "top": top,
            "seconds": run.seconds, "tokens_per_second": run.stats.n_tokens * passes / run.seconds,
        }
        prov = provenance(device=device, dtype=info.dtype)
        write_routing_tables(staging.path, run, token_string, prov, summary_extra)
        if plots:
            from ..report.routing_plots import draw_routing_plots

            draw_routing_plots(staging.path)
        staging.commit()
    except BaseException:
        staging.abort()
        raise
    _print_summary(run, out, token_string, min_count, top)


def _pct(value) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def _num(value, digits: int = 3) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def _print_summary(run, out: Path, token_string, min_count: int, top: int) -> None:
    lay = run.layout
    k_rho = f"K*rho = {lay.k_rho:.3f}" + ("" if lay.tau_known else f" if tau = {lay.tau:g} (tau not recorded)")
    rows = []
    for r in layer_summary_rows(run):
        row = {"MoE\nlayer": str(r["layer"]), "FFN per\ntoken": _num(r["mean_ffn_experts"])}
        if run.ablated is not None:
            row["residual\noff"] = _num(r["mean_ffn_experts_no_residual"])
        row.update({"FFN\n%": _pct(r["share_ffn"]), "const\n%": _pct(r["share_constant"]),
                    "copy\n%": _pct(r["share_copy"]), "zero\n%": _pct(r["share_zero"]),
                    "CV\nFFN": _num(r["cv_ffn"], 2), "r to\nnext": _num(r["corr_next_layer"], 2)})
        if lay.capacity:
            row["drop\n%"] = _pct(r["drop_rate"])
        rows.append(row)
    stdout.print(rich_table(rows, list(rows[0]), title=f"Routing per MoE layer ({k_rho})"))
    from ..measure.routing_stats import token_rows

    high, low = extreme_tokens(token_rows(run, token_string), min_count, top)
    for title, picked in ((f"Most FFN experts (seen >= {min_count} times)", high),
                          (f"Fewest FFN experts (seen >= {min_count} times)", low)):
        if picked:
            shown = [{"token": repr(r["token"]), "id": str(r["token_id"]), "seen": f"{r['occurrences']:,}",
                      "FFN/token": _num(r["mean_ffn_experts"])} for r in picked]
            stdout.print(rich_table(shown, list(shown[0]), title=title))
    if not high:
        stderr.print(f"no token was seen {min_count} times; lower --min-count to list tokens")
    stderr.print(f"routed {run.stats.n_tokens:,} tokens in {run.seconds:.1f} s; results in {out}/ "
                 f"(replay file {out / ROUTING_FILE})")
