"""Shared helpers of the benchmarks: machine description, timing, result files.

The helpers themselves live in ``flowdit.bench`` (``machine``, ``timing``, ``report``), which
``flowdit bench accel`` uses too; this module gives the scripts their results directory.
"""

from __future__ import annotations

from pathlib import Path

from flowdit.bench import report
from flowdit.bench.machine import machine_info  # noqa: F401  (re-exported to the scripts)
from flowdit.bench.timing import timed  # noqa: F401  (re-exported to the scripts)

RESULTS = Path(__file__).parent / "results"


def write_results(name: str, payload: dict, table: str, out: Path = RESULTS) -> Path:
    """Write ``<out>/<name>.json`` and ``<name>.md`` (``out`` defaults to
    ``benchmarks/results``), each atomically; returns the .md path."""
    return report.write_results(name, payload, table, out)


def pct(v) -> str:
    """A fraction as a percentage with one decimal, ``-`` for None."""
    return "-" if v is None else f"{100 * v:.1f}"


def markdown_table(header: str, rows: list[str]) -> str:
    """A Markdown table from its header line ``| a | b |`` and its row lines."""
    return "\n".join([header, "|" + "---|" * (header.count("|") - 1), *rows])


def finish(name: str, script: str, argv, payload: dict, table: str, write: bool = True) -> None:
    """Print ``table``; unless ``write`` is off, write ``<name>.{json,md}`` with the command
    that reproduces it (``python benchmarks/<script> ARGS``) and the machine in the payload."""
    import shlex
    import sys

    print(table)
    if write:
        args = sys.argv[1:] if argv is None else argv
        payload = {"command": f"python benchmarks/{script} " + shlex.join(args), "machine": machine_info(), **payload}
        write_results(name, relative_paths(payload), table + "\n")


def relative_paths(obj):
    """``obj`` with every absolute path under the working directory made relative to it
    (a result file names no machine's directories)."""
    import os

    if isinstance(obj, dict):
        return {k: relative_paths(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relative_paths(v) for v in obj]
    if isinstance(obj, str) and os.path.isabs(obj):
        rel = os.path.relpath(obj)
        return obj if rel.startswith("..") else rel
    return obj
