"""``flowdit bench accel``: training-free acceleration against the uncached sampler."""

from __future__ import annotations

import argparse

from .common import command


def cmd_bench_accel(args: argparse.Namespace) -> int:
    from ..bench.accel import check, run

    check(args)
    run(args)
    return 0


def add_parsers(sub) -> None:
    """Register this module's commands on the ``flowdit`` subparsers ``sub``."""
    from ..bench.accel_args import add_arguments as bench_accel_arguments

    b = command(sub, "bench", help="side-by-side measurements")
    bsub = b.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    ba = command(bsub, "accel", help="training-free acceleration against the uncached sampler and fewer steps",
                 description="Run every block policy on one model, seeds and classes; write "
                             "JSON, a Markdown table and a Pareto plot (docs/acceleration.md).")
    bench_accel_arguments(ba)
    ba.set_defaults(func=cmd_bench_accel)
