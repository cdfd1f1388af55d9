"""TRAINING.md and training.json: how a checkpoint was trained, written beside it."""

from __future__ import annotations

import json
from pathlib import Path

from .files import result_document, write_atomic, write_results

CARD_KIND = "training"
LOG_KIND = "train-log"
LOG_COLUMNS = ("step", "tokens_seen", "lr", "loss", "ce_loss", "balance_loss", "z_loss", "zc_share",
               "drop_share", "grad_norm", "tokens_per_s", "train_seconds", "cpu_seconds")


def write_train_log(out_dir: Path, log: list[dict], provenance: dict) -> None:
    """train-log.csv and train-log.json: one row per logging interval."""
    write_results(out_dir, LOG_KIND, 1, log, provenance, columns=LOG_COLUMNS)


def write_training_card(out_dir: Path, summary: dict, settings: dict, corpus: dict, commands: list[str],
                        provenance: dict) -> None:
    """training.json (the result envelope, one summary row) and TRAINING.md (the same, for people)."""
    doc = result_document(CARD_KIND, 1, [summary], provenance, commands=commands, settings=settings, corpus=corpus)
    write_atomic(out_dir / "training.json", json.dumps(doc, indent=2) + "\n")
    write_atomic(out_dir / "TRAINING.md", render_markdown(summary, settings, corpus, commands, provenance))


def _fmt_seconds(seconds: float) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes} min {sec:02d} s" if minutes else f"{sec} s"


def render_markdown(summary: dict, settings: dict, corpus: dict, commands: list[str], provenance: dict) -> str:
    kind = "vanilla MoE" if settings["vanilla"] else f"MoE++ at tau {settings['tau']}"
    exported = ", float32 weights before the export" if summary["weights_dtype"] != "float32" else ""
    lines = [
        f"# {summary['model']}: {kind}, preset {settings['preset']}",
        "",
        "Trained by `moepp-bench train` on the embedded corpus (see docs/train.md)."
        if corpus.get("source") == "embedded" else "Trained by `moepp-bench train` on user text.",
        "",
        "## Command" + ("s (the run was resumed)" if len(commands) > 1 else ""),
        "",
        "```",
        *commands,
        "```",
        "",
        "## Result",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| validation loss (nats/token{exported}) | {summary['val_loss']:.4f} |",
        f"| validation perplexity | {summary['val_ppl']:.2f} |",
        f"| unigram baseline on the same text (nats/token) | {summary['unigram_baseline']:.4f} |",
        f"| share of routing slots on zero-computation experts (validation) | {summary['val_zc_share']:.3f} |",
        f"| the same, last training steps | {summary['train_zc_share']:.3f} |",
        f"| balanced share the loss aims at, 1 - rho | {summary['target_zc_share']:.3f} |",
        f"| training time (wall clock of the steps) | {_fmt_seconds(summary['train_seconds'])} |",
        f"| CPU time of the steps (all threads) | {_fmt_seconds(summary['cpu_seconds'])} |",
        f"| steps | {summary['steps']:,} |",
        f"| tokens seen | {summary['tokens_seen']:,} |",
        f"| mean throughput (tokens/s) | {summary['tokens_per_s']:,.0f} |",
        f"| parameters | {summary['parameters']:,} |",
        f"| weights stored as | {summary['weights_dtype']} (routers float32) |",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in settings.items()),
        "",
        "## Corpus",
        "",
        f"sha256 fingerprint `{corpus.get('fingerprint', '-')}`; train {corpus.get('train_tokens', 0):,} tokens, "
        f"validation {corpus.get('val_tokens', 0):,} tokens.",
        "",
        "| source | documents (train) | characters (train) |",
        "|---|---|---|",
        *(f"| {src} | {row['documents']:,} | {row['chars']:,} |" for src, row in corpus.get("train", {}).items()),
        "",
        "## Machine",
        "",
        f"{provenance.get('device_name')}, threads: {provenance.get('threads')}, torch {provenance.get('torch')}, "
        f"Python {provenance.get('python')}, {provenance.get('platform')}; git {provenance.get('git_revision')}; "
        f"finished {provenance.get('utc_time')}.",
        "",
    ]
    return "\n".join(lines)
