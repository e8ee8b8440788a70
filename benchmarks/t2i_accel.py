"""Training-free acceleration on a text-to-image MMDiT, judged: each cache against the
uncached sampler and against simply taking fewer steps, in one interleaved run.

    python benchmarks/t2i_accel.py --run runs/shapes-mmdit [--n 200] [--steps 28] [--cfg 4]
        [--batch 50] [--rounds 2] [--name t2i_accel]

Every plan samples the same ``n`` test prompts (first captions) with the same noise;
the plans take turns batch by batch, so machine noise falls on all alike, and each plan's
time is the sum over its batches (``rounds`` passes; the median pass is reported).
Columns: the judge's exact match and per-attribute accuracy, the fraction of model calls
run in full, and the speed-up against the uncached run at ``--steps``.
Writes ``benchmarks/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import finish, markdown_table, pct
from flowdit.accel import build_policy
from flowdit.eval.shapes_judge import score, summarise
from flowdit.inference.text import generate_from_prompts, load_text_run
from flowdit.train.text_outputs import evaluation_prompts
from flowdit.utils.precision import autocast_dtype

# The MMDiT's joint blocks carry two streams, so the feature caches run on the whole stack
# (``cache=stack``: the stack's output residual is reused or forecast).
PLANS = ["none", "steps:20", "steps:14", "steps:10", "fora:interval=2,cache=stack", "fora:interval=3,cache=stack",
         "taylorseer:interval=3,order=1,cache=stack", "taylorseer:interval=4,order=2,cache=stack",
         "teacache:threshold=0.1", "teacache:threshold=0.2", "fbcache:threshold=0.1"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--solver", default="euler")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--plans", default=";".join(PLANS), help="';'-separated plans")
    ap.add_argument("--name", default="t2i_accel")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    run = load_text_run(args.run)
    amp = autocast_dtype("auto", torch.device("cpu"))
    prompts, graphs = evaluation_prompts("test", args.n)
    plans = args.plans.split(";")
    for p in plans:  # every spec is checked before any sampling
        if p != "none" and not p.startswith("steps:"):
            build_policy(p)
    times = {p: [] for p in plans}
    images = {p: [None] * len(prompts) for p in plans}
    calls = {p: [0, 0] for p in plans}
    for rnd in range(args.rounds):
        per = {p: 0.0 for p in plans}
        for lo in range(0, len(prompts), args.batch):
            batch = prompts[lo:lo + args.batch]
            for p in plans:
                steps = int(p.split(":")[1]) if p.startswith("steps:") else args.steps
                accel = build_policy(p) if p != "none" and not p.startswith("steps:") else None
                t0 = time.perf_counter()
                x, _ = generate_from_prompts(run, batch, solver=args.solver, steps=steps, cfg_scale=args.cfg,
                                             seed=0, amp_dtype=amp, accel=accel, batch_size=args.batch,
                                             first_index=lo)
                per[p] += time.perf_counter() - t0
                if rnd == 0:
                    for i in range(len(batch)):
                        images[p][lo + i] = x[i]
                    if accel is not None:
                        calls[p][0] += accel.stats.full_calls
                        calls[p][1] += accel.stats.calls
        for p in plans:
            times[p].append(per[p])
        print(f"round {rnd + 1}: " + ", ".join(f"{p} {per[p]:.1f} s" for p in plans), flush=True)
    base = statistics.median(times["none"]) if "none" in times else None
    rows = []
    for p in plans:
        s = summarise([score(images[p][i], g) for i, g in enumerate(graphs)])
        med = statistics.median(times[p])
        rows.append({"plan": p, "judge": s, "seconds": times[p], "median_seconds": med,
                     "speedup": base / med if base else None,
                     "full_call_fraction": calls[p][0] / calls[p][1] if calls[p][1] else 1.0})
    head = "| plan | exact | colour | shape | size | relation | count | full calls | s / image | speed-up |"
    lines = []
    for r in rows:
        j = r["judge"]
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {r['plan']} | {pct(j['exact'])} | {pct(j['colour'])} | {pct(j['shape'])} | {pct(j['size'])} | "
                     f"{pct(j['relation'])} | {pct(j['count'])} | {r['full_call_fraction']:.2f} | "
                     f"{r['median_seconds'] / len(prompts):.3f} | {speed} |")
    table = markdown_table(head, lines)
    payload = {"steps": args.steps, "cfg": args.cfg, "n": args.n, "rows": rows}
    finish(args.name, "t2i_accel.py", argv, payload, table, not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
