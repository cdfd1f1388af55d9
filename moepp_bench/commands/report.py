"""`moepp-bench report`: turn result directories (throughput, flops, comm, routing-stats) into one report,
report.md and a self-contained report.html with figures, without measuring anything again."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from ..errors import BenchError


def register(app: typer.Typer) -> None:
    app.command("report")(report)


def report(
    result_dirs: Optional[List[Path]] = typer.Argument(
        None, metavar="RESULT_DIR", help="Result directories (searched recursively for result files) or result "
                                            ".json files.", show_default=False),
    out: Path = typer.Option(Path("results/report"), help="Report directory: report.md, report.html, figures/. "
                                                          "Replaced as a whole when the report is complete."),
    compare: Optional[Tuple[Path, Path]] = typer.Option(
        None, "--compare", metavar="A B", help="Two result directories A B (two machines, commits or checkpoints): the same "
                                "figures side by side and the ratios B/A.", show_default=False),
) -> None:
    """Build one report (Markdown and self-contained HTML, PNG and SVG figures) from result directories."""
    from ..report.console import progress_bar, stderr
    from ..report.study import SECTIONS, check_out_dir, write_report
    from ..report.study_compare import check_comparable
    from ..report.study_inputs import read_study

    if compare and result_dirs:
        raise BenchError("give either RESULT_DIR... or --compare A B, not both")
    if not compare and not result_dirs:
        raise BenchError("give at least one RESULT_DIR (e.g. results/), or --compare A B")
    inputs = list(compare) if compare else list(result_dirs)
    check_out_dir(out, inputs)
    if compare:
        studies = [read_study([compare[0]], name="A", exclude=[out]), read_study([compare[1]], name="B", exclude=[out])]
        check_comparable(*studies)  # refused before the progress bar starts: the error stays one line
    else:
        studies = [read_study(inputs, exclude=[out])]
    if sys.argv[1:2] == ["report"]:
        command = shlex.join(["moepp-bench", *sys.argv[1:]])
    else:  # called in-process (tests): the options as parsed
        command = shlex.join(["moepp-bench", "report", *(["--compare"] if compare else []), *map(str, inputs),
                              "--out", str(out)])
    with progress_bar("report", len(SECTIONS), "section") as bar:
        files = write_report(studies, out, command,
                             on_section=lambda name: bar.update(0, advance=1, section=f"{name} drawn"))
    figures = sum(1 for f in files if f.suffix == ".png")
    n = sum(len(s.docs) for s in studies)
    stderr.print(f"read {n} result files; wrote {out / 'report.md'}, {out / 'report.html'} and {figures} figures "
                 f"(PNG and SVG) in {out / 'figures'}")
