"""Depth pruning of a trained DiT: which blocks each method keeps, and what they are worth.

    python benchmarks/prune.py --run runs/mnist --keeps 4,3 --methods importance tinyfusion oracle \\
        --recover-steps 500 --num 2000 --seeds 0,1,2 --name prune_mnist

For every number of kept blocks and every selection method (``flowdit compress prune``'s
``tinyfusion``, ``importance``, ``oracle``) the benchmark selects the blocks, then recovers
each distinct kept set once with the same masked-KD budget (``flowdit compress prune
--method index --resume`` into ``--work``, so a killed run continues and methods that agree
share one recovery). Per row: kept blocks, parameters, FID and class accuracy under the
shipped evaluator (mean +- std over ``--seeds``) after recovery and, on ``--pre-seeds``,
before it; PSNR of the recovered model's samples to the full model's from the same noise;
the forward and ``--time-steps``-step sampling time of the full model over the pruned
one's, measured in this process with the models taking turns. A second table gives the
flow-matching loss of every subset before recovery (the oracle's ranking), with the
methods' choices marked.

Finished cells (images, selections) are kept under ``benchmarks/results/<name>.cells/``;
a rerun with the same arguments reuses them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from common import RESULTS, finish, machine_info, markdown_table
from flowdit.bench.cells import Cells
from flowdit.checkpoint_io import tensors_checksum
from flowdit.cli import main as flowdit_main
from flowdit.compress import PRUNE_METHODS, PruneConfig, RecoveryConfig, keep_blocks, select_blocks
from flowdit.data import build_dataset
from flowdit.evaluate import evaluate_samples
from flowdit.inference import balanced_labels, generate, load_run_model

SELECTORS = tuple(m for m in PRUNE_METHODS if m != "index")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(4.0 / mse)).mean())


def timing(models: dict, shape, num_classes: int, batch: int, steps: int, repeats: int) -> dict:
    """Median seconds (and spread) of one guided forward of ``2 * batch`` rows and of a
    ``steps``-step Euler sampling of ``batch`` images, per model, the models taking turns."""
    x = torch.randn(2 * batch, *shape, generator=torch.Generator().manual_seed(0))
    t = torch.rand(2 * batch, generator=torch.Generator().manual_seed(1))
    y = torch.arange(2 * batch) % (num_classes + 1)
    labels = balanced_labels(num_classes, batch)
    fns = {}
    for name, m in models.items():
        def fwd(m=m):
            with torch.no_grad():
                m(x, t, y)

        def smp(m=m):
            generate(m, labels, shape, solver="euler", steps=steps, cfg_scale=1.5, seed=7, batch_size=batch)
        fns[name] = {"forward": fwd, "sample": smp}
    out = {n: {"forward": [], "sample": []} for n in models}
    for kind in ("forward", "sample"):
        reps = repeats if kind == "forward" else max(2, repeats // 4)
        for n in models:
            fns[n][kind]()
        for r in range(reps):
            for n in (list(models) if r % 2 == 0 else list(models)[::-1]):
                t0 = time.perf_counter()
                fns[n][kind]()
                out[n][kind].append(time.perf_counter() - t0)
    return {n: {k: statistics.median(v) for k, v in d.items()} | {"spread": {k: [min(v), max(v)] for k, v in d.items()}}
            for n, d in out.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--keeps", default="4,3", help="numbers of blocks to keep, comma-separated")
    p.add_argument("--methods", nargs="+", default=list(SELECTORS), choices=list(SELECTORS))
    p.add_argument("--search-steps", type=int, default=500, help="TinyFusion gate-training steps")
    p.add_argument("--recover-steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=128, help="batch of the search and the recovery")
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--pre-seeds", default="0", help="seeds evaluated before recovery ('' for none)")
    p.add_argument("--solver", default="heun")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--time-batch", type=int, default=32)
    p.add_argument("--time-steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--work", default="runs/prune", help="directory of the recovered runs")
    p.add_argument("--name", default="prune")
    p.add_argument("--fresh", action="store_true")
    args = p.parse_args(argv)
    keeps = [int(k) for k in args.keeps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    pre_seeds = [int(s) for s in args.pre_seeds.split(",") if s.strip()]
    t_start = time.perf_counter()
    load0 = machine_info().get("load_average")

    model, meta = load_run_model(args.run)
    depth = len(model.blocks)
    rec = RecoveryConfig(steps=args.recover_steps)
    for k in keeps:  # validate every setting before any work
        for m in args.methods:
            PruneConfig(method=m, keep=k, search_steps=args.search_steps, batch_size=args.batch_size,
                        recovery=rec).validate(depth)
    shape = tuple(meta["data"]["shape"])
    data = meta["config"]["data"]
    dataset_name, root = data["dataset"], data.get("root")
    train_set = build_dataset(dataset_name, root=root, split="train", image_size=data.get("image_size"),
                              channels=data.get("channels"))
    labels = balanced_labels(model.num_classes, args.num)
    setting = {"model": tensors_checksum(args.run), "solver": args.solver, "steps": args.steps, "cfg": args.cfg,
               "num": args.num, "search_steps": args.search_steps, "recover_steps": args.recover_steps,
               "batch_size": args.batch_size}
    cells = Cells(RESULTS / f"{args.name}.cells", setting, fresh=args.fresh)

    def evaluate(label: str, m, s: int) -> dict:
        rec_ = cells.get(f"{label}/seed{s}")
        if rec_ is None:
            t0 = time.perf_counter()
            gen = generate(m, labels, shape, solver=args.solver, steps=args.steps, cfg_scale=args.cfg, seed=s,
                           batch_size=250)
            secs = time.perf_counter() - t0
            metrics = evaluate_samples(gen.images, gen.labels, dataset_name, root=root, seed=s)
            rec_ = {"images": gen.images.to(torch.float16), "metrics": metrics, "seconds": secs}
            cells.put(f"{label}/seed{s}", rec_)
        print(f"{label} seed {s}: FID {rec_['metrics']['fid']:.2f}, acc "
              f"{100 * rec_['metrics']['class_accuracy']:.1f}", flush=True)
        return rec_

    def summary(recs: list[dict]) -> dict:
        out = {}
        for k in ("fid", "class_accuracy"):
            vals = [r["metrics"][k] for r in recs]
            out[k] = statistics.mean(vals) if vals else None
            out[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return out

    # 1. selections (cached), and every subset's loss before recovery
    selections, subset_tables = {}, {}
    for k in keeps:
        for m in args.methods:
            sel = cells.get(f"select/{m}/keep{k}")
            if sel is None:
                cfg = PruneConfig(method=m, keep=k, search_steps=args.search_steps, batch_size=args.batch_size,
                                  recovery=rec)
                sel = select_blocks(model, train_set, meta, cfg)
                cells.put(f"select/{m}/keep{k}", sel)
            selections[(m, k)] = sel
            print(f"keep {k}, {m}: blocks {sel['kept']} ({sel['seconds']:.0f} s)", flush=True)
        oracle = cells.get(f"subsets/keep{k}")
        if oracle is None:
            oracle = select_blocks(model, train_set, meta, PruneConfig(method="oracle", keep=k, recovery=rec))
            cells.put(f"subsets/keep{k}", oracle)
        subset_tables[k] = oracle["subsets"]

    # 2. recovery of every distinct kept set, through the CLI (resumable, shared)
    work = Path(args.work)
    recovered = {}
    for kept in dict.fromkeys(tuple(sel["kept"]) for sel in selections.values()):
        out = work / ("keep_" + "_".join(map(str, kept)))
        t0 = time.perf_counter()
        argv_prune = ["compress", "prune", "--ckpt", args.run, "--out", str(out), "--method", "index",
                      "--kept", ",".join(map(str, kept)), "--recover-steps", str(args.recover_steps),
                      "--batch-size", str(args.batch_size), "--resume"]
        if flowdit_main(argv_prune) != 0:
            raise SystemExit(f"recovery of {kept} failed")
        recovered[kept] = (out, time.perf_counter() - t0)

    # 3. quality: full model, pruned before recovery, recovered
    full = [evaluate("full", model, s) for s in seeds]
    full_images = {s: r["images"] for s, r in zip(seeds, full)}
    rows = [{"method": "full", "keep": depth, "kept": list(range(depth)), **summary(full),
             "params": sum(p.numel() for p in model.parameters())}]
    seen = {}
    for (m, k), sel in selections.items():
        kept = tuple(sel["kept"])
        tag = "_".join(map(str, kept))
        if kept not in seen:
            pre = summary([evaluate(f"pre/{tag}", keep_blocks(model, kept).eval(), s) for s in pre_seeds])
            pruned, _ = load_run_model(recovered[kept][0])
            post_recs = [evaluate(f"post/{tag}", pruned, s) for s in seeds]
            seen[kept] = {"pre": pre, "post": summary(post_recs), "params": sum(p.numel() for p in pruned.parameters()),
                          "psnr": statistics.mean(psnr(r["images"], full_images[s]) for r, s in zip(post_recs, seeds)),
                          "recovery_seconds": recovered[kept][1]}
        got = seen[kept]
        rows.append({"method": m, "keep": k, "kept": list(kept), "select_seconds": sel["seconds"],
                     "fid_pre": got["pre"]["fid"], **got["post"], "psnr_to_full": got["psnr"], "params": got["params"],
                     "recovery_seconds": got["recovery_seconds"]})

    # 4. speed: full vs each depth (every kept set of a depth costs the same)
    by_depth = {k: keep_blocks(model, next(s["kept"] for (m, kk), s in selections.items() if kk == k)).eval()
                for k in keeps}
    times = timing({"full": model, **{f"depth{k}": m for k, m in by_depth.items()}}, shape, model.num_classes,
                   args.time_batch, args.time_steps, args.repeats)
    for row in rows:
        key = "full" if row["method"] == "full" else f"depth{row['keep']}"
        row["speedup"] = {kind: times["full"][kind] / times[key][kind] for kind in ("forward", "sample")}

    fid0 = rows[0]["fid"]
    lines = []
    for r in rows:
        d = "-" if r["method"] == "full" else f"{100 * (r['fid'] - fid0) / fid0:+.1f}%"
        pre = "-" if r.get("fid_pre") is None else f"{r['fid_pre']:.2f}"
        ps = "-" if r.get("psnr_to_full") is None else f"{r['psnr_to_full']:.1f}"
        lines.append(f"| {r['method']} | {r['keep']} of {depth} | {','.join(map(str, r['kept']))} "
                     f"| {r['params'] / 1e6:.2f} | {pre} | {r['fid']:.2f} ± {r['fid_std']:.2f} | {d} "
                     f"| {100 * r['class_accuracy']:.1f} | {ps} | {r['speedup']['forward']:.2f}x "
                     f"| {r['speedup']['sample']:.2f}x |")
    table = markdown_table("| method | blocks | kept | params (M) | FID before recovery | FID after recovery "
                           "| FID vs full | class acc. % | PSNR to full (dB) | forward speed-up "
                           f"| {args.time_steps}-step sampling speed-up |", lines)
    sub_lines = []
    for k, ranked in subset_tables.items():
        marks = {}
        for (m, kk), sel in selections.items():
            if kk == k:
                marks.setdefault(tuple(sel["kept"]), []).append(m)
        for rank, (kept, loss) in enumerate(ranked, 1):
            chosen = ", ".join(marks.get(tuple(kept), []))
            if rank <= 5 or chosen:
                sub_lines.append(f"| {k} | {rank} | {','.join(map(str, kept))} | {loss:.4f} | {chosen or '-'} |")
    sub_table = markdown_table("| keep | rank | subset | loss before recovery | chosen by |", sub_lines)
    mach = machine_info()
    pre_txt = f"seed{'s' if len(pre_seeds) > 1 else ''} {args.pre_seeds}" if pre_seeds else "not evaluated"
    head = (f"Model: `{args.run}` ({depth} blocks); {args.num} samples per seed, seeds {args.seeds} "
            f"(before recovery: {pre_txt}), {args.solver} {args.steps} steps, CFG {args.cfg}, fp32. "
            f"TinyFusion: {args.search_steps} search steps; every kept set recovered by {args.recover_steps} steps "
            f"of masked KD at batch {args.batch_size}.\n"
            f"Machine: {mach.get('cpu')}, {mach.get('torch_threads')} threads, torch {torch.__version__}, "
            f"load average at start {load0}. Speed-ups: full-model time / pruned time, medians of {args.repeats} "
            f"turns ({max(2, args.repeats // 4)} for sampling), batch {args.time_batch} images "
            f"({2 * args.time_batch} rows with guidance).\n")
    payload = {"rows": rows, "times": times, "subsets": {str(k): v for k, v in subset_tables.items()},
               "selections": {f"{m}/keep{k}": s for (m, k), s in selections.items()},
               "seconds": time.perf_counter() - t_start}
    finish(args.name, "prune.py", argv, payload, head + "\n" + table + "\n\nSubsets by loss before recovery "
           "(the five best, and every method's choice):\n\n" + sub_table)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
