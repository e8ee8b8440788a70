"""How well can the block stack's residual be forecast between full calls?

Samples a few images with the uncached sampler, records the stack residual
``R_s = out - in`` (what FORA reuses and TaylorSeer forecasts) at every model call ``s``,
and measures the relative L2 error ``||R_hat_s - R_s|| / ||R_s||`` of three forecasts on
that reference trajectory, for the schedule of full calls of ``--interval``:

* reuse (FORA): ``R_hat_{s0+k} = R_{s0}``;
* first order from full calls one interval apart: ``R_{s0} + k (R_{s0} - R_{s0-N}) / N``;
* TaylorSeer right after its warmup (``order=1``, warmup calls 0 and 1): the slope of the
  two consecutive warmup calls, ``R_1 + k (R_1 - R_0)``, against reuse of ``R_1``.

It also prints the relative step-to-step change ``||R_{s+1} - R_s|| / ||R_s||`` along the
trajectory, which shows where the features move fastest.

    python benchmarks/forecast_error.py --run runs/mnist_p2 --steps 50 --cfg 1.5 --interval 4
"""

from __future__ import annotations

import argparse
import time

import torch

from common import machine_info, write_results
from flowdit.accel.base import BlockPolicyBase
from flowdit.inference import generate, load_run_model


class Recorder(BlockPolicyBase):
    """Runs every block and keeps the stack residual of every call (float32, CPU)."""

    name = "recorder"

    def __init__(self):
        super().__init__()
        self.residuals: list[torch.Tensor] = []

    def decide_and_run(self, model, tokens, c_act, ctx, st):
        out = self.run_blocks(model, tokens, c_act, ctx)
        self.residuals.append((out - tokens).float().cpu())
        return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--num", type=int, default=8, help="images (one per class in turn)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--interval", type=int, default=4)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    if args.interval < 2 or args.steps < 3 * args.interval:
        raise SystemExit("--interval must be >= 2 and --steps at least three intervals")

    t0 = time.perf_counter()
    model, meta = load_run_model(args.run)
    rec = Recorder()
    labels = torch.arange(args.num) % model.num_classes
    generate(model, labels, tuple(meta["data"]["shape"]), solver="euler", steps=args.steps, cfg_scale=args.cfg,
             shift=float(meta["config"]["flow"].get("shift", 1.0)), seed=args.seed, batch_size=args.num,
             accel=rec, amp_dtype=torch.bfloat16 if args.precision == "bf16" else None)
    R, n, N = rec.residuals, len(rec.residuals), args.interval
    ks = list(range(1, N))
    reuse = {k: [] for k in ks}
    linear = {k: [] for k in ks}
    for s0 in range(N, n - N + 1, N):
        for k in ks:
            reuse[k].append(rel(R[s0], R[s0 + k]))
            linear[k].append(rel(R[s0] + (R[s0] - R[s0 - N]) * k / N, R[s0 + k]))
    warm_paper = {k: rel(R[1] + (R[1] - R[0]) * k, R[1 + k]) for k in ks}
    warm_reuse = {k: rel(R[1], R[1 + k]) for k in ks}
    change = [rel(R[s + 1], R[s]) for s in range(n - 1)]

    def mean(v):
        return sum(v) / len(v)

    mc = meta["model_config"]
    lines = [
        f"Model: `{args.run}` (width {mc['hidden_size']}, depth {mc['depth']}, patch {mc['patch_size']}); Euler "
        f"{args.steps} steps, CFG {args.cfg:g}, {args.precision}, {args.num} images, seed {args.seed}; full calls every "
        f"{N}. Relative L2 error of the forecast stack residual against the computed one on the uncached trajectory.",
        f"Machine: {machine_info()['cpu']}; {time.perf_counter() - t0:.0f} s.",
        f"Command: `python benchmarks/forecast_error.py --run {args.run} --num {args.num} --steps {args.steps} "
        f"--cfg {args.cfg:g} --interval {N} --precision {args.precision}`", "",
        "| forecast | " + " | ".join(f"{k} call{'s' if k > 1 else ''} ahead" for k in ks) + " |",
        "| --- |" + " --- |" * len(ks),
        "| reuse (FORA), mean over the regular intervals | " + " | ".join(f"{mean(reuse[k]):.3f}" for k in ks) + " |",
        "| first order, slope from full calls one interval apart | "
        + " | ".join(f"{mean(linear[k]):.3f}" for k in ks) + " |",
        "| after warmup: reuse of call 1 | " + " | ".join(f"{warm_reuse[k]:.3f}" for k in ks) + " |",
        "| after warmup: slope of calls 0 and 1 (TaylorSeer's code) | "
        + " | ".join(f"{warm_paper[k]:.3f}" for k in ks) + " |",
        "",
        "Step-to-step change of the residual, call s to s + 1: "
        + ", ".join(f"{s}: {c:.3f}" for s, c in enumerate(change) if s < 3 or s >= n - 4 or s % 10 == 0),
    ]
    table = "\n".join(lines)
    print(table)
    name = args.name or f"forecast_error_{args.run.rstrip('/').split('/')[-1]}"
    payload = {"args": vars(args), "reuse": reuse, "linear": linear, "warmup_paper": warm_paper,
               "warmup_reuse": warm_reuse, "step_change": change}
    print(f"wrote {write_results(name, payload, table)}")


if __name__ == "__main__":
    main()
