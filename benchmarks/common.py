"""Shared helpers of the benchmarks: machine description, timing, result files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from flowdit.bench.machine import machine_info  # noqa: F401  (re-exported to the scripts)

RESULTS = Path(__file__).parent / "results"


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def write_results(name: str, payload: dict, table: str, out: Path = RESULTS) -> Path:
    """Write ``<out>/<name>.json`` and ``<name>.md`` (``out`` defaults to
    ``benchmarks/results``); returns the .md path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = out / f"{name}.md"
    md.write_text(table + "\n")
    return md
