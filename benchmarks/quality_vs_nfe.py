"""Sample quality against the number of velocity evaluations, per solver, with and
without classifier-free guidance, scored by the data set's shipped evaluator.

    python benchmarks/quality_vs_nfe.py --run runs/mnist --num 2000 --seeds 0 \\
        --nfe 1,2,4,8,16,32,64 --solvers euler,heun,midpoint,rf3 --cfg 1.0,1.5 --tols 1e-2,1e-3,1e-4 \\
        --precision bf16 --compile

A solver with k evaluations per step runs NFE / k steps (cells where NFE is not a
multiple of k use the nearest step count and report the NFE that actually ran);
``midpoint`` stands for RF-Solver-2 too (the two are the same update, tested in
``tests/test_sampling.py``). Every cell uses the same seeds, classes (balanced) and
sample count. Also reported: the floor (real test images) and the ceiling (uniform
noise) under the same evaluator. Writes ``benchmarks/results/<name>.{json,md,png}``.

Every finished cell is appended to ``benchmarks/results/<name>.cells.jsonl``; a killed run
started again with the same arguments skips the cells already there (``--fresh`` starts
over). A grid can be split over processes (one per guidance scale, say) that share the cells
file; ``--from-cells`` then writes the table from the finished cells without sampling,
lists the cells that were not measured, and leaves out the seconds per image (the cells'
timings come from different processes and loads). ``--precision bf16`` samples under bf16
autocast (the model's weights stay fp32).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch

from common import RESULTS, machine_info, write_results
from flowdit.bench.cells import JsonlCells
from flowdit.checkpoint_io import tensors_checksum
from flowdit.data import build_dataset
from flowdit.evaluate import evaluate_samples
from flowdit.inference import balanced_labels, generate, load_run_model
from flowdit.sampling.solvers import build_solver

LABELS = {"euler": "Euler", "heun": "Heun", "midpoint": "midpoint / RF-Solver-2", "rf2": "RF-Solver-2",
          "rf3": "RF-Solver-3", "dopri5": "dopri5"}


def cell(model, meta, solver, steps, cfg, n, seeds, dataset, root, tol=1e-4, amp_dtype=None):
    """Mean and std over seeds of every metric of one (solver, steps, cfg) cell."""
    shape = tuple(meta["data"]["shape"])
    labels = balanced_labels(model.num_classes, n)
    shift = float(meta["config"]["flow"].get("shift", 1.0))
    runs, nfe, secs, eval_secs = [], 0, 0.0, 0.0
    for s in seeds:
        t0 = time.perf_counter()
        gen = generate(model, labels, shape, solver=solver, steps=steps, cfg_scale=cfg, shift=shift, seed=s,
                       batch_size=500, rtol=tol, atol=tol, amp_dtype=amp_dtype)
        secs += time.perf_counter() - t0
        nfe = max(nfe, gen.nfe)
        runs.append(evaluate_samples(gen.images, gen.labels, dataset, root=root, seed=s))
        eval_secs += runs[-1]["eval_seconds"]
    out = {"solver": solver, "steps": steps, "cfg": cfg, "nfe": nfe, "num": n, "seeds": list(seeds),
           "sample_seconds_per_image": secs / (n * len(seeds)), "eval_seconds_per_run": eval_secs / len(seeds)}
    if solver == "dopri5":
        out["tol"] = tol
    for key in ("fid", "fid_guide", "precision", "recall", "class_accuracy"):
        vals = [r[key] for r in runs]
        out[key] = statistics.fmean(vals)
        out[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def fmt(r, key="fid"):
    s = f"{r[key]:.2f}" if key.startswith("fid") else f"{100 * r[key]:.1f}"
    if len(r["seeds"]) > 1:
        s += f" ± {r[key + '_std']:.2f}" if key.startswith("fid") else f" ± {100 * r[key + '_std']:.1f}"
    return s


def plot(rows, refs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {}
    for r in rows:
        colors.setdefault(r["solver"], f"C{len(colors)}")
    for (solver, cfg) in sorted({(r["solver"], r["cfg"]) for r in rows}):
        pts = sorted((r for r in rows if r["solver"] == solver and r["cfg"] == cfg), key=lambda r: r["nfe"])
        style = "-" if cfg == 1.0 else "--"
        label = f"{LABELS.get(solver, solver)}, cfg {cfg:g}"
        axes[0].plot([p["nfe"] for p in pts], [p["fid"] for p in pts], style, marker="o", ms=3,
                     color=colors[solver], label=label)
        axes[1].plot([p["nfe"] for p in pts], [100 * p["class_accuracy"] for p in pts], style, marker="o", ms=3,
                     color=colors[solver], label=label)
    axes[0].axhline(refs["floor"]["fid"], color="gray", lw=0.8, ls=":", label="real test images (floor)")
    axes[0].set(xscale="log", yscale="log", xlabel="NFE", ylabel="FID (evaluator features)", title="FID vs NFE")
    axes[1].set(xscale="log", xlabel="NFE", ylabel="class accuracy (%)", title="class accuracy vs NFE")
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory of the model")
    ap.add_argument("--num", type=int, default=2000, help="samples per cell")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--nfe", default="1,2,4,8,16,32,64")
    ap.add_argument("--solvers", default="euler,heun,midpoint,rf3")
    ap.add_argument("--cfg", default="1.0,1.5")
    ap.add_argument("--tols", default="1e-2,1e-3,1e-4", help="dopri5 tolerances ('' to skip)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="sampling precision")
    ap.add_argument("--compile", action="store_true", help="sample with torch.compile (one compile per batch shape)")
    ap.add_argument("--name", help="result file name (default: <dataset>_quality)")
    ap.add_argument("--fresh", action="store_true", help="ignore the cells of an earlier, interrupted run")
    ap.add_argument("--from-cells", action="store_true",
                    help="sample nothing: write the table from the finished cells, listing the missing ones")
    args = ap.parse_args()
    if args.fresh and args.from_cells:  # before the model is loaded
        ap.error("--fresh and --from-cells exclude each other")

    torch.manual_seed(0)
    model, meta = load_run_model(args.run)
    if args.compile:
        model = torch.compile(model, dynamic=False)
    dataset, root = meta["config"]["data"]["dataset"], meta["config"]["data"].get("root")
    seeds = [int(s) for s in args.seeds.split(",")]
    amp_dtype = torch.bfloat16 if args.precision == "bf16" else None
    name = args.name or f"{dataset}_quality"
    info = machine_info()
    t_start = time.perf_counter()

    # Floor and ceiling under the same evaluator and sample count.
    test = build_dataset(dataset, root=root, split="test")
    n_ref = min(args.num, len(test))
    x, y = test.batch(torch.arange(n_ref))
    refs = {"floor": evaluate_samples(x, y, dataset, root=root),
            "ceiling": evaluate_samples(torch.rand_like(x) * 2 - 1, y, dataset, root=root)}
    print(f"floor (real test): FID {refs['floor']['fid']:.2f}; ceiling (noise): FID {refs['ceiling']['fid']:.1f}", flush=True)

    # Finished cells of an interrupted run with the same settings are reused, keyed by what defines a cell.
    cells_path = RESULTS / f"{name}.cells.jsonl"
    # The EMA weights' checksum is part of the key: a retrained run in the same directory starts afresh.
    weights = tensors_checksum(args.run)
    setting = {"run": args.run, "weights": weights, "num": args.num, "seeds": seeds, "precision": args.precision,
               "compile": args.compile}
    existed = cells_path.exists()
    done_cells = JsonlCells(cells_path, setting, key=lambda r: (r["solver"], r["steps"], r["cfg"], r.get("tol")),
                            fresh=args.fresh)
    if existed and not args.fresh:
        print(f"reusing {len(done_cells)} finished cells from {cells_path}", flush=True)

    def run_cell(solver, steps, cfg, tol=None):
        hit = done_cells.get((solver, steps, cfg, tol))
        if hit is not None:
            return hit
        if args.from_cells:
            missing.append(f"{LABELS.get(solver, solver)} CFG {cfg:g} " + (f"tol {tol:g}" if tol else f"{steps} steps"))
            return None
        r = cell(model, meta, solver, steps, cfg, args.num, seeds, dataset, root, tol=tol or 1e-4,
                 amp_dtype=amp_dtype)
        done_cells.put(r)
        return r

    rows, missing = [], []
    for cfg in [float(c) for c in args.cfg.split(",")]:
        for solver in args.solvers.split(","):
            k = build_solver(solver).nfe_per_step
            done = set()
            for nfe in [int(v) for v in args.nfe.split(",")]:
                steps = max(1, round(nfe / k))
                if steps in done:
                    continue
                done.add(steps)
                r = run_cell(solver, steps, cfg)
                if r is None:
                    continue
                rows.append(r)
                print(f"{solver:9s} cfg {cfg:g} steps {steps:3d} NFE {r['nfe']:3d}: FID {fmt(r)}  "
                      f"FID_guide {fmt(r, 'fid_guide')}  acc {fmt(r, 'class_accuracy')}%  "
                      f"P {r['precision']:.3f} R {r['recall']:.3f}", flush=True)
        for tol in [float(t) for t in args.tols.split(",") if t]:
            r = run_cell("dopri5", 0, cfg, tol=tol)
            if r is None:
                continue
            rows.append(r)
            print(f"dopri5    cfg {cfg:g} tol {tol:g} NFE {r['nfe']:3d}: FID {fmt(r)}  acc {fmt(r, 'class_accuracy')}%",
                  flush=True)

    if not rows:
        sys.exit(f"{cells_path}: no finished cells for these settings (model checksum, samples, seeds, precision)")
    cmd = "python benchmarks/quality_vs_nfe.py " + shlex.join(sys.argv[1:])
    timed = not args.from_cells
    lines = [f"Model: `{args.run}` ({meta['model_config']['hidden_size']} wide, depth {meta['model_config']['depth']}, "
             f"patch {meta['model_config']['patch_size']}); {args.num} samples per cell, seeds {args.seeds}, "
             f"sampling in {args.precision}{' with torch.compile' if args.compile else ''}; "
             f"FID on the evaluator's penultimate features against the {dataset} training set.",
             f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, load average at start "
             f"{info['load_average'][0]:.2f}, commit {info['commit']}, {time.perf_counter() - t_start:.0f} s in all "
             f"(this invocation). Scoring one set of {args.num} samples takes "
             f"{statistics.median(r['eval_seconds_per_run'] for r in rows):.1f} s (median over the cells).",
             f"Command: `{cmd}`", ""]
    if not timed:
        lines += [f"Written from the finished cells of `{cells_path.name}`; the seconds per image are left out "
                  "because the cells were sampled in different processes under different loads."
                  + (f" Not measured: {'; '.join(missing)}." if missing else ""), ""]
    lines += [f"Floor (real test images, {n_ref}): FID {refs['floor']['fid']:.2f}, FID_guide "
              f"{refs['floor']['fid_guide']:.2f}, class accuracy {100 * refs['floor']['class_accuracy']:.1f}%. "
              f"Ceiling (uniform noise): FID {refs['ceiling']['fid']:.1f}.", "",
              "| solver | cfg | steps | NFE | FID | FID (guide features) | class acc. % | precision | recall |"
              + (" s / image |" if timed else ""),
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if timed else "")]
    for r in rows:
        steps = f"tol {r['tol']:g}" if r["solver"] == "dopri5" else str(r["steps"])
        lines.append(f"| {LABELS.get(r['solver'], r['solver'])} | {r['cfg']:g} | {steps} | {r['nfe']} | {fmt(r)} | "
                     f"{fmt(r, 'fid_guide')} | {fmt(r, 'class_accuracy')} | {r['precision']:.3f} | {r['recall']:.3f} |"
                     + (f" {r['sample_seconds_per_image']:.4f} |" if timed else ""))
    md = write_results(name, {"machine": info, "command": cmd, "refs": refs, "rows": rows}, "\n".join(lines))
    plot(rows, refs, md.with_suffix(".png"))
    print("\n".join(lines))
    print(f"\nwrote {md} and {md.with_suffix('.png')}")


if __name__ == "__main__":
    main()
