"""`moepp-bench train`: train a small MoE++ (or vanilla MoE) decoder LM on the embedded corpus, resumably."""

from __future__ import annotations

import shlex
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, NamedTuple, Optional

import typer

from ..errors import BenchError
from ..train_presets import ALL_PRESETS, preset_vocab_size, train_config

# The shipped checkpoints were trained with these (see docs/train.md). beta is 10x the paper's 0.01: our balance
# loss has no factor N (as in the paper's formula), and at 0.01 a run this short kept about 0.65 of the slots on
# zero-computation experts instead of settling near 1 - rho = 0.4.
DEFAULTS = {"preset": "lm-small", "tau": 0.75, "steps": 800, "batch_size": 8, "seq_len": 256, "lr": 2e-3,
            "seed": 0, "beta": 0.1, "zloss": 0.001}


def register(app: typer.Typer) -> None:
    app.command("train")(train)


def train(
    preset: Optional[str] = typer.Option(None, help=f"Model size: {', '.join(ALL_PRESETS)} (default lm-small)."),
    tau: Optional[float] = typer.Option(None, help="Weight of zero-computation experts in the balance loss; "
                                                   "smaller sends more tokens to them (default 0.75)."),
    vanilla: bool = typer.Option(False, "--vanilla", help="Train the vanilla MoE with the same FFN experts "
                                                          "(no zero-computation experts)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps in total (default 800)."),
    tokens: Optional[int] = typer.Option(None, help="Train on this many tokens instead of --steps."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per step (default 8)."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per sequence (default 256)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate; AdamW, linear warm-up, then cosine "
                                                  "down to a tenth (default 0.002)."),
    warmup: Optional[int] = typer.Option(None, help="Warm-up steps (default a tenth of the steps, at most 100)."),
    seed: Optional[int] = typer.Option(None, help="Seed for the weights and the batch order (default 0)."),
    capacity_factor: Optional[float] = typer.Option(None, help="Expert capacity factor gamma (the paper: 1.1); "
                                                               "omit for dropless."),
    beta: Optional[float] = typer.Option(None, help="Heterogeneous balance-loss coefficient beta "
                                                    "(default 0.1; the paper: 0.01)."),
    zloss: Optional[float] = typer.Option(None, help="Router z-loss coefficient (default 0.001)."),
    vocab_size: Optional[int] = typer.Option(None, help="BPE vocabulary size (default: the preset's; 4096 for "
                                                        "lm-small)."),
    text: Optional[List[Path]] = typer.Option(None, help="Train on these UTF-8 files (or directories of .txt) "
                                                         "instead of the embedded corpus; repeatable."),
    out: Optional[Path] = typer.Option(None, help="Checkpoint directory to write (default "
                                                  "results/train/PRESET-moepp-tauTAU, or PRESET-moe)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out where it stopped."),
    stop_after: Optional[int] = typer.Option(None, help="Stop (and save) after this many steps in this session, "
                                                        "keeping the schedule of --steps: train in parts with "
                                                        "--resume."),
    save_every: int = typer.Option(100, help="Write the checkpoint and training state every N steps."),
    log_every: int = typer.Option(10, help="One row of train-log.csv every N steps."),
    save_dtype: Optional[str] = typer.Option(None, help="Dtype of the saved weights: float32 (default) or "
                                                        "bfloat16; routers stay float32, training is float32."),
    threads: int = typer.Option(0, help="CPU threads (0: torch's default; a resume: the run's own)."),
) -> None:
    """Train a small MoE++ (or vanilla MoE) LM on the embedded corpus; write a checkpoint directory.

    Writes config.json, model.safetensors, tokenizer.json, TRAINING.md and trainer_state.pt to --out.

    Ctrl-C saves at the next step boundary; --resume continues bit-for-bit.
    """
    import torch

    from ..measure import training as T

    given = {"preset": preset, "tau": tau, "vanilla": vanilla or None, "batch_size": batch_size,
             "seq_len": seq_len, "lr": lr, "warmup_steps": warmup, "seed": seed, "vocab_size": vocab_size,
             "capacity_factor": capacity_factor, "balance_coef": beta, "zloss_coef": zloss}
    _check_numbers(steps=steps, tokens=tokens, batch_size=batch_size, seq_len=seq_len, lr=lr, tau=tau,
                   warmup=warmup, capacity_factor=capacity_factor, vocab_size=vocab_size, save_every=save_every,
                   log_every=log_every, threads=threads, beta=beta, zloss=zloss, seed=seed, stop_after=stop_after)
    if steps is not None and tokens is not None:
        raise BenchError("give --steps or --tokens, not both")
    if save_dtype is not None and save_dtype not in T.SAVE_DTYPES:
        raise BenchError(f"--save-dtype must be one of {', '.join(T.SAVE_DTYPES)}, got {save_dtype!r}")
    if threads:
        torch.set_num_threads(threads)
    if out is None:
        tag = "moe" if vanilla else f"moepp-tau{tau if tau is not None else DEFAULTS['tau']:g}"
        out = Path("results/train") / f"{preset or DEFAULTS['preset']}-{tag}"
    command = shlex.join(["moepp-bench", *sys.argv[1:]])  # as typed, so TRAINING.md can say how to repeat it
    lengths = {"steps": steps, "tokens": tokens, "save_every": save_every, "log_every": log_every,
               "save_dtype": save_dtype, "threads": threads}
    text_files = [str(p) for p in text] if text else None
    if resume:
        run = _resume_run(out, given, lengths, text_files)
    else:
        run = _start_run(out, given, lengths, text_files)
    run.state.commands.append(command)
    _train_and_report(run, out, stop_after)


