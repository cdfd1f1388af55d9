"""Training a decoder LM (MoE++ or vanilla MoE): the loop, validation, and resumable state. No printing.

Loss = cross-entropy + LMOutput.aux_loss, which already sums beta * heterogeneous balance loss and the
z-loss coefficient times the router z-loss over the MoE layers (both set in the model config).

Resume is bit-for-bit: the batch of step s is drawn from a generator seeded with (seed, s), the learning
rate is a function of s, and trainer_state.pt holds the float32 weights, the AdamW state and the RNG state.
So N steps straight and N/2 + resume + N/2 give identical parameters (on the same machine and threads).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from moepp import MoEDecoderLM, ModelConfig, save_pretrained

STATE_FILE = "trainer_state.pt"  # beside the checkpoint; load_pretrained never reads it
STATE_VERSION = 1
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EVAL_BATCH_TOKENS = 8192


@dataclass(frozen=True)
class TrainSettings:
    preset: str
    tau: float
    vanilla: bool
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    seed: int
    vocab_size: int
    capacity_factor: float | None = None
    balance_coef: float = 0.01
    zloss_coef: float = 0.001
    min_lr_ratio: float = 0.1  # the cosine decays to this fraction of lr at the last step
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    threads: int = 0  # the intra-op threads the run started with (a record; the caller sets them)
    save_every: int = 100
    log_every: int = 10
    save_dtype: str = "float32"
    val_tokens: int = 131_072

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainData:
    train_ids: torch.Tensor  # int32 token stream, documents separated by END_OF_TEXT
    val_ids: torch.Tensor
    corpus_fingerprint: str
    corpus_summary: dict = field(default_factory=dict)
    text_files: list[str] | None = None  # None: the embedded corpus


@dataclass
class TrainerState:
    """Everything a resume needs besides the model config and the tokenizer."""

    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0  # wall time spent in training steps, over all sessions
    cpu_seconds: float = 0.0  # CPU time of those steps (all threads): less sensitive to a busy machine
    log: list[dict] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


@dataclass
class StepInfo:
    """Passed to the on_step callback after every step (for a progress bar)."""

    step: int
    loss: float
    tokens_per_s: float
    zc_share: float
    logged: bool = False  # a row was just added to state.log


@dataclass
class TrainResult:
    state: TrainerState
    finished: bool  # False when stopped early by should_stop
    validation: dict | None = None


# Schedule and data -----------------------------------------------------------------------------------------
def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up over warmup_steps, then a cosine from lr down to min_lr_ratio * lr at the last step."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    span = max(1, s.steps - s.warmup_steps)
    progress = min(1.0, (step - s.warmup_steps) / span)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_at(ids: torch.Tensor, step: int, seed: int, batch_size: int, seq_len: int) -> torch.Tensor:
    """[batch_size, seq_len] windows at random offsets, a pure function of (seed, step)."""
    if ids.numel() <= seq_len:
        raise ValueError(f"the training text has {ids.numel()} tokens, fewer than one sequence of {seq_len}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=g)
    return torch.stack([ids[i: i + seq_len] for i in starts.tolist()]).long()


def build_model(cfg: ModelConfig, seed: int) -> MoEDecoderLM:
    torch.manual_seed(seed)
    return MoEDecoderLM(cfg)


def build_optimizer(model: MoEDecoderLM, s: TrainSettings) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (norm scales and other vectors are not decayed)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), eps=1e-8)


# Routing shares --------------------------------------------------------------------------------------------
def routing_shares(out, cfg: ModelConfig) -> tuple[float, float]:
    """(share of routing slots kept on zero-computation experts, share dropped by capacity) over all MoE
    layers of one forward."""
    if not out.routing:
        return 0.0, 0.0
    n_ffn = cfg.moe.n_ffn
    zc = sum(int(r.expert_counts[n_ffn:].sum()) for r in out.routing)
    slots = sum(r.topk_ids.numel() for r in out.routing)
    dropped = int(out.n_dropped) if out.n_dropped is not None else 0
    return zc / slots, dropped / slots


# Validation ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: MoEDecoderLM, ids: torch.Tensor, seq_len: int, batch_size: int,
             max_tokens: int | None = None) -> dict:
    """Mean next-token cross-entropy (nats) over consecutive windows of seq_len, and the ZC slot share."""
    was_training = model.training
    model.eval()
    n_windows = ids.numel() // seq_len
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    if n_windows == 0:
        raise ValueError(f"the validation text has {ids.numel()} tokens, fewer than one sequence of {seq_len}")
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len).long()
    total_nll, total_pred, zc_slots, all_slots = 0.0, 0, 0.0, 0
    for start in range(0, n_windows, batch_size):
        x = windows[start: start + batch_size]
        out = model(x, labels=x, return_routing=True)
        n_pred = x.shape[0] * (seq_len - 1)
        total_nll += float(out.ce_loss) * n_pred
        total_pred += n_pred
        zc, _ = routing_shares(out, model.cfg)
        slots = sum(r.topk_ids.numel() for r in out.routing or [])
        zc_slots += zc * slots
        all_slots += slots
    model.train(was_training)
    loss = total_nll / total_pred
    return {"val_loss": loss, "val_ppl": math.exp(loss), "val_tokens": total_pred,
            "val_zc_share": zc_slots / all_slots if all_slots else 0.0}


def unigram_baseline(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats) on val_ids of the add-one-smoothed unigram distribution of train_ids: the loss a
    model that ignores context gets at best, so a trained LM must land clearly below it."""
    counts = torch.bincount(train_ids.long(), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[val_ids.long()].mean())


