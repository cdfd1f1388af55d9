"""A report as a list of blocks (headings, paragraphs, tables, figures), rendered twice: as Markdown that
links its figures, and as one HTML file with the PNGs embedded, so it can be mailed on its own."""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str  # `code` spans are allowed


@dataclass
class Code:
    text: str


@dataclass
class Column:
    key: str
    header: str
    fmt: Union[str, Callable[[object], str], None] = None  # a format spec ("{:.2f}") or a function


@dataclass
class Table:
    columns: list[Column]
    rows: list[dict]
    caption: str = ""

    def cells(self) -> list[list[str]]:
        return [[format_cell(row.get(c.key), c.fmt) for c in self.columns] for row in self.rows]


@dataclass
class Figure:
    png: Path  # the PNG beside its SVG, inside the report directory
    caption: str
    alt: str = ""


Block = Union[Heading, Para, Code, Table, Figure]


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)


def format_cell(value, fmt=None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if callable(fmt):
        return fmt(value)
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt.format(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# Markdown -----------------------------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: Document, report_dir: Path) -> str:
    out = [f"# {doc.title}", ""]
    for block in doc.blocks:
        if isinstance(block, Heading):
            out += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Para):
            out += [block.text, ""]
        elif isinstance(block, Code):
            out += ["```", block.text, "```", ""]
        elif isinstance(block, Table):
            if block.caption:
                out += [f"*{block.caption}*", ""]
            out.append("| " + " | ".join(_md_cell(c.header) for c in block.columns) + " |")
            out.append("|" + "|".join("---:" if _numeric(block, i) else "---" for i in range(len(block.columns)))
                       + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.cells()]
            out.append("")
        elif isinstance(block, Figure):
            rel = block.png.relative_to(report_dir).as_posix()
            svg = block.png.with_suffix(".svg").relative_to(report_dir).as_posix()
            out += [f"![{block.alt or block.caption}]({rel})", "", f"*{block.caption}* ([SVG]({svg}))", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def _numeric(table: Table, i: int) -> bool:
    key = table.columns[i].key
    values = [r.get(key) for r in table.rows if r.get(key) is not None]
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


# HTML ---------------------------------------------------------------------------------------------------------
CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1, h2, h3 { line-height: 1.2; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.8em; }
div.wide { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: 0.3em; }
figure { margin: 1em 0 1.6em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-style: italic; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
code { background: #f3f3f3; padding: 0 0.2em; }
@media print { figure, table { page-break-inside: avoid; } }
"""


def _inline(text: str) -> str:
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(f"<code>{html.escape(p[1:-1])}</code>" if p.startswith("`") and p.endswith("`") and len(p) > 1
                   else html.escape(p) for p in parts)


def render_html(doc: Document) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{html.escape(doc.title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
           f"<h1>{html.escape(doc.title)}</h1>"]
    for block in doc.blocks:
        if isinstance(block, Heading):
            n = min(block.level, 6)
            out.append(f"<h{n}>{_inline(block.text)}</h{n}>")
        elif isinstance(block, Para):
            out.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Code):
            out.append(f"<pre><code>{html.escape(block.text)}</code></pre>")
        elif isinstance(block, Table):
            out.append('<div class="wide"><table>')  # wide tables scroll instead of overflowing the page
            if block.caption:
                out.append(f"<caption>{_inline(block.caption)}</caption>")
            out.append("<tr>" + "".join(f"<th>{html.escape(c.header)}</th>" for c in block.columns) + "</tr>")
            numeric = [_numeric(block, i) for i in range(len(block.columns))]
            for row in block.cells():
                out.append("<tr>" + "".join(f'<td class="num">{html.escape(c)}</td>' if num else
                                            f"<td>{html.escape(c)}</td>" for c, num in zip(row, numeric)) + "</tr>")
            out.append("</table></div>")
        elif isinstance(block, Figure):
            data = base64.b64encode(block.png.read_bytes()).decode("ascii")
            alt = html.escape(block.alt or block.caption)
            out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
                       f"<figcaption>{_inline(block.caption)}</figcaption></figure>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"
