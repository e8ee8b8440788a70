"""Learning-rate transfer across widths: muP against the standard parametrisation (SP).

For each parametrisation, width (hidden size, grown by heads at a fixed head size) and
learning rate on a log2 grid, trains the recipe (``--config``, by default the embedded
digits with the DiT-digits shape: depth 4, patch 2, batch 128) for ``--steps`` steps with
flowdit's trainer (``model.mup_base_width`` set for muP: muP init and readout, AdamW
``lr x base / width`` on the hidden matrices) and records every step's training loss. A
cell's result is the mean loss of its last ``--tail`` steps. Every run sees the same data
order, noise and times (same seed), so the learning rates are compared on the same draws.

Reported: the table of final losses, the best learning rate per width (grid argmin, and the
vertex of a parabola through the argmin and its neighbours in log2 lr), its shift from the
narrowest to the widest width, and the *transfer regret*: the widest model's loss at the
learning rate that was best at the narrowest width, minus its best loss on the grid.

Resumable: each (parametrisation, width, learning rate) is one cell, saved when it
finishes (``flowdit.bench.cells.Cells``, in ``benchmarks/results/mup_lr_sweep.cells/``); a
rerun with the same settings measures only the missing cells.

    OMP_NUM_THREADS=1 python benchmarks/mup_lr_sweep.py --widths 64 128 256 --log2-lrs -12 -11 -10 -9 -8 \\
        --steps 300 --base-width 128

Writes ``benchmarks/results/mup_lr_sweep.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, finish, markdown_table  # noqa: E402

from flowdit.bench.cells import Cells  # noqa: E402
from flowdit.train.config import RunConfig  # noqa: E402
from flowdit.train.trainer import Trainer, TrainingDiverged  # noqa: E402
from flowdit.utils.config import load_config  # noqa: E402

PARAMS = ("sp", "mup")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits.yaml", help="the shared recipe")
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256], help="hidden sizes")
    p.add_argument("--head-dim", type=int, default=32, help="head size: num_heads = width / head_dim")
    p.add_argument("--base-width", type=int, default=128, help="muP's base width (DiT-digits' hidden size)")
    p.add_argument("--log2-lrs", type=float, nargs="+", default=[-12, -11, -10, -9, -8], help="log2 of the peak lr")
    p.add_argument("--params", nargs="+", default=list(PARAMS), choices=PARAMS)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tail", type=int, default=50, help="the final loss is the mean of the last this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], help="overrides applied to every run (e.g. optim.warmup_steps=50)")
    p.add_argument("--cells", default=str(RESULTS / "mup_lr_sweep.cells"))
    p.add_argument("--fresh", action="store_true", help="measure every cell again")
    p.add_argument("--report-only", action="store_true", help="report the finished cells, measure nothing")
    p.add_argument("--name", default="mup_lr_sweep")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    for w in args.widths:
        if w % args.head_dim:
            p.error(f"width {w} is not a multiple of --head-dim {args.head_dim}")
    if args.tail > args.steps:
        p.error("--tail exceeds --steps")
    return args


def overrides(args, param: str, width: int, log2_lr: float, out_dir: str) -> list[str]:
    """The run-config overrides of one cell."""
    o = [f"model.hidden_size={width}", f"model.num_heads={width // args.head_dim}", f"optim.lr={2.0 ** log2_lr!r}",
         f"train.steps={args.steps}", "train.precision=fp32", "train.sample_every=0", "train.ckpt_every=0",
         f"train.seed={args.seed}", f"out_dir={out_dir}", "name=cell"]
    if param == "mup":
        o.append(f"model.mup_base_width={args.base_width}")
    return o + list(args.set)


def run_cell(args, param: str, width: int, log2_lr: float) -> dict:
    """Train one cell; every step's loss (None after a divergence) and the seconds it took."""
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(RunConfig, args.config, overrides(args, param, width, log2_lr, out))
        trainer = Trainer(cfg, progress=False)
        losses, diverged = [], None
        t0 = time.perf_counter()
        try:
            for _ in range(args.steps):
                losses.append(float(trainer.train_step()["loss"]))
        except TrainingDiverged as e:
            diverged = str(e).split(";")[0]
        finally:
            trainer.close()
        seconds = time.perf_counter() - t0
        params = trainer.model.param_count()
    tail = losses[-args.tail:] if diverged is None else []
    return {"losses": losses, "diverged": diverged, "final": sum(tail) / len(tail) if tail else None,
            "seconds": seconds, "steps_done": len(losses), "params": params}


def vertex(xs: list[float], ys: list[float]) -> float | None:
    """log2 lr of the minimum: the vertex of the parabola through the grid argmin and its two
    neighbours (the argmin itself at the edge of the grid or next to a diverged cell)."""
    finite = [i for i, y in enumerate(ys) if y is not None and math.isfinite(y)]
    if not finite:
        return None
    i = min(finite, key=lambda j: ys[j])
    if i == 0 or i == len(xs) - 1 or ys[i - 1] is None or ys[i + 1] is None:
        return xs[i]
    (x0, x1, x2), (y0, y1, y2) = xs[i - 1:i + 2], ys[i - 1:i + 2]
    den = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / den
    return -b / (2 * a) if a > 0 else xs[i]