class _Run(NamedTuple):
    settings: Any  # TrainSettings
    data: Any  # TrainData
    model: Any
    optimizer: Any
    state: Any  # TrainerState
    tokenizer_json: str


def _resume_run(out: Path, given: dict, lengths: dict, text_files: list[str] | None) -> _Run:
    """The run saved in out, after checking that nothing given on the command line contradicts it."""
    import torch

    from ..measure import training as T
    from ..report.console import stderr

    try:
        payload = T.load_state_file(out)
    except ValueError as exc:
        raise BenchError(f"{exc}; run without --resume to start a new run in {out}") from None
    saved = T.TrainSettings(**payload["settings"])
    for key, value in given.items():
        if value is not None and value != getattr(saved, key):
            flag = {"warmup_steps": "warmup", "balance_coef": "beta", "zloss_coef": "zloss"}.get(key, key)
            raise BenchError(f"--{flag.replace('_', '-')} {value} differs from the run being resumed "
                             f"({getattr(saved, key)}); drop it to resume, or start a new run in another --out")
    if text_files and payload.get("text_files") != text_files:
        raise BenchError("--text differs from the run being resumed; drop it to resume")
    target = _target_steps(lengths["steps"], lengths["tokens"], saved.tokens_per_step, saved.steps)
    state_step = payload["trainer"]["step"]
    if target <= state_step:
        raise BenchError(f"the run in {out} already reached step {state_step} of {target}; "
                         f"pass a larger --steps or --tokens to train further")
    settings = T.TrainSettings(**{**saved.to_dict(), "steps": target, "save_every": lengths["save_every"],
                                  "log_every": lengths["log_every"],
                                  "save_dtype": lengths["save_dtype"] or saved.save_dtype})
    # The run's thread count by default: another count may round matmul sums differently.
    threads = lengths["threads"]
    if not threads and saved.threads:
        torch.set_num_threads(saved.threads)
    elif saved.threads and threads != saved.threads:
        stderr.print(f"note: --threads {threads}, the run started with {saved.threads}; matmul sums may round "
                     f"differently, so the resume may not match a straight run bit for bit")
    tok_json = _read_tokenizer(out)
    text_files = payload.get("text_files")
    data = _prepare_data(tok_json, settings, _documents(text_files), text_files)
    if data.corpus_fingerprint != payload["corpus_fingerprint"]:
        raise BenchError("the corpus differs from the one this run started on (another Python version's "
                         "standard library?); resume on the machine that started it, or start a new run")
    model, optimizer, state, _ = T.restore(payload)
    return _Run(settings, data, model, optimizer, state, tok_json)


