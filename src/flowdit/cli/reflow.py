"""``flowdit reflow pairs``: coupling data (noise, sample, label) from a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    _check_solver,
    _check_writable,
    _non_negative_float,
    _positive_int,
    _seed,
    _solvers,
    command,
)


def cmd_reflow_pairs(args: argparse.Namespace) -> int:
    import torch

    from ..distill.pairs import model_sampler, write_pairs
    from ..train.dist import barrier, cleanup, init_distributed
    from ..inference import load_run_model
    from ..utils.precision import autocast_dtype

    _check_solver(args.solver, adaptive=False)
    _check_writable(args.out, "--out")
    dist = init_distributed(args.device)
    model, meta = load_run_model(args.ckpt)
    model.to(dist.device)
    shape = tuple(meta["data"]["shape"])
    amp_dtype = autocast_dtype(args.precision, dist.device)
    fn = model_sampler(model, solver=args.solver, steps=args.steps, cfg_scale=args.cfg, amp_dtype=amp_dtype,
                       device=dist.device)
    settings = {"teacher": str(Path(args.ckpt).resolve()), "solver": args.solver, "steps": args.steps,
                "cfg": args.cfg, "precision": "bf16" if amp_dtype else "fp32"}
    torch.manual_seed(args.seed)
    write_pairs(args.out, args.num, shape, fn, num_classes=model.num_classes, seed=args.seed,
                shard_size=args.shard_size, settings=settings, rank=dist.rank, world_size=dist.world_size,
                batch_size=args.batch_size, progress=not args.no_progress and dist.is_main)
    barrier(dist)
    if dist.is_main:  # the last rank to finish may not be rank 0: close the manifest once all are done
        write_pairs(args.out, args.num, shape, fn, num_classes=model.num_classes, seed=args.seed,
                    shard_size=args.shard_size, settings=settings, progress=False)
        print(f"flowdit: wrote {args.num} pairs to {args.out} (solver {args.solver}, {args.steps} steps, "
              f"cfg {args.cfg})")
    cleanup(dist)
    return 0


def add_parsers(sub) -> None:
    """Register this module's commands on the ``flowdit`` subparsers ``sub``."""
    rf = command(sub, "reflow", help="reflow: coupling data from a trained model")
    rfsub = rf.add_subparsers(dest="reflow_command", required=True, metavar="ACTION")
    rp = command(rfsub, "pairs", help="generate (noise, sample, label) pairs from a run",
                 description="Integrate a run's ODE from seeded noise and write the pairs as verified "
                             "shards with a manifest. Deterministic per seed; run it again to resume; "
                             "under torchrun each process writes its own shards.")
    rp.add_argument("--ckpt", required=True, help="run directory or checkpoint directory of the teacher")
    rp.add_argument("-n", "--num", type=_positive_int, required=True, help="number of pairs (-n under torchrun)")
    rp.add_argument("--out", required=True, help="output directory")
    rp.add_argument("--solver", default="rf2", help="fixed-step solver: " + ", ".join(_solvers(adaptive=False)))
    rp.add_argument("--steps", type=_positive_int, default=8, help="solver steps")
    rp.add_argument("--cfg", type=_non_negative_float, default=1.5, help="guidance folded into the pairs (1 = none)")
    rp.add_argument("--seed", type=_seed, default=0, help="seed of the noise")
    rp.add_argument("--shard-size", type=_positive_int, default=5000, help="pairs per shard file")
    rp.add_argument("--batch-size", type=_positive_int, default=500, help="pairs per model call")
    rp.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 autocast where the hardware runs it natively")
    rp.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    rp.add_argument("--no-progress", action="store_true", help="no progress bar")
    rp.set_defaults(func=cmd_reflow_pairs)
