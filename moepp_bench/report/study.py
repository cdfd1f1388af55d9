"""`moepp-bench report`: one self-contained report (report.md, report.html, figures/) from result directories,
without measuring anything again.

The whole directory is built beside --out and renamed into place at the end, so a failed run leaves the old
report (or nothing) behind, never half of a new one.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import BenchError
from .files import write_atomic
from .study_compare import check_comparable
from .study_document import Block, Code, Column, Document, Heading, Para, Table, render_html, render_markdown
from .study_inputs import Study
from .study_comm import comm_section
from .study_flops import flops_section
from .study_routing import routing_section
from .study_throughput import throughput_section

FIGURES = "figures"
# Provenance fields shown per run, and compared between A and B.
ENV_FIELDS = (("git_revision", "git"), ("moepp_version", "moepp"), ("device_name", "device"),
              ("cpu_count", "cores"), ("threads", "threads"), ("torch", "torch"), ("python", "Python"),
              ("dtype", "dtype"), ("hostname", "host"), ("utc_time", "finished (UTC)"))


def check_out_dir(out: Path, inputs: list[Path]) -> None:
    """--out is replaced as a whole: refuse anything that is not a previous report or new, and any directory
    that holds the inputs."""
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {out} is a file; give a directory for the report")
    resolved = out.resolve()
    for path in inputs:
        p = path.resolve()
        if p == resolved or resolved in p.parents:
            raise BenchError(f"--out {out} would replace the results in {path}; write the report to a new "
                             f"directory, e.g. {path / 'report' if path.is_dir() else out / 'report'}")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.md").is_file():
        raise BenchError(f"--out {out} exists and is not a report directory (no report.md); choose a new or empty "
                         f"directory")


def environment_section(studies: list[Study]) -> list[Block]:
    compare = len(studies) > 1
    rows, commands = [], []
    for s in studies:
        for d in s.docs:
            p = d.provenance
            row = {"side": s.name, "file": d.label, "kind": d.kind}
            row.update({key: p.get(key) for key, _ in ENV_FIELDS})
            rows.append(row)
            commands.append(f"{s.name + ': ' if compare else ''}{d.label}\n    {p.get('command', '(not recorded)')}")
    columns = [Column("side", "side")] if compare else []
    columns += [Column("file", "result file"), Column("kind", "kind")]
    columns += [Column(key, header) for key, header in ENV_FIELDS]
    blocks: list[Block] = [Heading(2, "Runs and environment"), Para(
        "Every result file this report read, with where and how it was made (from the provenance each file "
        "records). The commands below regenerate them.")]
    if compare:
        for s in studies:
            blocks.append(Para(f"{s.name}: " + ", ".join(f"`{p}`" for p in s.roots)))
    blocks += [Table(columns, rows), Code("\n".join(commands))]
    if compare:
        diff = []
        for key, header in ENV_FIELDS:
            if key == "utc_time":
                continue
            values = [sorted({str(d.provenance.get(key)) for d in s.docs}) for s in studies]
            if values[0] != values[1]:
                diff.append({"field": header, "a": ", ".join(values[0]), "b": ", ".join(values[1])})
        if diff:
            blocks.append(Table([Column("field", "what differs"), Column("a", "A"), Column("b", "B")], diff,
                                "Environment and code of A and B, where they differ"))
        else:
            blocks.append(Para("A and B ran the same code revision on the same kind of machine and settings."))
    training = [(s, d) for s in studies for d in s.of("training")]
    if training:
        trows = [{"side": s.name, **(d.rows[0] if d.rows else {}), "file": d.label} for s, d in training]
        tcols = ([Column("side", "side")] if compare else []) + [
            Column("model", "checkpoint"), Column("val_loss", "validation loss (nats/token)", "{:.4f}"),
            Column("val_ppl", "validation perplexity", "{:.2f}"),
            Column("val_zc_share", "ZC slot share (validation)", "{:.3f}"),
            Column("target_zc_share", "ZC share at balance, 1 - rho", "{:.3f}"),
            Column("tokens_seen", "tokens trained", "{:,}"), Column("parameters", "parameters", "{:,}")]
        blocks.append(Table(tcols, trows, "Checkpoints found beside the results (their TRAINING.md has the rest)"))
    return blocks


SECTIONS = (throughput_section, flops_section, comm_section, routing_section)


def build_document(studies: list[Study], command: str, fig_dir: Path,
                   on_section: Callable[[str], None] | None = None) -> Document:
    compare = len(studies) > 1
    n_files = sum(len(s.docs) for s in studies)
    title = "MoE++ benchmark report" + (": A against B" if compare else "")
    doc = Document(title)
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc.add(Para(f"Built on {when} by `{command}` from {n_files} result files; nothing was measured again. "
                 f"Figures are in `{FIGURES}/` as PNG and SVG, redrawn from the result rows in one style."))
    if compare:
        doc.add(Para("With --compare, each figure shows A (left) and B (right) on shared axes, and the tables give "
                     "B against A for every setting both sides measured (B/A)."))
    doc.add(*environment_section(studies))
    for section in SECTIONS:
        doc.add(*section(studies, fig_dir))
        if on_section:
            on_section(section.__name__.removesuffix("_section"))
    return doc


def write_report(studies: list[Study], out: Path, command: str,
                 on_section: Callable[[str], None] | None = None) -> list[Path]:
    """Build the report beside `out`, then put it in place; returns the files of the finished report."""
    if len(studies) > 1:
        check_comparable(*studies)
    missing = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    created_root = missing[-1] if missing else None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; a report is meant to be shared
        fig_dir = staging / FIGURES
        fig_dir.mkdir()
        doc = build_document(studies, command, fig_dir, on_section)
        write_atomic(staging / "report.md", render_markdown(doc, staging))
        write_atomic(staging / "report.html", render_html(doc))
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_root is not None:
            shutil.rmtree(created_root, ignore_errors=True)
        raise
    return sorted(p for p in out.rglob("*") if p.is_file())


def _replace_dir(new: Path, out: Path) -> None:
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / "report")
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old / "report", out)  # put the previous report back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
