"""Does a change of the sampling machinery cost speed? Two source trees, timed in turns.

    git worktree add /tmp/flowdit-old <commit>
    python benchmarks/redesign_overhead.py --old /tmp/flowdit-old --rounds 5

Each round runs, in separate processes one after the other, the *old* and the *new*
source tree (this checkout by default) on the same work: ``flowdit.inference.generate``
with Euler and CFG 1.5 from fixed noise on random-weight models (a call's cost does not
depend on the weights), uncached and with stack-level and per-block caches. Taking
turns round by round spreads the machine's drift over both; the table gives, per case,
the median time of each tree and the median and range of the per-round ratios new / old.
Every case's images are compared across the trees (the maximum absolute difference is
reported; a change that keeps the order of operations gives 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import machine_info, write_results

# (label, model, image side, images, steps, accel spec)
CASES = [
    ("patch-2 MNIST model, uncached", "DiT-mnist/2", 28, 32, 50, None),
    ("patch-2 MNIST model, fora:interval=3", "DiT-mnist/2", 28, 32, 50, "fora:interval=3"),
    ("patch-4 MNIST model, uncached", "DiT-mnist", 28, 64, 50, None),
    ("patch-4 MNIST model, taylorseer:interval=4,order=1,cache=stack", "DiT-mnist", 28, 64, 50,
     "taylorseer:interval=4,order=1,cache=stack"),
    ("digits model (8x8, call overhead), uncached", "DiT-digits", 8, 16, 200, None),
    ("digits model (8x8, call overhead), fora:interval=2,cache=stack", "DiT-digits", 8, 16, 200,
     "fora:interval=2,cache=stack"),
]

WORKER = r"""
import json, sys, time, torch
from flowdit.models.registry import build_model
from flowdit.inference import generate
cases = json.loads(sys.argv[1])
out = []
for label, name, side, num, steps, spec in cases:
    torch.manual_seed(0)
    model = build_model(name, side, 1, 10).eval()
    with torch.no_grad():  # adaLN-Zero starts as the identity: give every block work to do
        for p in model.parameters():
            p.normal_(0, 0.02)
    policy = None
    if spec:
        from flowdit.accel import build_policy
        policy = build_policy(spec)
    labels = torch.arange(num) % 10
    run = lambda: generate(model, labels, (1, side, side), solver="euler", steps=steps, cfg_scale=1.5,
                           seed=1, batch_size=num, accel=policy).images
    run()  # warm-up
    t0 = time.perf_counter(); images = run(); dt = time.perf_counter() - t0
    out.append({"label": label, "seconds": dt, "sum": float(images.double().sum()),
                "first": images.flatten()[:64].tolist()})
print(json.dumps(out))
"""


def run_tree(src: Path, threads: int) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(src / "src"), OMP_NUM_THREADS=str(threads))
    res = subprocess.run([sys.executable, "-c", WORKER, json.dumps(CASES)], env=env, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"redesign_overhead: the tree {src} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, type=Path, help="source tree of the earlier version (a git worktree)")
    ap.add_argument("--new", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="source tree of the later version (default: this checkout)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="redesign_overhead")
    args = ap.parse_args()
    for tree, flag in ((args.old, "--old"), (args.new, "--new")):
        if not (tree / "src" / "flowdit" / "__init__.py").is_file():
            sys.exit(f"redesign_overhead: {flag} {tree} is not a flowdit source tree (no src/flowdit)")
    machine = machine_info()
    times = {c[0]: {"old": [], "new": []} for c in CASES}
    diffs = {c[0]: 0.0 for c in CASES}
    for r in range(args.rounds):
        got = {}
        for which in (("old", "new") if r % 2 == 0 else ("new", "old")):
            got[which] = run_tree(args.old if which == "old" else args.new, args.threads)
            for row in got[which]:
                times[row["label"]][which].append(row["seconds"])
        for a, b in zip(got["old"], got["new"]):
            d = max(abs(x - y) for x, y in zip(a["first"], b["first"]))
            diffs[a["label"]] = max(diffs[a["label"]], d, abs(a["sum"] - b["sum"]))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    rows, lines = [], []
    for label, tv in times.items():
        ratios = [n / o for n, o in zip(tv["new"], tv["old"])]
        row = {"case": label, "old_s": statistics.median(tv["old"]), "new_s": statistics.median(tv["new"]),
               "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
               "max_abs_diff": diffs[label]}
        rows.append(row)
        lines.append(f"| {label} | {row['old_s']:.3f} | {row['new_s']:.3f} | {row['ratio_median']:.3f} "
                     f"({row['ratio_min']:.3f}-{row['ratio_max']:.3f}) | {row['max_abs_diff']:.1e} |")
    table = "\n".join([
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, torch {machine.get('torch', '?')}, "
        f"load average at start {machine.get('load_average', '?')}; {args.threads} threads; {args.rounds} rounds, "
        "trees taking turns.",
        f"Command: `python benchmarks/redesign_overhead.py --old OLD_TREE --rounds {args.rounds}`",
        "",
        "| case (Euler, CFG 1.5, random weights) | old s | new s | new / old, median (range) | max abs. difference |",
        "| --- | --- | --- | --- | --- |",
        *lines,
    ])
    print(table)
    write_results(args.name, {"machine": machine, "rounds": args.rounds, "threads": args.threads, "rows": rows},
                  table)


if __name__ == "__main__":
    main()
