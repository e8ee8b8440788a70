"""Convergence orders of the fixed-step solvers, measured by step halving.

    python benchmarks/solver_orders.py [--steps 2,4,...,1024] [--finest 3] [--no-write]

For each closed-form problem of ``flowdit.sampling.orders`` (``riccati``: the nonlinear
``dx/dt = -(1 + t) x^2``; ``gaussian``: the exact Gaussian-to-Gaussian flow) and each
solver, integrates from t = 1 to t = 0 with N, 2N, ... uniform steps, and prints the
order of every halving, ``log2(e(N) / e(2N))``, and the least-squares order over the
``--finest`` finest halvings (the number the docs quote). Runs in a few seconds on one
core; the result is deterministic (float64, fixed points). Writes
``benchmarks/results/solver_orders.{json,md}`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import sys

from common import write_results
from flowdit.sampling import build_solver
from flowdit.sampling.orders import PROBLEMS, convergence

SOLVERS = ("euler", "heun", "midpoint", "rf2", "rf3", "fireflow")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="2,4,8,16,32,64,128,256,512,1024",
                    help="step counts, each twice the previous")
    ap.add_argument("--finest", type=int, default=3, help="fit the order on this many finest halvings")
    ap.add_argument("--solvers", default=",".join(SOLVERS))
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    rows, payload = [], {"steps": steps, "finest": args.finest, "results": []}
    pairs = [f"{a}->{b}" for a, b in zip(steps, steps[1:])]
    lo = steps[-args.finest - 1]
    head = ["problem", "solver", "nominal", *pairs, f"fit N={lo}..{steps[-1]}", f"error at N={steps[-1]}"]
    rows.append("| " + " | ".join(head) + " |")
    rows.append("|" + " --- |" * len(head))
    for problem in PROBLEMS:
        for name in args.solvers.split(","):
            c = convergence(name, problem, steps, args.finest)
            nominal = build_solver(name).order
            payload["results"].append({"problem": problem, "solver": name, "nominal": nominal,
                                       "errors": c.errors, "halving": c.halving, "order": c.order})
            rows.append(f"| {problem} | {name} | {nominal} | " + " | ".join(f"{h:.3f}" for h in c.halving)
                        + f" | **{c.order:.3f}** | {c.errors[-1]:.2e} |")
    table = "\n".join(rows)
    print(table)
    if not args.no_write:
        print(f"wrote {write_results('solver_orders', payload, table)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
