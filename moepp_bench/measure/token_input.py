"""Inputs for routing analyses: text files (one task each) or a file of token ids, streamed as padded batches.

Nothing is held whole: text is read in blocks of about 1 MiB, decoded as strict UTF-8, tokenized block by
block (cut before a line break, so a cut never falls inside a word or a run of whitespace) and cut into
windows of seq_len tokens. Every input is checked in a first streaming pass (readable, UTF-8, not empty, ids
inside the vocabulary) before any output exists, and that pass counts the tokens so the progress bar has a
total.

Batches are right-padded; with a causal mask a real token never sees the padding after it, so its routing is
the same as in an unpadded run. The padding mask marks what every statistic must skip.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..errors import BenchError

BLOCK_BYTES = 1 << 20
# Blocks are cut just before a line break that follows a non-space character. Byte-level BPE pre-tokenizers
# never join a non-space character with the whitespace after it, and a run of whitespace stays whole, so the
# tokens are those of the whole text (SentencePiece may differ in the first token of a block).
_CUT_BEFORE = re.compile(r"(?<=\S)\n")


# Tokenizers ------------------------------------------------------------------------------------------------
class TextTokenizer:
    """encode(text) -> ids without special tokens; token_string(id) for tables and plots."""

    def __init__(self, path: Path, kind: str, impl):
        self.path, self.kind, self._impl = path, kind, impl

    @property
    def vocab_size(self) -> int:
        return self._impl.get_vocab_size() if self.kind == "tokenizers" else self._impl.get_piece_size()

    def encode(self, text: str) -> list[int]:
        if self.kind == "tokenizers":
            return self._impl.encode(text, add_special_tokens=False).ids
        return self._impl.encode(text)

    def token_string(self, token_id: int) -> str:
        """The text a token stands for (a leading space kept), or its vocabulary piece when that is not text."""
        text = self._impl.decode([token_id])
        if text and "\ufffd" not in text:
            return text
        piece = self._impl.id_to_token(token_id) if self.kind == "tokenizers" else self._impl.id_to_piece(token_id)
        return piece if piece is not None else f"<{token_id}>"


def find_tokenizer(checkpoint_dir: Path) -> Path | None:
    for name in ("tokenizer.json", "tokenizer.model"):
        if (checkpoint_dir / name).is_file():
            return checkpoint_dir / name
    return None


def load_tokenizer(path: Path) -> TextTokenizer:
    if not path.is_file():
        raise BenchError(f"{path}: tokenizer file not found; give a tokenizer.json or tokenizer.model")
    if path.suffix == ".json":
        from tokenizers import Tokenizer

        try:
            return TextTokenizer(path, "tokenizers", Tokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a bare Exception for a bad file
            raise BenchError(f"{path}: not a readable tokenizer.json ({_first_line(exc)})") from None
    if path.suffix == ".model":
        try:
            import sentencepiece
        except ImportError:
            raise BenchError(f"{path}: a SentencePiece tokenizer needs the sentencepiece package "
                             f"(pip install sentencepiece), or pass --token-ids FILE instead of text") from None
        try:
            return TextTokenizer(path, "sentencepiece", sentencepiece.SentencePieceProcessor(model_file=str(path)))
        except Exception as exc:
            raise BenchError(f"{path}: not a readable SentencePiece model ({_first_line(exc)})") from None
    raise BenchError(f"{path}: unknown tokenizer format; give a tokenizer.json (tokenizers) or tokenizer.model "
                     f"(SentencePiece)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Inputs ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskInput:
    """One task of the per-task analysis: a text file, or a file of token ids."""

    name: str
    path: Path
    kind: str  # "text" or "ids"
    n_tokens: int  # real tokens that will be routed (after --max-tokens)
    n_sequences: int


def _text_blocks(path: Path) -> Iterator[str]:
    """Strict UTF-8 text in blocks of about BLOCK_BYTES, each cut just before a line break."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    consumed, carry, first = 0, "", True
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise BenchError(f"{path}: cannot read the text file ({exc.strerror})") from None
    with fh:
        while True:
            raw = fh.read(BLOCK_BYTES)
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as exc:
                where = consumed - pending + exc.start
                raise BenchError(f"{path}: not UTF-8 text (invalid byte at offset {where}); convert it to UTF-8 "
                                 f"or pass --token-ids") from None
            consumed += len(raw)
            if first:
                text, first = text.removeprefix("\ufeff"), False
            text = carry + text
            if not raw:
                if text:
                    yield text
                return
            cut = None
            for match in _CUT_BEFORE.finditer(text):
                cut = match.start()
            if cut is None:
                cut = len(text) if len(text) > 4 * BLOCK_BYTES else 0  # one enormous line: cut anyway
            if cut:
                yield text[:cut]
            carry = text[cut:]