# State on disk ---------------------------------------------------------------------------------------------
def save_training(out_dir: Path, model: MoEDecoderLM, optimizer: torch.optim.Optimizer, state: TrainerState,
                  settings: TrainSettings, data: TrainData, tokenizer_json: str, meta: dict | None = None) -> None:
    """The checkpoint (config.json + model.safetensors + tokenizer.json, loadable by moepp.load_pretrained)
    and trainer_state.pt beside it, each written atomically; the checkpoint first, so a crash in between
    leaves a resumable state no newer than the checkpoint."""
    from ..report.files import write_atomic

    export = model
    if settings.save_dtype != "float32":
        export = copy.deepcopy(model).to(SAVE_DTYPES[settings.save_dtype])  # routers stay float32
    meta = {"trained_by": "moepp-bench train", "step": state.step, "tokens_seen": state.tokens_seen,
            "preset": settings.preset, "tau": settings.tau, "vanilla": settings.vanilla,
            "corpus_fingerprint": data.corpus_fingerprint, **(meta or {})}
    save_pretrained(export, out_dir, meta=meta, extra_files={"tokenizer.json": tokenizer_json.encode("utf-8")})
    payload = {
        "version": STATE_VERSION,
        "settings": settings.to_dict(),
        "model_config": model.cfg.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "trainer": dataclasses.asdict(state),
        "corpus_fingerprint": data.corpus_fingerprint,
        "text_files": data.text_files,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_atomic(out_dir / STATE_FILE, buf.getvalue())


def load_state_file(out_dir: Path) -> dict:
    """The raw trainer_state.pt; raises ValueError with a one-line reason."""
    path = out_dir / STATE_FILE
    if not path.is_file():
        raise ValueError(f"{path}: no training state to resume")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a corrupt file
        raise ValueError(f"{path}: corrupt training state ({str(exc).splitlines()[0]})") from None
    if not isinstance(payload, dict) or payload.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: not a training state of version {STATE_VERSION}")
    return payload


def restore(payload: dict) -> tuple[MoEDecoderLM, torch.optim.AdamW, TrainerState, TrainSettings]:
    """Model, optimizer and trainer state exactly as saved (settings as saved; the caller may extend steps)."""
    settings = TrainSettings(**payload["settings"])
    cfg = ModelConfig.from_dict(payload["model_config"])
    model = MoEDecoderLM(cfg)
    model.load_state_dict(payload["model"])
    optimizer = build_optimizer(model, settings)
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["torch_rng"])
    state = TrainerState(**payload["trainer"])
    return model, optimizer, state, settings


# The loop --------------------------------------------------------------------------------------------------
def train(model: MoEDecoderLM, optimizer: torch.optim.Optimizer, data: TrainData, settings: TrainSettings,
          state: TrainerState, out_dir: Path | None, tokenizer_json: str = "", *,
          on_step: Callable[[StepInfo], None] | None = None,
          should_stop: Callable[[], bool] | None = None, validate: bool = True) -> TrainResult:
    """Train from state.step to settings.steps, saving every save_every steps and at the end (when out_dir
    is given). should_stop is polled between steps: a clean stop saves and returns finished=False."""
    s = settings
    model.train()
    window: list[dict] = []
    finished = True
    while state.step < s.steps:
        if should_stop is not None and should_stop():
            finished = False
            break
        step = state.step
        lr = lr_at(step, s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = batch_at(data.train_ids, step, s.seed, s.batch_size, s.seq_len)
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(x, labels=x, return_routing=True)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        zc, dropped = routing_shares(out, model.cfg)
        state.step += 1
        state.tokens_seen += x.numel()
        state.train_seconds += dt
        state.cpu_seconds += cpu
        loss = out.loss.item()
        window.append({"loss": loss, "ce_loss": out.ce_loss.item(), "balance_loss": out.balance_loss.item(),
                       "z_loss": out.z_loss.item(), "zc_share": zc, "drop_share": dropped,
                       "grad_norm": grad_norm.item(), "seconds": dt, "cpu_seconds": cpu})
        logged = state.step % s.log_every == 0 or state.step == s.steps
        if logged:
            state.log.append(_log_record(state, window, lr, s))
            window = []
        if out_dir is not None and (state.step % s.save_every == 0 or state.step == s.steps):
            save_training(out_dir, model, optimizer, state, s, data, tokenizer_json)
        if on_step is not None:
            on_step(StepInfo(state.step, loss, x.numel() / dt, zc, logged))
    if window:  # a stop between log points keeps the partial window
        state.log.append(_log_record(state, window, lr_at(state.step - 1, s), s))
    result = TrainResult(state=state, finished=finished)
    if finished and validate:
        # Bigger batches than training: no activations are kept, and many tiny forwards cost more than a few big.
        eval_batch = max(s.batch_size, EVAL_BATCH_TOKENS // s.seq_len)
        result.validation = evaluate(model, data.val_ids, s.seq_len, eval_batch, s.val_tokens)
    if out_dir is not None and not finished:
        save_training(out_dir, model, optimizer, state, s, data, tokenizer_json)
    return result


def _log_record(state: TrainerState, window: list[dict], lr: float, s: TrainSettings) -> dict:
    n = len(window)
    seconds = sum(w["seconds"] for w in window)
    record = {"step": state.step, "tokens_seen": state.tokens_seen, "lr": lr}
    for key in ("loss", "ce_loss", "balance_loss", "z_loss", "zc_share", "drop_share", "grad_norm"):
        record[key] = sum(w[key] for w in window) / n
    record["tokens_per_s"] = n * s.tokens_per_step / seconds if seconds > 0 else float("nan")
    record["train_seconds"] = state.train_seconds
    record["cpu_seconds"] = state.cpu_seconds
    return record
