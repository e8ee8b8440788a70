"""Text-to-image on the captioned shapes, scored by the scene judge: accuracy per attribute
and exact match, in distribution and on held-out compositions, by object count, against
NFE and the guidance scale.

    python benchmarks/t2i_judge.py --run runs/shapes-mmdit [--n 300] [--n-heldout 150]
        [--steps 4,8,16,28] [--cfgs 1,2,4,7] [--solver euler] [--name t2i_judge]

Prompts are the first caption of the fixed ``test`` and ``heldout`` scenes; sample ``i``
gets the noise of ``(seed, i)`` in every cell, so cells differ only in NFE or guidance.
Two sweeps: the steps at the run's guidance scale (``sample.cfg``), then the guidance
scales at the largest step count. Writes ``benchmarks/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import finish, markdown_table, pct
from flowdit.inference.text import load_text_run
from flowdit.train.text_outputs import evaluation_prompts, judge_prompts
from flowdit.utils.precision import autocast_dtype


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="text-to-image run directory")
    ap.add_argument("--n", type=int, default=300, help="test prompts per cell")
    ap.add_argument("--n-heldout", type=int, default=150, help="held-out prompts per cell")
    ap.add_argument("--steps", default="4,8,16,28")
    ap.add_argument("--cfgs", default="1,2,4,7")
    ap.add_argument("--solver", default="euler")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="t2i_judge")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    run = load_text_run(args.run)
    amp = autocast_dtype("auto", torch.device("cpu"))
    run_cfg = float(run.meta["config"]["sample"]["cfg"])
    steps = [int(s) for s in args.steps.split(",")]
    cfgs = [float(c) for c in args.cfgs.split(",")]
    cells = [(s, run_cfg) for s in steps] + [(max(steps), c) for c in cfgs if c != run_cfg]
    test = evaluation_prompts("test", args.n)
    held = evaluation_prompts("heldout", args.n_heldout)
    rows = []
    for s, c in cells:
        t0 = time.perf_counter()
        kw = dict(solver=args.solver, steps=s, cfg_scale=c, amp_dtype=amp, seed=args.seed)
        a, _, sec = judge_prompts(run, *test, **kw)
        h, _, _ = judge_prompts(run, *held, **kw)
        rows.append({"solver": args.solver, "steps": s, "nfe": a["nfe"], "cfg": c,
                     "test": a, "heldout": h, "seconds_per_image": sec})
        print(f"{args.solver} steps {s} cfg {c}: exact {pct(a['exact'])} (1/2/3 objects "
              f"{pct(a.get('objects_1', {}).get('exact'))}/{pct(a.get('objects_2', {}).get('exact'))}/"
              f"{pct(a.get('objects_3', {}).get('exact'))}), held-out {pct(h['exact'])} "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    head = ("| solver | steps | NFE | CFG | exact | 1 obj | 2 obj | 3 obj | colour | shape | size | relation "
            "| count | held-out exact | held-out 1 / 2 / 3 obj | s / image |")
    lines = []
    for r in rows:
        a, h = r["test"], r["heldout"]
        lines.append(
            f"| {r['solver']} | {r['steps']} | {r['nfe']} | {r['cfg']:g} | {pct(a['exact'])} | "
            f"{pct(a.get('objects_1', {}).get('exact'))} | {pct(a.get('objects_2', {}).get('exact'))} | "
            f"{pct(a.get('objects_3', {}).get('exact'))} | {pct(a['colour'])} | {pct(a['shape'])} | {pct(a['size'])} | "
            f"{pct(a['relation'])} | {pct(a['count'])} | {pct(h['exact'])} | "
            f"{pct(h.get('objects_1', {}).get('exact'))} / {pct(h.get('objects_2', {}).get('exact'))} / "
            f"{pct(h.get('objects_3', {}).get('exact'))} | {r['seconds_per_image']:.3f} |")
    table = markdown_table(head, lines)
    payload = {"run_config": run.meta["config"], "rows": rows, "test_prompts": args.n,
               "heldout_prompts": args.n_heldout}
    finish(args.name, "t2i_judge.py", argv, payload, table, not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
