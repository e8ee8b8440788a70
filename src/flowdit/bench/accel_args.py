"""Options of ``flowdit bench accel`` (kept free of heavy imports so that building the
command-line parser stays fast)."""

from __future__ import annotations

import argparse

# Each policy at its faithful defaults, plus the variants the docs compare. RAS ranks patches
# by the L2 norm over channels (its code's other metric) because the channel std of its
# default is undefined on one-channel images such as the embedded digits and MNIST.
DEFAULT_METHODS = (
    "fora;fora:interval=4;fora:cache=stack;delta_dit;"
    "taylorseer;taylorseer:order=1;taylorseer:interval=5,order=1,spaced=1;taylorseer:cache=stack;"
    "gated_taylor;gated_taylor:threshold=0.05;fbcache;teacache;teacache:threshold=0.2;"
    "ras:metric=l2norm;ras:metric=l2norm,select=paper_text;tome;grat"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``flowdit bench accel``."""
    p.add_argument("--run", required=True, help="run directory of the model")
    p.add_argument("--num", type=int, default=1000, help="samples per seed")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--solver", default="heun", help="fixed-step solver of every measurement")
    p.add_argument("--steps", type=int, default=16, help="solver steps of the uncached reference and of the caches")
    p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="policy specs separated by ';'")
    p.add_argument("--fewer-steps", default="1,2,3,4,5,6,8,10,12", help="step counts of the fewer-steps baseline")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="model precision while sampling (bf16: autocast; the fast path on AMX CPUs and GPUs)")
    p.add_argument("--batch-size", type=int, default=100,
                   help="images per turn: every seed's measurements take turns batch by batch, so smaller batches "
                        "spread machine noise more evenly")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out-dir", default="benchmarks/results", help="directory of the result files")
    p.add_argument("--name", default="accel", help="result file name")
    p.add_argument("--fresh", action="store_true",
                   help="measure everything again instead of reusing the saved cells of an interrupted run")
