"""Fit TeaCache's rescaling polynomial for a trained flowdit model.

TeaCache (ali-vilab/TeaCache) decides when to reuse the cached residual from the
accumulated relative L1 change of block 0's modulated input, rescaled by a polynomial
that maps that change to the change of the model output. The polynomial is specific to
the model and to the sampling setting. The authors fit it with ``np.polyfit(x, y, 4)``
on the pairs (input change, output change) of every step of uncached runs of 70
prompts; here the prompts are class labels, balanced over the classes.

    python benchmarks/teacache_calibrate.py --run runs/mnist --out benchmarks/results/teacache_coeffs_mnist.json

prints the coefficients (highest power first), the ``coeffs=`` value for a spec such as
``teacache:threshold=0.2,coeffs=...`` and the quality of the fit, and saves them as JSON
(``--save-pairs`` adds the pairs themselves). Calibrate with the solver, step count and
guidance you sample with. See ``flowdit.accel.first_block_cache.calibrate_teacache_model``.

``--thresholds 0.1,0.2,0.4`` then samples ``--sweep-num`` balanced labels with TeaCache
and the fitted polynomial at each threshold and reports the full calls per sample and the
PSNR against the uncached images of the same seed (a guide for choosing the threshold,
not a quality benchmark: ``flowdit bench accel`` is that).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from common import machine_info
from flowdit.accel.first_block_cache import calibrate_teacache_model
from flowdit.errors import ConfigError, FlowditError


def _args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run or checkpoint directory of the model")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--num", type=int, default=70, help="samples (labels balanced over the classes); 70 as the authors")
    ap.add_argument("--solver", default="euler")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=70)
    ap.add_argument("--degree", type=int, default=4, help="polynomial degree (4 in the reference)")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--save-pairs", action="store_true", help="also store every (call, x, y) pair in the JSON")
    ap.add_argument("--thresholds", default="", help="comma-separated TeaCache thresholds to try with the fit")
    ap.add_argument("--sweep-num", type=int, default=20, help="samples of the threshold sweep")
    return ap.parse_args(argv)


def sweep(model, meta, labels, coeffs, thresholds, args, device) -> list[dict]:
    """Full calls per sample and PSNR to the uncached images for each TeaCache threshold."""
    from flowdit.accel import FullCompute, TeaCache
    from flowdit.eval.pixel import psnr
    from flowdit.inference import generate

    def run(policy):
        return generate(model, labels, tuple(meta["data"]["shape"]), solver=args.solver, steps=args.steps,
                        cfg_scale=args.cfg, shift=float(meta["config"]["flow"].get("shift", 1.0)), seed=args.seed,
                        batch_size=args.batch_size, device=device, accel=policy,
                        amp_dtype=torch.bfloat16 if args.precision == "bf16" else None).images

    ref = run(FullCompute())
    rows = []
    for thr in thresholds:
        policy = TeaCache(threshold=thr, coeffs=tuple(coeffs))
        images = run(policy)
        batches = -(-len(labels) // args.batch_size)
        rows.append({"threshold": thr, "full_calls_per_sample": policy.stats.full_calls / batches,
                     "calls_per_sample": policy.stats.calls / batches,
                     "psnr_db": float(psnr(images.clamp(-1, 1), ref.clamp(-1, 1)).mean())})
    return rows


def main(argv=None) -> int:
    args = _args(argv)
    try:
        for key, value, least in (("--num", args.num, 1), ("--steps", args.steps, 2), ("--degree", args.degree, 1),
                                  ("--batch-size", args.batch_size, 1), ("--sweep-num", args.sweep_num, 1)):
            if value < least:
                raise ConfigError(f"{key} must be >= {least}, got {value}")
        try:
            thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
        except ValueError:
            raise ConfigError(f"--thresholds must be numbers separated by ',', got {args.thresholds!r}") from None
        from flowdit.inference import balanced_labels, load_run_model

        if not Path(args.run).exists():
            raise ConfigError(f"--run: {args.run} does not exist")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, meta = load_run_model(args.run)
        model.to(device)
        labels = balanced_labels(model.num_classes, args.num)
        t0 = time.perf_counter()
        res = calibrate_teacache_model(
            model, labels, tuple(meta["data"]["shape"]), solver=args.solver, steps=args.steps, cfg_scale=args.cfg,
            shift=float(meta["config"]["flow"].get("shift", 1.0)), seed=args.seed, batch_size=args.batch_size,
            device=device, amp_dtype=torch.bfloat16 if args.precision == "bf16" else None, degree=args.degree)
        seconds = time.perf_counter() - t0
        if thresholds:
            res["sweep"] = sweep(model, meta, balanced_labels(model.num_classes, args.sweep_num), res["coeffs"],
                                 thresholds, args, device)
    except FlowditError as exc:
        print(f"teacache_calibrate: error: {exc}", file=sys.stderr)
        return 2
    if not args.save_pairs:
        res.pop("data")
    res.update(run=str(args.run), seconds=round(seconds, 1), machine=machine_info(),
               command="python benchmarks/teacache_calibrate.py " + " ".join(shlex.quote(a) for a in
                                                                          (argv if argv is not None else sys.argv[1:])))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"{args.run}: {res['pairs']} pairs from {res['samples']} samples ({args.solver}, {args.steps} steps, "
          f"cfg {args.cfg}, {args.precision}) in {seconds:.1f} s")
    print("coefficients (highest power first): " + ", ".join(f"{c:.6e}" for c in res["coeffs"]))
    print(f"spec: teacache:threshold=T,coeffs={res['spec']}")
    print(f"fit: R^2 {res['r2']:.4f}, RMSE {res['rmse']:.3g}; input change {res['x_range'][0]:.4g}-"
          f"{res['x_range'][1]:.4g}, output change {res['y_range'][0]:.4g}-{res['y_range'][1]:.4g}")
    for row in res.get("sweep", []):
        print(f"threshold {row['threshold']:g}: {row['full_calls_per_sample']:g} of {row['calls_per_sample']:g} "
              f"calls in full, PSNR to uncached {row['psnr_db']:.1f} dB")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
