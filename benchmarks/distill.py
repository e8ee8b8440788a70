"""Few-step students against their teacher: FID and class accuracy at 1, 2 and 4 NFE,
straightness, the error against the teacher's coupling, and wall-clock per image as a
ratio to the teacher's 50-step sampling measured in the same run.

    python benchmarks/distill.py --teacher runs/mnist --pairs pairs/mnist \\
        --student 2-RF=runs/mnist_2rf --student 2-RF++=runs/mnist_2rfpp:renoise \\
        --student distilled=runs/mnist_distill --student SlimFlow=runs/mnist_slimflow_distill \\
        --num 2000 --seeds 0

A student is ``LABEL=RUN_DIR[:SOLVER]`` (solver default ``euler``; ``renoise`` is the
2-RF++ sampler). Every model samples the same balanced classes from the same seeded noise
at each NFE in ``--nfe`` (NFE = velocity evaluations; 1-NFE-per-step solvers only). The
teacher samples with the guidance scale folded into the pairs (``--teacher-cfg``, default
the pairs' own); students with ``--student-cfg`` (default 1: guidance is in their pairs).
The quality reference is the teacher's best multi-step setting (``--ref-solver``,
``--ref-steps``, on ``--ref-seeds``); the time reference is the teacher's ``--time-steps``-step
Euler sampling of ``--time-num`` images (one batch), timed in the same process.
Quality is scored by the data set's shipped evaluator (``flowdit.evaluate``); straightness
(``flowdit.distill.straightness``, Euler on ``--straight-steps`` steps) and the mean squared
error to the teacher's endpoints are measured on the first ``--pair-num`` pairs.
Writes ``<name>.{json,md,png}`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from common import RESULTS, machine_info, write_results
from flowdit.distill import load_pairs, straightness, transport_cost
from flowdit.evaluate import evaluate_samples
from flowdit.inference import balanced_labels, generate, load_run_model, model_velocity
from flowdit.sampling.sample import sample
from flowdit.sampling.solvers import build_solver

METRICS = ("fid", "fid_guide", "precision", "recall", "class_accuracy")


def parse_student(spec: str) -> tuple[str, str, str]:
    """``LABEL=RUN[:SOLVER]`` -> ``(label, run, solver)``."""
    label, eq, rest = spec.partition("=")
    if not eq or not label or not rest:
        raise SystemExit(f"--student {spec!r}: expected LABEL=RUN_DIR[:SOLVER]")
    run, _, solver = rest.partition(":")
    solver = solver or "euler"
    if build_solver(solver).nfe_per_step != 1:
        raise SystemExit(f"--student {spec!r}: solver {solver} takes more than 1 NFE per step")
    return label, run, solver


def trained_with_guide(meta) -> bool:
    """Whether a run's loss used the guide network (a perceptual distance on its features):
    then FID in the guide's feature space is not an independent view of that model."""
    cfg = meta.get("config", {})
    flow, dist = cfg.get("flow", {}), cfg.get("distill", {})
    perceptual = dist.get("loss") == "perceptual" or (flow.get("loss") == "rfpp" and flow.get("perceptual_weight", 1.0) > 0)
    return perceptual and flow.get("perceptual", "guide") == "guide"