def _text_token_stream(path: Path, tokenizer: TextTokenizer) -> Iterator[torch.Tensor]:
    for block in _text_blocks(path):
        ids = tokenizer.encode(block)
        if ids:
            yield torch.tensor(ids, dtype=torch.long)


def _windows(rows: Iterable[torch.Tensor], seq_len: int, max_tokens: int | None,
             concatenate: bool) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset of the window's first token in the task's stream, ids) for windows of at most seq_len tokens.

    concatenate=True joins rows into one stream (text); False keeps each row's windows apart (token-id rows
    are separate sequences)."""
    emitted, buffer, buffer_start = 0, [], 0
    budget = max_tokens if max_tokens is not None else float("inf")

    def cut(ids: torch.Tensor, start: int) -> Iterator[tuple[int, torch.Tensor]]:
        nonlocal emitted
        for i in range(0, ids.numel(), seq_len):
            take = min(seq_len, ids.numel() - i, budget - emitted)
            if take <= 0:
                return
            yield start + i, ids[i : i + take]
            emitted += take

    offset = 0
    for row in rows:
        if emitted >= budget:
            return
        if not concatenate:
            yield from cut(row, offset)
            offset += row.numel()
            continue
        buffer.append(row)
        held = sum(r.numel() for r in buffer)
        if held >= seq_len:
            joined = torch.cat(buffer)
            whole = (held // seq_len) * seq_len
            yield from cut(joined[:whole], buffer_start)
            buffer, buffer_start = [joined[whole:]], buffer_start + whole
    if concatenate and buffer and emitted < budget:
        yield from cut(torch.cat(buffer), buffer_start)


def _check_ids(ids: torch.Tensor, vocab_size: int, path: Path, what: str) -> None:
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0].item()
        raise BenchError(f"{path}: token id {bad} {what} is outside the model's vocabulary 0..{vocab_size - 1}")


def prepare_text_tasks(paths: list[Path], tokenizer: TextTokenizer, vocab_size: int, seq_len: int,
                       max_tokens: int | None) -> list[TaskInput]:
    """Check every text file in one streaming pass and count the tokens it will contribute."""
    tasks = []
    for path in paths:
        if not path.exists():
            raise BenchError(f"{path}: no such text file")
        if not path.is_file():
            raise BenchError(f"{path}: not a file; give text files (one per task) or --token-ids FILE")
        n_tokens = n_seqs = 0
        for _, window in _windows(_text_token_stream(path, tokenizer), seq_len, max_tokens, concatenate=True):
            _check_ids(window, vocab_size, path, f"(from tokenizer {tokenizer.path.name})")
            n_tokens += window.numel()
            n_seqs += 1
        if n_tokens == 0:
            raise BenchError(f"{path}: empty text file (no tokens); give a file with text in it")
        tasks.append(TaskInput(_task_name(path, tasks), path, "text", n_tokens, n_seqs))
    return tasks


def _task_name(path: Path, earlier: list[TaskInput]) -> str:
    name, taken = path.stem, {t.name for t in earlier}
    i = 2
    while name in taken:
        name, i = f"{path.stem}-{i}", i + 1
    return name


# Token-id files --------------------------------------------------------------------------------------------
def _read_id_rows(path: Path) -> list[torch.Tensor] | object:
    """Rows of token ids from JSON (a list of lists, or one flat list), .pt or .npy (2-D, or 1-D for one row).
    .npy files are memory-mapped, so a large one is not read whole."""
    if not path.is_file():
        raise BenchError(f"{path}: no such token-id file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BenchError(f"{path}: not valid JSON ({_first_line(exc)}); give a list of token-id lists") from None
        if isinstance(data, list) and data and all(isinstance(v, int) and not isinstance(v, bool) for v in data):
            data = [data]
        if not isinstance(data, list) or not all(isinstance(row, list) for row in data):
            raise BenchError(f"{path}: expected a JSON list of token-id lists, e.g. [[1, 2, 3], [4, 5]]")
        rows = []
        for r, row in enumerate(data):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in row):
                raise BenchError(f"{path}: row {r} holds something that is not an integer token id")
            rows.append(torch.tensor(row, dtype=torch.long))
        return rows
    if suffix == ".npy":
        import numpy as np

        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise BenchError(f"{path}: not a readable .npy file ({_first_line(exc)})") from None
        if not np.issubdtype(array.dtype, np.integer):
            raise BenchError(f"{path}: token ids must be integers, the array holds {array.dtype}")
        return _check_dims(array, path)
    if suffix in (".pt", ".pth"):
        try:
            try:
                tensor = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # an old (non-zip) file cannot be memory-mapped
                tensor = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BenchError(f"{path}: not a readable PyTorch file ({_first_line(exc)})") from None
        if not isinstance(tensor, torch.Tensor):
            raise BenchError(f"{path}: expected one tensor of token ids, found {type(tensor).__name__}")
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise BenchError(f"{path}: token ids must be integers, the tensor holds {tensor.dtype}")
        return _check_dims(tensor, path)
    raise BenchError(f"{path}: unknown token-id file type {path.suffix!r}; use .json, .pt or .npy")


def _check_dims(array, path: Path):
    if array.ndim == 1:
        return array.reshape(1, -1)
    if array.ndim != 2:
        raise BenchError(f"{path}: token ids must be 2-D [sequences, tokens], got shape {tuple(array.shape)}")
    return array


def _id_rows(source, pad_id: int | None) -> Iterator[torch.Tensor]:
    import numpy as np

    for row in source:
        # A row of a memory-mapped array is copied (read-only memory cannot back a tensor).
        ids = row.to(torch.long) if isinstance(row, torch.Tensor) else torch.from_numpy(np.array(row, np.int64))
        if pad_id is not None:
            ids = ids[ids != pad_id]
        yield ids


@dataclass(frozen=True)
class _IdTask:
    task: TaskInput
    rows: object  # list of tensors, a tensor, or a memory-mapped array


def prepare_token_ids(path: Path, vocab_size: int, seq_len: int, max_tokens: int | None,
                      pad_id: int | None) -> _IdTask:
    rows = _read_id_rows(path)
    n_tokens = n_seqs = 0
    for _, window in _windows(_id_rows(rows, pad_id), seq_len, max_tokens, concatenate=False):
        _check_ids(window, vocab_size, path, "")
        n_tokens += window.numel()
        n_seqs += 1
    if n_tokens == 0:
        raise BenchError(f"{path}: no token ids to route" + (f" (all equal --pad-id {pad_id})" if pad_id is not None
                                                             else ""))
    return _IdTask(TaskInput(path.stem, path, "ids", n_tokens, n_seqs), rows)


# Batches ---------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    input_ids_BS: torch.Tensor  # long, right-padded with pad_id
    mask_BS: torch.Tensor  # bool, True for real tokens
    task_B: torch.Tensor  # long: index of each row's task
    start_B: torch.Tensor  # long: offset of each row's first token in its task's token stream
    seq_B: torch.Tensor  # long: running number of each row over the whole run

    @property
    def n_tokens(self) -> int:
        return int(self.mask_BS.sum())


class TokenInputs:
    """Validated inputs; iterate batches() as often as needed (each pass streams from the files again)."""

    def __init__(self, tasks: list[TaskInput], seq_len: int, batch_size: int, max_tokens: int | None,
                 tokenizer: TextTokenizer | None, pad_id: int | None = None, id_rows: dict | None = None):
        self.tasks, self.seq_len, self.batch_size = tasks, seq_len, batch_size
        self.max_tokens, self.tokenizer, self.pad_id = max_tokens, tokenizer, pad_id
        self._id_rows = id_rows or {}

    @property
    def total_tokens(self) -> int:
        return sum(t.n_tokens for t in self.tasks)

    def _task_windows(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        for index, task in enumerate(self.tasks):
            if task.kind == "text":
                stream = _windows(_text_token_stream(task.path, self.tokenizer), self.seq_len, self.max_tokens, True)
            else:
                stream = _windows(_id_rows(self._id_rows[task.name], self.pad_id), self.seq_len, self.max_tokens,
                                  False)
            for start, ids in stream:
                yield index, start, ids

    def batches(self) -> Iterator[Batch]:
        pending: list[tuple[int, int, torch.Tensor]] = []
        seq = 0
        for item in self._task_windows():
            pending.append(item)
            if len(pending) == self.batch_size:
                yield _make_batch(pending, seq)
                seq += len(pending)
                pending = []
        if pending:
            yield _make_batch(pending, seq)


def _make_batch(rows: list[tuple[int, int, torch.Tensor]], first_seq: int) -> Batch:
    S = max(ids.numel() for _, _, ids in rows)
    B = len(rows)
    input_ids_BS = torch.zeros(B, S, dtype=torch.long)  # id 0 under the mask: routed by the model, never counted
    mask_BS = torch.zeros(B, S, dtype=torch.bool)
    for b, (_, _, ids) in enumerate(rows):
        input_ids_BS[b, : ids.numel()] = ids
        mask_BS[b, : ids.numel()] = True
    return Batch(input_ids_BS, mask_BS, torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]),
                 torch.arange(first_seq, first_seq + B))


def open_inputs(*, texts: list[Path], token_ids: Path | None, tokenizer: TextTokenizer | None, vocab_size: int,
                seq_len: int, batch_size: int, max_tokens: int | None, pad_id: int | None = None) -> TokenInputs:
    """Validate the inputs (one streaming pass) and return them ready to batch. Raises BenchError."""
    if seq_len <= 0 or batch_size <= 0:
        raise BenchError("--seq-len and --batch-size must be positive")
    if max_tokens is not None and max_tokens <= 0:
        raise BenchError(f"--max-tokens must be positive, got {max_tokens}")
    if token_ids is not None:
        if texts:
            raise BenchError("give text files or --token-ids FILE, not both")
        prepared = prepare_token_ids(token_ids, vocab_size, seq_len, max_tokens, pad_id)
        return TokenInputs([prepared.task], seq_len, batch_size, max_tokens, tokenizer, pad_id,
                           {prepared.task.name: prepared.rows})
    if not texts:
        raise BenchError("no input: give text files or --token-ids FILE")
    if tokenizer is None:
        raise BenchError("no tokenizer for the text files: the checkpoint has no tokenizer.json or tokenizer.model; "
                         "pass --tokenizer FILE or --token-ids FILE")
    tasks = prepare_text_tasks(texts, tokenizer, vocab_size, seq_len, max_tokens)
    return TokenInputs(tasks, seq_len, batch_size, max_tokens, tokenizer)
