"""The fast paths give the same samples: ``torch.compile`` (and bf16 autocast, where asked)
against fp32 eager on a trained model, same noise and classes.

    python benchmarks/fast_path.py --run runs/mnist --num 500 [--bf16]

Reports the largest and mean absolute pixel difference to the fp32 eager samples (images
in [-1, 1]) and the FID and class accuracy of each set (``flowdit.evaluate``), plus the
sampling time of each path after its warm-up (compilation is timed separately).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from common import machine_info, write_results
from flowdit.evaluate import evaluate_samples
from flowdit.inference import balanced_labels, generate, load_run_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--num", type=int, default=500)
    ap.add_argument("--solver", default="heun")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="also the bf16 autocast path (slow on CPUs without native bf16)")
    ap.add_argument("--name", default="fast_path")
    args = ap.parse_args()
    model, meta = load_run_model(args.run)
    shape = tuple(meta["data"]["shape"])
    dataset, root = meta["config"]["data"]["dataset"], meta["config"]["data"].get("root")
    labels = balanced_labels(model.num_classes, args.num)
    info = machine_info()

    def run(m, amp=None):
        t0 = time.perf_counter()
        out = generate(m, labels, shape, solver=args.solver, steps=args.steps, cfg_scale=args.cfg, seed=args.seed,
                       batch_size=args.num, amp_dtype=amp).images
        return out, time.perf_counter() - t0

    compiled = torch.compile(model)
    t0 = time.perf_counter()
    run(compiled)  # compiles for this batch shape
    compile_s = time.perf_counter() - t0
    paths = [("fp32 eager", model, None), ("fp32 compiled", compiled, None)]
    if args.bf16:
        paths.append(("bf16 eager", model, torch.bfloat16))
    rows, ref = [], None
    for name, m, amp in paths:
        images, secs = run(m, amp)
        ref = images if ref is None else ref
        diff = (images - ref).abs()
        r = evaluate_samples(images, labels, dataset, root=root, seed=args.seed)
        rows.append({"path": name, "seconds": secs, "max_abs_diff": diff.max().item(),
                     "mean_abs_diff": diff.mean().item(), "fid": r["fid"], "class_accuracy": r["class_accuracy"]})
        print(rows[-1], flush=True)
    cmd = "python benchmarks/fast_path.py " + " ".join(sys.argv[1:])
    lines = [f"Model: `{args.run}`; {args.num} samples, {args.solver} {args.steps} steps, CFG {args.cfg:g}, seed {args.seed}.",
             f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, load average at start "
             f"{info['load_average'][0]:.2f}, commit {info['commit']}; compilation took {compile_s:.0f} s.",
             f"Command: `{cmd}`", "",
             "| path | seconds | max abs. diff to fp32 eager | mean abs. diff | FID | class acc. % |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['path']} | {r['seconds']:.1f} | {r['max_abs_diff']:.2e} | {r['mean_abs_diff']:.2e} | "
              f"{r['fid']:.2f} | {100 * r['class_accuracy']:.1f} |" for r in rows]
    md = write_results(args.name, {"machine": info, "command": cmd, "compile_seconds": compile_s, "rows": rows},
                       "\n".join(lines))
    print("\n".join(lines))
    print(f"\nwrote {md}")


if __name__ == "__main__":
    main()
