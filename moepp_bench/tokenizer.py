"""A byte-level BPE tokenizer trained offline with the `tokenizers` library, saved as tokenizer.json.

Byte-level: every string encodes (no unknown token) and decodes back to itself. One special token,
END_OF_TEXT, separates documents in the training stream.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from .errors import BenchError

END_OF_TEXT = "<|endoftext|>"
MIN_VOCAB = 256 + 1  # the byte alphabet plus END_OF_TEXT


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE of vocab_size tokens on texts (in the given order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise BenchError(f"vocabulary size {vocab_size} is below {MIN_VOCAB} (256 bytes + {END_OF_TEXT}); "
                         f"choose a larger --vocab-size")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, path: str | os.PathLike) -> Path:
    """Write tokenizer.json atomically."""
    from .report.files import write_atomic

    return write_atomic(path, tok.to_str(pretty=False))


def load_tokenizer(path: str | os.PathLike):
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise BenchError(f"{path}: tokenizer file not found (a checkpoint trained by moepp-bench has tokenizer.json)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception type for a bad file
        raise BenchError(f"{path}: not a readable tokenizer.json ({str(exc).splitlines()[0]})") from None


def end_of_text_id(tok) -> int:
    token_id = tok.token_to_id(END_OF_TEXT)
    if token_id is None:
        raise BenchError(f"the tokenizer has no {END_OF_TEXT} token; train one with moepp-bench train")
    return token_id


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def encode_documents(tok, texts: list[str]) -> torch.Tensor:
    """One int32 stream: each document's tokens followed by END_OF_TEXT."""
    eot = end_of_text_id(tok)
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.int32)
