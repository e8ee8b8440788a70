"""The muP coordinate check of the DiT on the embedded digits (``flowdit.models.mup.coord_check``).

DiTs of widths 32 / 64 / 128 / 256 (1 / 2 / 4 / 8 heads of 32) take a few AdamW steps on one
fixed batch; the mean |activation| of each layer type is recorded before each step and
after the last. Under muP the curves are flat in the width; under the standard
parametrisation they grow. The slope of log(mean |x|) against log(width) summarises each.

    OMP_NUM_THREADS=1 python benchmarks/mup_coord_check.py --steps 4 --lr 1e-2 --seeds 0 1 2

Writes ``benchmarks/results/mup_coord_check.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, finish, markdown_table  # noqa: E402

from flowdit.data import build_dataset  # noqa: E402
from flowdit.models.mup import coord_check, coord_slopes  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--depth", type=int, default=4, help="blocks (DiT-digits: 4)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch", type=int, default=64, help="the fixed batch: the first this many training digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--name", default="mup_coord_check")
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = results["mup"]["steps"]
    shown = sorted({1, max(1, steps // 2), steps})
    fig, axes = plt.subplots(2, len(shown), figsize=(4 * len(shown), 7), sharex=True, squeeze=False)
    for r, param in enumerate(("sp", "mup")):
        res = results[param]
        for c, t in enumerate(shown):
            ax = axes[r][c]
            for kind, per_width in sorted(res["l1"].items()):
                ax.plot(res["widths"], [v[t] for v in per_width], marker="o", label=kind)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{'muP' if param == 'mup' else 'SP'}, after {t} AdamW step{'s' * (t != 1)}")
            ax.grid(alpha=0.3)
            if r == 1:
                ax.set_xlabel("width")
            if c == 0:
                ax.set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    ds = build_dataset("digits")
    x0, y = ds.batch(torch.arange(args.batch))
    kw = dict(widths=args.widths, head_dim=args.head_dim, depth=args.depth, steps=args.steps, lr=args.lr,
              seeds=args.seeds)
    results = {"sp": coord_check(x0, y, ds.num_classes, mup=False, **kw),
               "mup": coord_check(x0, y, ds.num_classes, mup=True, **kw)}
    kinds = sorted(results["mup"]["l1"])
    t = args.steps
    head = "| layer type | " + " | ".join(f"SP w={w}" for w in args.widths) + " | SP slope | " + \
        " | ".join(f"muP w={w}" for w in args.widths) + " | muP slope |"
    slopes = {p: coord_slopes(results[p], t) for p in results}
    rows = []
    for kind in kinds:
        sp = [f"{v[t]:.3g}" for v in results["sp"]["l1"][kind]]
        mu = [f"{v[t]:.3g}" for v in results["mup"]["l1"][kind]]
        rows.append(f"| {kind} | " + " | ".join(sp) + f" | {slopes['sp'][kind]:+.2f} | " + " | ".join(mu)
                    + f" | {slopes['mup'][kind]:+.2f} |")
    table = markdown_table(head, rows) + (
        f"\n\nMean |activation| after {t} AdamW steps (lr {args.lr:g}, no weight decay, no clipping) on one fixed "
        f"batch of {args.batch} digits, depth {args.depth}, head size {args.head_dim}, averaged over seeds "
        f"{args.seeds}; slope: least squares of log(mean |x|) on log(width). muP base width {args.widths[0]}.")
    payload = {"settings": {k: v for k, v in vars(args).items() if k != "no_write"}, "results": results,
               "slopes": {p: {str(s): coord_slopes(results[p], s) for s in range(args.steps + 1)} for p in results}}
    finish(args.name, "mup_coord_check.py", argv, payload, table, write=not args.no_write)
    if not args.no_write:
        plot(results, RESULTS / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