def _start_run(out: Path, given: dict, lengths: dict, text_files: list[str] | None) -> _Run:
    """A new run: settings from the options and DEFAULTS, a tokenizer trained on the text, a fresh model."""
    import torch
    from tokenizers import Tokenizer

    from ..measure import training as T
    from ..report.console import stderr
    from ..tokenizer import train_tokenizer

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BenchError(f"{out} already exists and is not empty; pass --resume to continue the run in it, "
                         f"or choose another --out")
    pick = {k: (DEFAULTS[k] if given.get(k) is None else given[k]) for k in DEFAULTS if k in given}
    name, seq_len, batch_size = pick["preset"], pick["seq_len"], pick["batch_size"]
    target = _target_steps(lengths["steps"], lengths["tokens"], batch_size * seq_len, DEFAULTS["steps"])
    cfg_args = dict(seq_len=seq_len, tau=pick["tau"], vanilla=bool(given["vanilla"]),
                    capacity_factor=given["capacity_factor"],
                    balance_coef=DEFAULTS["beta"] if given["balance_coef"] is None else given["balance_coef"],
                    zloss_coef=DEFAULTS["zloss"] if given["zloss_coef"] is None else given["zloss_coef"])
    requested_vocab = given["vocab_size"] or preset_vocab_size(name)
    try:
        train_config(name, vocab_size=requested_vocab, **cfg_args)  # bad input fails before any work
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    docs = _documents(text_files)
    stderr.print(f"training a {requested_vocab}-token BPE on the training text")
    tok_json = train_tokenizer([d.text for d in docs[0]], requested_vocab).to_str()
    # A small text can run out of pairs to merge before the requested size: the model takes what there is.
    vocab = Tokenizer.from_str(tok_json).get_vocab_size()
    cfg = train_config(name, vocab_size=vocab, **cfg_args)
    warmup = given["warmup_steps"]
    settings = T.TrainSettings(
        preset=name, tau=cfg.moe.tau, vanilla=cfg_args["vanilla"], steps=target, batch_size=batch_size,
        seq_len=seq_len, lr=pick["lr"], warmup_steps=min(100, max(1, target // 10)) if warmup is None else warmup,
        seed=pick["seed"], vocab_size=vocab, capacity_factor=cfg.moe.capacity_factor,
        balance_coef=cfg.moe.balance_coef, zloss_coef=cfg.moe.zloss_coef, threads=torch.get_num_threads(),
        save_every=lengths["save_every"], log_every=lengths["log_every"],
        save_dtype=lengths["save_dtype"] or "float32")
    data = _prepare_data(tok_json, settings, docs, text_files)
    model = T.build_model(cfg, settings.seed)
    return _Run(settings, data, model, T.build_optimizer(model, settings), T.TrainerState(), tok_json)


def _train_and_report(run: _Run, out: Path, stop_after: int | None) -> None:
    """Train with a progress bar; then validate, save, write the log, TRAINING.md and training.json."""
    from ..measure import training as T
    from ..provenance import provenance
    from ..report.console import progress_bar, stderr
    from ..report.training_card import write_train_log

    settings, state = run.settings, run.state
    out.mkdir(parents=True, exist_ok=True)
    stop = {"requested": False}
    first_step = state.step

    def should_stop() -> bool:
        return stop["requested"] or (stop_after is not None and state.step - first_step >= stop_after)

    prov = provenance(seed=settings.seed, dtype="float32", extra={"commands": state.commands})
    with _stop_on_interrupt(stop), progress_bar("train", settings.steps, "loss", "tok_s", "zc") as bar:
        bar.reset(0, completed=state.step)  # a resumed run: start the bar there, with no speed sample yet

        def on_step(info: T.StepInfo) -> None:
            bar.update(0, completed=info.step, loss=f"loss {info.loss:.3f}", tok_s=f"{info.tokens_per_s:,.0f} tok/s",
                       zc=f"ZC slots {info.zc_share:.2f}")
            if info.logged:  # keep train-log.csv current, so a long run can be watched
                write_train_log(out, state.log, prov)

        result = T.train(run.model, run.optimizer, run.data, settings, state, out, run.tokenizer_json,
                         on_step=on_step, should_stop=should_stop)
    write_train_log(out, state.log, prov)
    if not result.finished:
        stderr.print(f"stopped at step {state.step} of {settings.steps}; state saved in {out}. "
                     f"Continue with: moepp-bench train --out {shlex.quote(str(out))} --resume")
        raise typer.Exit(130 if stop["requested"] else 0)
    _report(run, out, result.validation)


def _report(run: _Run, out: Path, val: dict) -> None:
    from rich.table import Table

    from ..measure import training as T
    from ..provenance import provenance
    from ..report.console import stdout
    from ..report.training_card import write_training_card

    settings, state, data, model = run.settings, run.state, run.data, run.model
    tail = state.log[-max(1, len(state.log) // 10):]
    summary = {
        "model": out.name, "val_loss": val["val_loss"], "val_ppl": val["val_ppl"],
        "unigram_baseline": T.unigram_baseline(data.train_ids, data.val_ids, settings.vocab_size),
        "val_zc_share": val["val_zc_share"],
        "train_zc_share": sum(r["zc_share"] for r in tail) / len(tail),
        "target_zc_share": 0.0 if settings.vanilla else 1 - model.cfg.moe.rho,
        "train_seconds": state.train_seconds, "cpu_seconds": state.cpu_seconds, "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "tokens_per_s": state.tokens_seen / state.train_seconds if state.train_seconds else float("nan"),
        "parameters": sum(p.numel() for p in model.parameters()), "weights_dtype": settings.save_dtype,
        "val_tokens": val["val_tokens"],
    }
    prov = provenance(seed=settings.seed, dtype="float32", extra={"commands": state.commands})  # finish time
    meta = {k: summary[k] for k in ("val_loss", "unigram_baseline", "val_zc_share", "train_seconds")}
    T.save_training(out, model, run.optimizer, state, settings, data, run.tokenizer_json, meta=meta)
    corpus = {"source": "text" if data.text_files else "embedded", "fingerprint": data.corpus_fingerprint,
              "train_tokens": int(data.train_ids.numel()), "val_tokens": int(data.val_ids.numel()),
              **data.corpus_summary}
    if data.text_files:
        corpus["text_files"] = data.text_files
    write_training_card(out, summary, settings.to_dict(), corpus, state.commands, prov)

    table = Table(title=f"trained {out}", show_header=False)
    for key in ("val_loss", "unigram_baseline", "val_zc_share", "train_zc_share", "target_zc_share", "steps",
                "tokens_seen", "train_seconds", "tokens_per_s", "parameters"):
        decimals = 4 if key.endswith(("loss", "baseline", "share")) else 1 if key == "train_seconds" else 0
        table.add_row(key, f"{summary[key]:,.{decimals}f}")
    stdout.print(table)


def _check_numbers(**values) -> None:
    positive = ("steps", "tokens", "batch_size", "seq_len", "lr", "tau", "capacity_factor", "vocab_size",
                "save_every", "log_every", "stop_after")
    for key, value in values.items():
        if value is None:
            continue
        if key in positive and not value > 0:
            raise BenchError(f"--{key.replace('_', '-')} must be positive, got {value}")
        if key not in positive and value < 0:
            raise BenchError(f"--{key.replace('_', '-')} must be >= 0, got {value}")
    if values.get("seq_len") is not None and values["seq_len"] < 2:
        raise BenchError("--seq-len must be at least 2 (a position predicts the next one)")


def _target_steps(steps: int | None, tokens: int | None, tokens_per_step: int, default: int) -> int:
    if tokens is not None:
        return max(1, -(-tokens // tokens_per_step))
    return steps if steps is not None else default


def _documents(text_files: list[str] | None):
    """(train documents, validation documents, summary) of the embedded corpus or of user text."""
    from .. import corpus as C
    from ..report.console import stderr

    stderr.print("reading the " + ("text files" if text_files else "embedded corpus"))

    if text_files:
        missing = [p for p in text_files if not Path(p).exists()]
        if missing:
            raise BenchError(f"--text {missing[0]}: no such file or directory")
        try:
            docs = C.text_documents([Path(p) for p in text_files])
        except UnicodeDecodeError as exc:
            raise BenchError(f"--text: a file is not UTF-8 ({exc.reason})") from None
        if not docs:
            raise BenchError("--text: no .txt files found")
        return docs, None, {"train": C.summary(docs)}
    docs = C.corpus_documents()
    train_docs, val_docs = C.split(docs)
    return train_docs, val_docs, {"train": C.summary(train_docs), "validation": C.summary(val_docs)}


def _read_tokenizer(out: Path) -> str:
    path = out / "tokenizer.json"
    if not path.is_file():
        raise BenchError(f"{path}: missing; the run cannot be resumed without its tokenizer")
    return path.read_text(encoding="utf-8")


def _prepare_data(tok_json: str, settings, docs, text_files: list[str] | None):
    """Token streams for training and validation. User text: the last 5% of its tokens validate."""
    from tokenizers import Tokenizer

    from .. import corpus as C
    from ..measure.training import TrainData
    from ..report.console import stderr
    from ..tokenizer import encode_documents

    stderr.print("tokenizing the " + ("text files" if text_files else "corpus"))
    tok = Tokenizer.from_str(tok_json)
    if tok.get_vocab_size() != settings.vocab_size:
        raise BenchError(f"the tokenizer has {tok.get_vocab_size()} tokens, the run expects {settings.vocab_size}")
    train_docs, val_docs, summary = docs
    if val_docs is None:
        ids = encode_documents(tok, [d.text for d in train_docs])
        n_val = max(2 * settings.seq_len, ids.numel() // 20)
        train_ids, val_ids = ids[:-n_val], ids[-n_val:]
        fingerprint = C.fingerprint(train_docs)
    else:
        train_ids = encode_documents(tok, [d.text for d in train_docs])
        val_ids = encode_documents(tok, [d.text for d in val_docs])
        fingerprint = C.fingerprint(train_docs + val_docs)
    if train_ids.numel() <= settings.seq_len or val_ids.numel() < settings.seq_len:
        raise BenchError(f"the text gives {train_ids.numel()} training and {val_ids.numel()} validation tokens, "
                         f"too few for --seq-len {settings.seq_len}; give more text or a shorter --seq-len")
    return TrainData(train_ids, val_ids, fingerprint, summary, text_files)


@contextmanager
def _stop_on_interrupt(flag: dict) -> Iterator[None]:
    """First Ctrl-C: finish the current step, save, stop. A second one interrupts at once."""
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        flag["requested"] = True
        signal.signal(signal.SIGINT, previous)

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (e.g. under a test runner's thread): no clean stop, that is all
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