def quality(model, meta, solver, steps, cfg, labels, seeds, dataset, root, amp_dtype=None) -> dict:
    """Mean (and std over seeds) of the evaluator metrics, NFE and seconds per image."""
    shape = tuple(meta["data"]["shape"])
    runs, secs, nfe = [], 0.0, 0
    for s in seeds:
        t0 = time.perf_counter()
        gen = generate(model, labels, shape, solver=solver, steps=steps, cfg_scale=cfg, seed=s, batch_size=500,
                       amp_dtype=amp_dtype)
        secs += time.perf_counter() - t0
        nfe = max(nfe, gen.nfe)
        runs.append(evaluate_samples(gen.images, gen.labels, dataset, root=root, seed=s))
    out = {"solver": solver, "steps": steps, "cfg": cfg, "nfe": nfe,
           "seconds_per_image": secs / (len(labels) * len(seeds))}
    for k in METRICS:
        vals = [r[k] for r in runs]
        out[k] = statistics.fmean(vals)
        out[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def coupling_metrics(model, solver, cfg, pairs, n, nfe_list, straight_steps, amp_dtype=None) -> dict:
    """Straightness of the model's flow from the pairs' noise, and the mean squared error per
    dimension of its k-NFE samples to the teacher's endpoints."""
    z, y, target = pairs.noise[:n], pairs.label[:n], pairs.sample[:n]
    fn = model_velocity(model, y, cfg, amp_dtype)

    out = {"straightness": straightness(fn, z, solver="euler", steps=straight_steps).straightness}
    for k in nfe_list:
        x = sample(fn, z, solver=solver, steps=k).x
        out[f"pair_mse_{k}"] = float((x - target).pow(2).mean())
    return out


def plot(rows, ref, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, label in enumerate(dict.fromkeys(r["model"] for r in rows)):
        pts = sorted((r for r in rows if r["model"] == label), key=lambda r: r["nfe"])
        for ax, key, scale in ((axes[0], "fid", 1), (axes[1], "class_accuracy", 100)):
            ax.plot([p["nfe"] for p in pts], [scale * p[key] for p in pts], marker="o", color=f"C{i}", label=label)
    tag = f"teacher, {ref['solver']} {ref['nfe']} NFE"
    axes[0].axhline(ref["fid"], color="gray", ls=":", label=tag)
    axes[0].axhline(2 * ref["fid"], color="gray", ls="--", lw=0.8, label="2x the teacher (2-NFE goal)")
    axes[0].axhline(3 * ref["fid"], color="gray", ls="-.", lw=0.8, label="3x the teacher (1-NFE goal)")
    axes[1].axhline(100 * ref["class_accuracy"], color="gray", ls=":", label=tag)
    axes[0].set(xscale="log", yscale="log", xlabel="NFE", ylabel="FID (evaluator features)", title="FID vs NFE")
    fids = [r["fid"] for r in rows] + [ref["fid"]]
    ticks = [v for v in (10, 15, 20, 30, 50, 100, 200, 300, 500, 1000) if min(fids) * 0.8 <= v <= max(fids) * 1.25]
    axes[0].set_yticks(ticks, [str(v) for v in ticks])
    axes[0].yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axes[1].set(xscale="log", xlabel="NFE", ylabel="class accuracy (%)", title="class accuracy vs NFE")
    nfes = sorted({r["nfe"] for r in rows})
    for ax in axes:
        ax.set_xticks(nfes, [str(k) for k in nfes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="run directory of the teacher")
    ap.add_argument("--pairs", required=True, help="the teacher's coupling pairs (flowdit reflow pairs)")
    ap.add_argument("--student", action="append", default=[], help="LABEL=RUN_DIR[:SOLVER], repeatable")
    ap.add_argument("--num", type=int, default=2000, help="samples per cell")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--nfe", default="1,2,4")
    ap.add_argument("--ref-solver", default="heun", help="solver of the teacher's quality reference")
    ap.add_argument("--ref-steps", type=int, default=8, help="steps of the teacher's quality reference")
    ap.add_argument("--ref-seeds", help="seeds of the quality reference (default: --seeds)")
    ap.add_argument("--time-steps", type=int, default=50, help="Euler steps of the teacher's time reference")
    ap.add_argument("--time-num", type=int, default=500, help="images of the time reference")
    ap.add_argument("--teacher-solver", default="euler", help="the teacher's few-step solver (1 NFE per step)")
    ap.add_argument("--teacher-cfg", type=float, help="teacher guidance (default: the pairs' cfg)")
    ap.add_argument("--student-cfg", type=float, default=1.0)
    ap.add_argument("--pair-num", type=int, default=500, help="pairs for straightness and endpoint error")
    ap.add_argument("--straight-steps", type=int, default=32)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="autocast of every model call (the time reference too)")
    ap.add_argument("--name", help="result file name (default: <dataset>_distill)")
    ap.add_argument("--out", default=str(RESULTS), help="directory of the result files")
    args = ap.parse_args()

    torch.manual_seed(0)
    info = machine_info()
    t_start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    amp = torch.bfloat16 if args.precision == "bf16" else None
    nfes = [int(v) for v in args.nfe.split(",")]
    teacher, tmeta = load_run_model(args.teacher)
    dataset, root = tmeta["config"]["data"]["dataset"], tmeta["config"]["data"].get("root")
    pairs = load_pairs(args.pairs)
    t_cfg = args.teacher_cfg if args.teacher_cfg is not None else float(pairs.settings.get("cfg", 1.0))
    labels = balanced_labels(teacher.num_classes, args.num)
    n_pairs = min(args.pair_num, len(pairs))

    models = [("teacher", args.teacher, args.teacher_solver, t_cfg, teacher, tmeta)]
    for spec in args.student:
        label, run, solver = parse_student(spec)
        m, meta = load_run_model(run)
        if tuple(meta["data"]["shape"]) != tuple(tmeta["data"]["shape"]):
            raise SystemExit(f"student {run} makes {meta['data']['shape']} images, the teacher {tmeta['data']['shape']}")
        models.append((label, run, solver, args.student_cfg, m, meta))

    # Quality reference: the teacher's best multi-step setting. Time reference: its 50-step
    # Euler sampling of one batch, timed here so that the ratios share the machine's state.
    ref_seeds = [int(v) for v in args.ref_seeds.split(",")] if args.ref_seeds else seeds
    ref = quality(teacher, tmeta, args.ref_solver, args.ref_steps, t_cfg, labels, ref_seeds, dataset, root, amp)
    ref.update(steps=args.ref_steps, seeds=ref_seeds)
    t_labels = balanced_labels(teacher.num_classes, args.time_num)
    t0 = time.perf_counter()
    generate(teacher, t_labels, tuple(tmeta["data"]["shape"]), solver="euler", steps=args.time_steps, cfg_scale=t_cfg,
             seed=seeds[0], batch_size=500, amp_dtype=amp)
    t_ref = (time.perf_counter() - t0) / args.time_num
    print(f"teacher {args.ref_solver} {args.ref_steps} steps: FID {ref['fid']:.2f} acc {100 * ref['class_accuracy']:.1f}%; "
          f"{args.time_steps}-step Euler {1000 * t_ref:.2f} ms/image", flush=True)

    rows, summary = [], []
    for label, run, solver, cfg, model, meta in models:
        params = sum(p.numel() for p in model.parameters())
        cm = coupling_metrics(model, solver, cfg, pairs, n_pairs, nfes, args.straight_steps, amp)
        summary.append({"model": label, "run": run, "params": params, "solver": solver, "cfg": cfg, **cm})
        for k in nfes:
            r = quality(model, meta, solver, k, cfg, labels, seeds, dataset, root, amp)
            r.update(model=label, run=run, params=params, time_ratio=r["seconds_per_image"] / t_ref,
                     pair_mse=cm[f"pair_mse_{k}"], guide_in_loss=trained_with_guide(meta))
            rows.append(r)
            print(f"{label:12s} {solver:8s} NFE {r['nfe']}: FID {r['fid']:.2f} acc {100 * r['class_accuracy']:.1f}% "
                  f"time x{r['time_ratio']:.3f} pair MSE {r['pair_mse']:.4f}", flush=True)

    cmd = "python benchmarks/distill.py " + " ".join(sys.argv[1:])
    name = args.name or f"{dataset}_distill"
    pm = lambda r, k: f" ± {r[k + '_std']:.2f}" if r[k + "_std"] else ""  # noqa: E731
    lines = [f"Teacher `{args.teacher}`, pairs `{args.pairs}` ({len(pairs)} pairs, settings {pairs.settings}); "
             f"{args.num} samples per cell, seeds {args.seeds}, {args.precision}; FID on the evaluator's penultimate features against "
             f"the {dataset} training set.",
             f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, load average at start "
             f"{info['load_average'][0]:.2f}, commit {info['commit']}, {time.perf_counter() - t_start:.0f} s in all.",
             f"Command: `{cmd}`", "",
             f"Quality reference: teacher, {args.ref_solver} {args.ref_steps} steps ({ref['nfe']} NFE), cfg {t_cfg:g}, "
             f"seeds {','.join(map(str, ref_seeds))}: FID {ref['fid']:.2f}{pm(ref, 'fid')}, class accuracy "
             f"{100 * ref['class_accuracy']:.1f}%. Time reference: teacher, Euler {args.time_steps} steps, cfg "
             f"{t_cfg:g}, {1000 * t_ref:.2f} ms per image ({args.time_num} images).", "",
             f"| model | params | solver | cfg | NFE | FID | FID (guide) | class acc. % | time / teacher {args.time_steps}-step | "
             "MSE to teacher endpoint |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['solver']} | {r['cfg']:g} | {r['nfe']} | "
                     f"{r['fid']:.2f}{pm(r, 'fid')} | {r['fid_guide']:.2f}{'*' if r['guide_in_loss'] else ''} | "
                     f"{100 * r['class_accuracy']:.1f} | "
                     f"{r['time_ratio']:.3f} | {r['pair_mse']:.4f} |")
    if any(r["guide_in_loss"] for r in rows):
        lines += ["", "\\* trained with the guide network's perceptual distance, so its FID in the guide's features "
                  "is not an independent view; read the evaluator's FID."]
    lines += ["", f"Straightness (Euler, {args.straight_steps} steps, first {n_pairs} pairs' noise; per dimension) "
              f"and the coupling's transport cost {transport_cost(pairs.noise, pairs.sample):.4f}:", "",
              "| model | straightness |", "| --- | --- |"]
    lines += [f"| {s['model']} | {s['straightness']:.4f} |" for s in summary]
    lines += ["", "Against the goals (FID at 2 NFE <= 2x the quality reference, at 1 NFE <= 3x, stretch 2x; class "
              "accuracy >= 90%):", "", "| model | FID 1 NFE / ref | FID 2 NFE / ref | acc. 1 NFE % | 1 NFE goal | "
              "2 NFE goal |", "| --- | --- | --- | --- | --- | --- |"]
    for label in dict.fromkeys(r["model"] for r in rows):
        by = {r["nfe"]: r for r in rows if r["model"] == label}
        if 1 not in by or 2 not in by:
            continue
        f1, f2 = by[1]["fid"] / ref["fid"], by[2]["fid"] / ref["fid"]
        a1, a2 = by[1]["class_accuracy"], by[2]["class_accuracy"]
        g1 = "stretch" if f1 <= 2 and a1 >= 0.9 else ("met" if f1 <= 3 and a1 >= 0.9 else "missed")
        g2 = "met" if f2 <= 2 and a2 >= 0.9 else "missed"
        lines.append(f"| {label} | {f1:.2f} | {f2:.2f} | {100 * a1:.1f} | {g1} | {g2} |")
    md = write_results(name, {"machine": info, "command": cmd, "reference": ref,
                        "time_reference": {"steps": args.time_steps, "images": args.time_num, "seconds_per_image": t_ref},
                        "rows": rows, "models": summary},
                       "\n".join(lines), out=Path(args.out))
    plot(rows, ref, md.with_suffix(".png"))
    print("\n".join(lines))
    print(f"\nwrote {md} and {md.with_suffix('.png')}")


if __name__ == "__main__":
    main()
