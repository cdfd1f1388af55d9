"""The `moepp-bench` Typer app. Each module in moepp_bench.commands registers its own command(s)."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

from . import commands
from .errors import BenchError

app = typer.Typer(
    name="moepp-bench",
    help="Measure what MoE++ zero-computation experts buy: throughput, FLOPs, all-to-all volume, routing.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """Measure what MoE++ zero-computation experts buy: throughput, FLOPs, all-to-all volume, routing."""


for _info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
    importlib.import_module(f"{commands.__name__}.{_info.name}").register(app)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def main() -> None:
    """Console entry point: bad input becomes one line on stderr and exit code 2, never a traceback.
    (Usage errors are click's own: usage line, message, exit 2.)"""
    from moepp.checkpoint import CheckpointError

    try:
        app()
    except (BenchError, CheckpointError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
