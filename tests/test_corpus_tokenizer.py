"""The embedded corpus (sources, determinism, held-out evaluation texts, split) and the BPE tokenizer."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest

from moepp_bench import corpus as C
from moepp_bench import tokenizer as T
from moepp_bench.errors import BenchError

EVAL_DIR = Path(str(resources.files("moepp_bench").joinpath("data/eval")))
EVAL_FILES = ("shakespeare-verse.txt", "shakespeare-prose.txt", "python-docs.txt", "python-code.txt")


@pytest.fixture(scope="module")
def documents():
    return C.corpus_documents()


@pytest.fixture(scope="module")
def corpus_text(documents):
    return "\n".join(d.text for d in documents)


# Sources ---------------------------------------------------------------------------------------------------
def test_shakespeare_ships_38_plain_text_plays():
    plays = C.shakespeare_plays()
    names = [p.name for p in plays]
    assert len(plays) == 38 and len(set(names)) == 38
    assert {"hamlet", "macbeth", "the-tempest", "much-ado-about-nothing"} <= set(names)
    hamlet = next(p.text for p in plays if p.name == "hamlet")
    assert hamlet.startswith("Hamlet\n") and "ACT I" in hamlet and "BERNARDO:\nWho's there?" in hamlet
    assert "To be, or not to be" in hamlet
    for play in plays:  # the Markdown is gone
        assert not re.search(r"[*_#\\]", play.text), play.name


def test_stdlib_sources_are_read_without_importing_and_skip_tests():
    names = [name for name, _ in C.stdlib_modules()]
    assert names == sorted(names)
    assert "json" in names and "collections" in names and "email.mime.text" in names
    assert not any(n.split(".")[0] in ("test", "idlelib", "lib2to3") or ".test." in n for n in names)
    assert "antigravity" not in names and "this" not in names  # side effects or rot13 text


def test_docstrings_are_collected_under_qualified_names():
    source = '"""Module doc."""\nclass A:\n    """Class doc."""\n    def f(self):\n        """Method doc."""\n'
    assert C.docstring_entries(source, "m") == ["m\nModule doc.\n", "m.A\nClass doc.\n", "m.A.f\nMethod doc.\n"]


def test_corpus_has_every_source_and_is_deterministic(documents):
    summary = C.summary(documents)
    assert set(summary) == set(C.SOURCES)
    for source, row in summary.items():
        assert row["documents"] > 0 and row["chars"] > 100_000 or source == "pydoc-topics", (source, row)
    assert sum(r["chars"] for r in summary.values()) > 5_000_000
    fresh = C.shakespeare_plays() + C.stdlib_documents() + C.pydoc_topics()  # built again, not cached
    assert C.fingerprint([d for d in fresh if not C.is_held_out(d)]) == C.fingerprint(documents)


def test_fingerprint_sees_any_change():
    docs = [C.Document("text", "a", "hello"), C.Document("text", "b", "world")]
    base = C.fingerprint(docs)
    assert C.fingerprint(docs[::-1]) != base
    assert C.fingerprint([docs[0], C.Document("text", "b", "world!")]) != base
    # Boundaries count: moving a character from one document to the next changes the fingerprint.
    assert C.fingerprint([C.Document("text", "a", "hellow"), C.Document("text", "b", "orld")]) != base


def test_split_is_disjoint_and_validation_covers_the_sources(documents):
    train, val = C.split(documents)
    assert len(train) + len(val) == len(documents)
    assert not {d.key for d in train} & {d.key for d in val}
    assert "the-tempest" in {d.name for d in val if d.source == "shakespeare"}
    assert {d.source for d in val} >= {"shakespeare", "python-docs", "python-code"}
    assert 0.01 < sum(len(d.text) for d in val) / sum(len(d.text) for d in documents) < 0.1


# Held-out evaluation texts ---------------------------------------------------------------------------------
def test_eval_texts_ship_in_four_genres():
    for name in EVAL_FILES:
        text = (EVAL_DIR / name).read_text(encoding="utf-8")
        assert 20_000 < len(text) <= 41_000, name
    verse = (EVAL_DIR / "shakespeare-verse.txt").read_text(encoding="utf-8")
    prose = (EVAL_DIR / "shakespeare-prose.txt").read_text(encoding="utf-8")
    code = (EVAL_DIR / "python-code.txt").read_text(encoding="utf-8")
    docs = (EVAL_DIR / "python-docs.txt").read_text(encoding="utf-8")
    assert "MACBETH:" in verse and "BENEDICK:" in prose
    assert code.count("\ndef ") > 10 and "import " in code
    assert "statistics.mean\n" in docs and ">>> " in docs


def _starts_lower(text: str) -> float:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.endswith(":")]
    return sum(ln.lstrip("'\"([")[:1].islower() for ln in lines) / len(lines)


def test_verse_and_prose_are_told_apart():
    verse = (EVAL_DIR / "shakespeare-verse.txt").read_text(encoding="utf-8")
    prose = (EVAL_DIR / "shakespeare-prose.txt").read_text(encoding="utf-8")
    assert _starts_lower(verse) < 0.02 < 0.4 < _starts_lower(prose)
    assert C._is_verse("A:\nOne line here\nAnd then another\nAnd a third") is True
    assert C._is_verse("A:\nI learn in this letter that\ncomes this night to\nhave lost in this") is False
    assert C._is_verse("A:\nToo short") is None


def test_shakespeare_eval_texts_are_what_the_builder_makes():
    built = C.build_eval_texts()
    for name in ("shakespeare-verse.txt", "shakespeare-prose.txt"):
        assert (EVAL_DIR / name).read_text(encoding="utf-8") == built[name]


def test_eval_texts_are_held_out_of_training_and_validation(documents, corpus_text):
    assert not [d.key for d in documents if C.is_held_out(d)]
    assert not {d.name for d in documents if d.source == "shakespeare"} & set(C.EVAL_PLAYS)
    for name in EVAL_FILES:
        lines = {ln.strip() for ln in (EVAL_DIR / name).read_text(encoding="utf-8").splitlines()
                 if len(ln.strip()) > 50}
        found = [ln for ln in lines if ln in corpus_text]
        # Stock lines recur across modules (licence headers, "if __name__ == ..."); a leak would be wholesale.
        assert len(found) <= 0.02 * len(lines), (name, found[:3])


# Tokenizer -------------------------------------------------------------------------------------------------
SAMPLE = ["To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20,
          "def f(x):\n    return x * 2  # double\n\n\tif x:\n        pass\n" * 20,
          "The sorted() builtin returns a new sorted list from the items in iterable.\n" * 20]


@pytest.fixture(scope="module")
def small_tokenizer():
    return T.train_tokenizer(SAMPLE, 320)


def test_tokenizer_has_the_requested_size_and_end_of_text(small_tokenizer):
    assert small_tokenizer.get_vocab_size() == 320
    # A text too small for the requested size stops when no pair occurs twice: at most the size asked for.
    assert 257 < T.train_tokenizer(SAMPLE[:1], 1000).get_vocab_size() < 1000
    assert T.end_of_text_id(small_tokenizer) == 0
    merged = small_tokenizer.encode("question").ids
    assert len(merged) < len("question")  # frequent words became merges


@pytest.mark.parametrize("text", ["Hello,   world!\n", "    def f(x):\n\treturn x  # é ü 中文 🙂", "", "\n\n\n"])
def test_tokenizer_round_trips_any_string(small_tokenizer, text):
    assert small_tokenizer.decode(T.encode(small_tokenizer, text)) == text


def test_tokenizer_training_is_deterministic(small_tokenizer):
    assert T.train_tokenizer(SAMPLE, 320).to_str() == small_tokenizer.to_str()


def test_tokenizer_saves_and_loads(small_tokenizer, tmp_path):
    path = T.save_tokenizer(small_tokenizer, tmp_path / "tokenizer.json")
    loaded = T.load_tokenizer(path)
    assert loaded.to_str() == small_tokenizer.to_str()
    assert T.encode(loaded, SAMPLE[1]) == T.encode(small_tokenizer, SAMPLE[1])


def test_encode_documents_separates_with_end_of_text(small_tokenizer):
    ids = T.encode_documents(small_tokenizer, ["to be", "or not"])
    eot = T.end_of_text_id(small_tokenizer)
    first, second = T.encode(small_tokenizer, "to be"), T.encode(small_tokenizer, "or not")
    assert ids.tolist() == first + [eot] + second + [eot]


def test_tokenizer_errors_are_one_line(tmp_path):
    with pytest.raises(BenchError, match="not found"):
        T.load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BenchError, match="not a readable tokenizer"):
        T.load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(BenchError, match="below 257"):
        T.train_tokenizer(SAMPLE, 100)
