"""Quality against training compute: the baseline and the train-faster methods side by side.

Every method trains from the same recipe (``--config``) with the same seed, data order,
batch and number of steps; only its overrides differ (``--methods``, presets below, or
``--define NAME "key=value key=value"``). Three phases, each resumable (a killed run
loses at most the step since the last checkpoint or the cell being scored):

1. **train**: ``flowdit train`` per method and seed in ``<runs>/<method>-s<seed>``,
   checkpoints every ``--every`` steps, all kept; an existing run is resumed.
2. **score**: every checkpoint's EMA weights sample ``--num`` class-balanced images (fixed
   solver, steps, guidance and noise seed), scored by ``flowdit.evaluate`` (FID on the
   evaluator's features, class accuracy); one cell per (method, seed, step).
3. **time**: each method's trainer is built in this process and runs ``--timing-steps``
   steps in turn with the others, ``--timing-repeats`` rounds, so that the time per step
   is a ratio to the baseline measured side by side (never two timed runs at once). The
   trainer's construction (REPA's encoder-feature cache, say) is timed as its setup.

The wall-clock axis of the curves is ``setup + step x median seconds per step`` from phase
3 (the training runs of phase 1 may share the machine with other work). The report gives
each method the first scored step (and the seconds) at which its FID is at or below the
baseline's final FID, and writes ``benchmarks/results/<name>.{json,md,png}``.

    python benchmarks/train_efficiency.py --config configs/mnist.yaml --methods baseline repa sra \\
        --steps 2000 --every 250 --num 2000 --seeds 0 --runs runs/eff --name train_efficiency_mnist
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, finish, machine_info, markdown_table  # noqa: E402

from flowdit.bench.cells import Cells  # noqa: E402
from flowdit.checkpoint_io import tensors_checksum  # noqa: E402
from flowdit.evaluate import evaluate_samples  # noqa: E402
from flowdit.inference import load_run_model  # noqa: E402
from flowdit.inference.generate import balanced_labels, generate  # noqa: E402

# Method presets: name -> run-config overrides on top of --config.
PRESETS: dict[str, list[str]] = {
    "baseline": [],
    "repa": ["flow.objective=repa", "repa.encoder=guide"],
    "repa-ssl": ["flow.objective=repa", "repa.encoder=runs/ssl-mnist"],  # flowdit encoder train --out runs/ssl-mnist
    "sra": ["flow.objective=sra"],
    "ddt": ["model.name=DDT-mnist"],
    "ddt-3d3": ["model.name=DDT-mnist-3d3"],
    "ddt-repa": ["model.name=DDT-mnist", "flow.objective=repa", "repa.encoder=guide"],
    "dico": ["model.name=DiCo-mnist"],
    "dico-F": ["model.name=DiCo-mnist-F"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mnist.yaml", help="the shared recipe")
    p.add_argument("--methods", nargs="+", default=["baseline", "repa", "sra"],
                   help=f"presets ({', '.join(PRESETS)}) or names given by --define; the first is the baseline")
    p.add_argument("--define", nargs=2, action="append", default=[], metavar=("NAME", "OVERRIDES"),
                   help='a method: its name and its overrides in one string, e.g. repa-ssl "flow.objective=repa '
                        'repa.encoder=runs/ssl-mnist"')
    p.add_argument("--set", nargs="*", default=[], help="overrides applied to every method (e.g. train.batch_size=64)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=250, help="checkpoint and scoring interval in steps")
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    p.add_argument("--num", type=int, default=2000, help="samples per scored checkpoint")
    p.add_argument("--solver", default="heun")
    p.add_argument("--sample-steps", type=int, default=8)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="autocast of the scoring samples (auto: bf16 where the CPU runs it natively)")
    p.add_argument("--runs", default="runs/eff", help="directory of the training runs")
    p.add_argument("--name", default="train_efficiency_mnist")
    p.add_argument("--phases", default="train,score,time", help="any of train, score, time, report (always)")
    p.add_argument("--timing-steps", type=int, default=20)
    p.add_argument("--timing-repeats", type=int, default=3)
    p.add_argument("--descending", action="store_true",
                   help="score the newest checkpoints first (a second scoring process then meets the first halfway)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    defined = {name: shlex.split(ov) for name, ov in args.define}
    methods = {}
    for m in args.methods:
        if m in defined:
            methods[m] = defined[m]
        elif m in PRESETS:
            methods[m] = PRESETS[m]
        else:
            p.error(f"--methods: {m!r} is neither a preset ({', '.join(PRESETS)}) nor given by --define")
    for flag, v in (("--steps", args.steps), ("--every", args.every), ("--num", args.num),
                    ("--timing-steps", args.timing_steps), ("--timing-repeats", args.timing_repeats)):
        if v < 1:
            p.error(f"{flag} must be positive, got {v}")
    if args.steps % args.every:
        p.error(f"--steps {args.steps} must be a multiple of --every {args.every}")
    phases = {s.strip() for s in args.phases.split(",") if s.strip()}
    if phases - {"train", "score", "time", "report"}:
        p.error(f"--phases: unknown {sorted(phases - {'train', 'score', 'time', 'report'})}")
    if not Path(args.config).is_file():
        p.error(f"--config: no file {args.config}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds: not a comma-separated list of integers: {args.seeds!r}")
    return args, methods, seeds, phases


def run_overrides(args, method: str, overrides: list[str], seed: int) -> list[str]:
    """The ``key=value`` list of one training run."""
    return [f"name={method}-s{seed}", f"out_dir={args.runs}", f"train.steps={args.steps}",
            f"train.ckpt_every={args.every}", f"train.keep_ckpts={args.steps // args.every + 1}",
            "train.sample_every=0", "sample.num_eval=100", f"train.seed={seed}", *args.set, *overrides]


def train_phase(args, methods: dict, seeds: list[int]) -> dict:
    """Train (or resume) every run; returns the seconds each call took this time."""
    secs = {}
    for seed in seeds:
        for m, ov in methods.items():
            run = Path(args.runs) / f"{m}-s{seed}"
            done = (run / "checkpoints" / f"step_{args.steps:07d}").is_dir() or _final_step(run) == args.steps
            if done:
                continue
            cmd = [sys.executable, "-m", "flowdit.cli", "train", "--config", args.config,
                   *run_overrides(args, m, ov, seed)]
            if run.exists():
                cmd.append("--resume")
            print("+", shlex.join(cmd), flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            secs[f"{m}-s{seed}"] = time.perf_counter() - t0
    return secs


def _final_step(run: Path):
    try:
        return int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    except (OSError, IndexError, ValueError):
        return None


def checkpoints(run: Path) -> dict[int, Path]:
    """``{step: checkpoint directory}`` of a run."""
    out = {}
    for d in sorted((run / "checkpoints").glob("step_*")):
        if d.is_dir() and (d / "manifest.json").is_file():
            out[int(d.name.split("_")[1])] = d
    return out


def score_phase(args, methods: dict, seeds: list[int]) -> dict:
    """Score every checkpoint; returns ``{method: {seed: {step: metrics}}}``."""
    from flowdit.utils.precision import autocast_dtype

    amp = autocast_dtype(args.precision, torch.device("cpu"))
    setting = {"solver": args.solver, "steps": args.sample_steps, "cfg": args.cfg, "num": args.num,
               "config": args.config, "set": args.set, "amp": str(amp)}
    cells = Cells(RESULTS / f"{args.name}.cells", setting)
    out: dict = {}
    for m in methods:
        for seed in seeds:
            run = Path(args.runs) / f"{m}-s{seed}"
            for step, ckpt in sorted(checkpoints(run).items(), reverse=args.descending):
                if step % args.every or step > args.steps:
                    continue
                key = f"{m}/seed{seed}/step{step}/{tensors_checksum(ckpt)}"
                rec = cells.get(key)
                if rec is None:
                    model, meta = load_run_model(ckpt)
                    shape = tuple(meta["data"]["shape"])
                    data = meta["config"]["data"]
                    labels = balanced_labels(model.num_classes, args.num)
                    t0 = time.perf_counter()
                    gen = generate(model, labels, shape, solver=args.solver, steps=args.sample_steps,
                                   cfg_scale=args.cfg, seed=0, batch_size=250, amp_dtype=amp)
                    metrics = evaluate_samples(gen.images, gen.labels, data["dataset"], root=data.get("root"), seed=0)
                    rec = {"metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                           "seconds": time.perf_counter() - t0}
                    cells.put(key, rec)
                r = rec["metrics"]
                print(f"{m} seed {seed} step {step}: FID {r['fid']:.2f}, acc {100 * r['class_accuracy']:.1f}%",
                      flush=True)
                out.setdefault(m, {}).setdefault(seed, {})[step] = r
    return out


def time_phase(args, methods: dict) -> dict:
    """Median seconds per training step and setup seconds per method, measured in turn."""
    import tempfile

    from flowdit.train.config import RunConfig
    from flowdit.train.trainer import Trainer
    from flowdit.utils.config import load_config

    trainers, setup = {}, {}
    tmp = tempfile.mkdtemp(prefix="flowdit-eff-timing-")
    for m, ov in methods.items():
        cfg = load_config(RunConfig, args.config, [f"name=time-{m}", f"out_dir={tmp}", *args.set, *ov])
        t0 = time.perf_counter()
        trainers[m] = Trainer(cfg, progress=False)
        setup[m] = time.perf_counter() - t0
        trainers[m].model.train()
        for _ in range(3):  # warm-up (allocator, first-call paths)
            trainers[m].train_step()
    per_step: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.timing_repeats):
        for m, tr in trainers.items():
            t0 = time.perf_counter()
            for _ in range(args.timing_steps):
                tr.train_step()
            per_step[m].append((time.perf_counter() - t0) / args.timing_steps)
    for tr in trainers.values():
        tr.close()
    return {m: {"setup_s": setup[m], "step_s": statistics.median(v), "step_s_all": v} for m, v in per_step.items()}


def report(args, methods: dict, seeds: list[int], scores: dict, timing: dict) -> tuple[dict, str]:
    names = list(methods)
    base = names[0]
    steps = list(range(args.every, args.steps + 1, args.every))

    def mean_fid(m, s):
        vals = [scores[m][seed][s]["fid"] for seed in seeds if s in scores.get(m, {}).get(seed, {})]
        return statistics.mean(vals) if len(vals) == len(seeds) else None

    def mean_acc(m, s):
        vals = [scores[m][seed][s]["class_accuracy"] for seed in seeds if s in scores.get(m, {}).get(seed, {})]
        return statistics.mean(vals) if len(vals) == len(seeds) else None

    target = mean_fid(base, args.steps)

    def crossing(m, level):
        """The step at which FID first reaches ``level``, interpolated linearly in log FID
        between the two scored checkpoints around it (None if never reached)."""
        import math

        prev = None
        for s in steps:
            f = mean_fid(m, s)
            if f is None or level is None:
                return None
            if f <= level:
                if prev is None:
                    return float(s)
                s0, f0 = prev
                return s0 + (s - s0) * (math.log(f0) - math.log(level)) / (math.log(f0) - math.log(f))
            prev = (s, f)
        return None
    rows, payload_rows = [], []
    shown = sorted(set(steps[1::2]) | set(steps[-2:]))
    for m in names:
        t = timing.get(m)
        ratio = None if not t or not timing.get(base) else t["step_s"] / timing[base]["step_s"]
        reach = next((s for s in steps if mean_fid(m, s) is not None and target is not None and mean_fid(m, s) <= target),
                     None)
        cross = crossing(m, target)
        secs = None if cross is None or not t else t["setup_s"] + cross * t["step_s"]
        base_secs = None if not timing.get(base) else timing[base]["setup_s"] + args.steps * timing[base]["step_s"]
        fids = [mean_fid(m, s) for s in shown]
        cells = " | ".join("-" if f is None else f"{f:.2f}" for f in fids)
        acc = mean_acc(m, args.steps)
        rows.append(
            f"| {m} | {'-' if ratio is None else f'{ratio:.2f}x'} | {'-' if not t else format(t['setup_s'], '.1f')} | {cells} "
            f"| {'-' if acc is None else f'{100 * acc:.1f}'} | {'not reached' if reach is None else reach} "
            f"| {'-' if cross is None else f'{cross:.0f} ({cross / args.steps:.2f})'} "
            f"| {'-' if secs is None or base_secs is None else f'{secs / base_secs:.2f}'} |")
        payload_rows.append({"method": m, "overrides": methods[m], "step_time_ratio": ratio, "timing": t,
                             "fid": {s: mean_fid(m, s) for s in steps}, "class_accuracy": {s: mean_acc(m, s) for s in steps},
                             "steps_to_baseline_fid": reach, "steps_to_baseline_fid_interpolated": cross,
                             "seconds_to_baseline_fid": secs})
    header = ("| method | time / step vs " + base + " | setup s | " + " | ".join(f"FID @{s}" for s in shown)
              + f" | acc % @{args.steps} | first scored step at {base}'s final FID | interpolated step (fraction) "
              "| fraction of wall-clock |")
    table = markdown_table(header, rows)
    payload = {"methods": payload_rows, "seeds": seeds, "steps": args.steps, "every": args.every, "num": args.num,
               "solver": args.solver, "sample_steps": args.sample_steps, "cfg": args.cfg, "config": args.config,
               "set": args.set, "baseline_final_fid": target,
               "scores": {m: {str(seed): {str(s): r for s, r in v.items()} for seed, v in d.items()}
                          for m, d in scores.items()}}
    return payload, table


def plot(args, payload: dict, timing: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for row in payload["methods"]:
        pts = [(int(s), f) for s, f in row["fid"].items() if f is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        axes[0].plot(xs, ys, marker="o", label=row["method"])
        t = timing.get(row["method"])
        if t:
            axes[1].plot([t["setup_s"] + x * t["step_s"] for x in xs], ys, marker="o", label=row["method"])
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training seconds (setup + step x measured s/step)")
    for ax in axes:
        ax.set_ylabel("FID (evaluator features)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{args.config}: FID of {args.num} samples ({args.solver} {args.sample_steps} steps, CFG {args.cfg})",
                 fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    args, methods, seeds, phases = parse_args(argv)
    load0 = machine_info().get("load_average")
    train_secs = train_phase(args, methods, seeds) if "train" in phases else {}
    scores = score_phase(args, methods, seeds) if ("score" in phases or "report" in phases) else {}
    timing_file = RESULTS / f"{args.name}.timing.json"
    if "time" in phases:
        timing = time_phase(args, methods)
        timing_file.write_text(json.dumps({"timing": timing, "machine": machine_info()}, indent=1))
    else:
        timing = json.loads(timing_file.read_text())["timing"] if timing_file.is_file() else {}
    payload, table = report(args, methods, seeds, scores, timing)
    payload.update({"timing": timing, "train_call_seconds": train_secs, "load_average_at_start": load0})
    if not args.no_write:
        plot(args, payload, timing, RESULTS / f"{args.name}.png")
    finish(args.name, "train_efficiency.py", argv, payload, table, write=not args.no_write)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