def summarise(args, results: dict) -> dict:
    """Per parametrisation: best lr per width, the shift of the optimum, the transfer regret."""
    xs = list(args.log2_lrs)
    out = {}
    for param in args.params:
        rows = {}
        for w in args.widths:
            ys = [results.get((param, w, e), {}).get("final") for e in xs]
            done = [y for y in ys if y is not None]
            best = xs[ys.index(min(done))] if done else None
            rows[w] = {"final": ys, "argmin_log2_lr": best, "vertex_log2_lr": vertex(xs, ys),
                       "best": min(done) if done else None}
        lo, hi = rows[args.widths[0]], rows[args.widths[-1]]
        regret = None
        if lo["argmin_log2_lr"] is not None and hi["best"] is not None:
            at = hi["final"][xs.index(lo["argmin_log2_lr"])]
            regret = None if at is None else at - hi["best"]
        argmins = [rows[w]["argmin_log2_lr"] for w in args.widths]
        verts = [rows[w]["vertex_log2_lr"] for w in args.widths]
        out[param] = {
            "widths": rows,
            "argmin_shift": None if None in argmins else argmins[-1] - argmins[0],
            "vertex_shift": None if None in verts else verts[-1] - verts[0],
            "transfer_regret": regret,
            "transfers": None if None in argmins else max(argmins) - min(argmins) == 0,
        }
    return out


def report(args, results: dict, summary: dict) -> str:
    xs = list(args.log2_lrs)
    head = "| param | width | " + " | ".join(f"lr 2^{e:g}" for e in xs) + " | best lr (grid) | best lr (parabola) |"
    rows = []
    for param in args.params:
        for w in args.widths:
            r = summary[param]["widths"][w]
            cells = []
            for e, y in zip(xs, r["final"]):
                cell = results.get((param, w, e))
                text = "-" if cell is None else ("diverged" if cell["diverged"] else f"{y:.4f}")
                cells.append(f"**{text}**" if r["argmin_log2_lr"] == e and y is not None else text)
            best = "-" if r["argmin_log2_lr"] is None else f"2^{r['argmin_log2_lr']:g}"
            vert = "-" if r["vertex_log2_lr"] is None else f"2^{r['vertex_log2_lr']:.2f}"
            rows.append(f"| {param} | {w} | " + " | ".join(cells) + f" | {best} | {vert} |")
    table = markdown_table(head, rows)
    lines = ["", f"Final training loss: mean of the last {args.tail} of {args.steps} steps (recipe {args.config}, "
                 f"fp32, seed {args.seed}{', ' + ' '.join(args.set) if args.set else ''}; head size {args.head_dim}; "
                 f"muP base width {args.base_width}); bold: the grid argmin; parabola: the vertex through the argmin "
                 "and its neighbours.", ""]
    w0, w1 = args.widths[0], args.widths[-1]
    sh = "| param | best lr per width | optimum shift {0} -> {1} (grid / parabola, log2) | regret at {1} with the lr best at {0} |".format(w0, w1)
    srows = []
    for param in args.params:
        s = summary[param]
        best = ", ".join("-" if s["widths"][w]["argmin_log2_lr"] is None else f"2^{s['widths'][w]['argmin_log2_lr']:g}"
                         for w in args.widths)
        shift = "-" if s["argmin_shift"] is None else f"{s['argmin_shift']:+g} / {s['vertex_shift']:+.2f}"
        regret = "-" if s["transfer_regret"] is None else f"{s['transfer_regret']:.4f}"
        srows.append(f"| {param} | {best} | {shift} | {regret} |")
    return table + "\n" + "\n".join(lines) + markdown_table(sh, srows)


def plot(args, results: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.params), figsize=(5 * len(args.params), 4), sharey=True, squeeze=False)
    for ax, param in zip(axes[0], args.params):
        for w in args.widths:
            ys = summary[param]["widths"][w]["final"]
            pts = [(e, y) for e, y in zip(args.log2_lrs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"width {w}")
        ax.set_title({"sp": "standard parametrisation", "mup": f"muP (base width {args.base_width})"}[param])
        ax.set_xlabel("log2 learning rate")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel(f"training loss (mean of last {args.tail} steps)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    recipe = Path(args.config).read_bytes()
    setting = {"recipe": hashlib.sha256(recipe).hexdigest()[:16], "steps": args.steps, "head_dim": args.head_dim,
               "base_width": args.base_width, "seed": args.seed, "set": list(args.set), "torch": str(torch.__version__),
               "threads": torch.get_num_threads()}
    cells = Cells(Path(args.cells), setting, fresh=args.fresh)
    results = {}
    for w in args.widths:
        for e in args.log2_lrs:
            for param in args.params:
                key = f"{param}-w{w}-lr{e:g}"
                row = cells.get(key)
                if row is None and not args.report_only:
                    row = run_cell(args, param, w, e)
                    cells.put(key, row)
                    final = "diverged" if row["diverged"] else f"{row['final']:.4f}"
                    print(f"{key}: {final} ({row['seconds']:.0f} s, {row['params']:,} params)", flush=True)
                if row is not None:
                    if row["diverged"] is None:  # the tail may differ from the one the cell was saved with
                        tail = row["losses"][-args.tail:]
                        row = dict(row, final=sum(tail) / len(tail))
                    results[(param, w, e)] = row
    summary = summarise(args, results)
    table = report(args, results, summary)
    payload = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("no_write",)},
        "summary": {p: {**s, "widths": {str(w): r for w, r in s["widths"].items()}} for p, s in summary.items()},
        "cells": [{"param": p, "width": w, "log2_lr": e, "final": r["final"], "diverged": r["diverged"],
                   "seconds": round(r["seconds"], 1), "params": r["params"],
                   "loss_every_10": r["losses"][::10]} for (p, w, e), r in sorted(results.items())],
        "reused_cells": len(cells.reused),
    }
    finish(args.name, "mup_lr_sweep.py", argv, payload, table, write=not args.no_write)
    if not args.no_write and results:
        plot(args, results, summary, RESULTS / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
