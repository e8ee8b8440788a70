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
