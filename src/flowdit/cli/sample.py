"""``flowdit sample``: sample a trained run to a PNG grid or an .npz."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError, FlowditError
from .common import (
    _check_solver,
    _check_writable,
    _device,
    _non_negative_float,
    _parse_classes,
    _parse_interval,
    _positive_float,
    _positive_int,
    _seed,
    _solvers,
    command,
)


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from ..inference import generate
    from ..inference import balanced_labels
    from ..inference import load_run_model
    from ..utils.precision import autocast_dtype
    from ..utils.images import save_grid_png, save_npz

    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise FlowditError(f"--out must end in .png (a grid) or .npz (ADM layout), got {args.out!r}")
    _check_solver(args.solver)
    interval = _parse_interval(args.guidance_interval)
    _check_writable(out, "--out")
    device = _device(args)
    accel = None
    if args.accel:  # a bad spec fails before the checkpoint is read
        from ..accel import build_policy

        try:
            accel = build_policy(args.accel)
        except ConfigError as e:
            raise ConfigError(f"--accel {args.accel!r}: {e}") from None
    torch.manual_seed(args.seed)
    model, meta = load_run_model(args.ckpt, use_ema=not args.no_ema)
    model.to(device)
    data = meta.get("data", {})
    shape = tuple(data.get("shape") or (model.in_channels, model.config.input_size, model.config.input_size))
    K = model.num_classes
    classes = _parse_classes(args.classes, K)
    if classes is None:
        labels = balanced_labels(K, args.num)
    else:
        labels = torch.tensor(classes).repeat_interleave(-(-args.num // len(classes)))[: args.num]
    shift = args.shift
    if shift is None:
        shift = float(meta.get("config", {}).get("flow", {}).get("shift", 1.0))
    if args.cfg is None:
        # The run's own guidance: a student trained on guided pairs (label_dropout 0) never
        # updates its null class, and a fixed default scale would guide through it.
        args.cfg = float(meta.get("config", {}).get("sample", {}).get("cfg", 1.5))
    gen = generate(model, labels, shape, solver=args.solver, steps=args.steps, cfg_scale=args.cfg,
                   guidance_interval=interval, shift=shift, seed=args.seed,
                   batch_size=args.batch_size, amp_dtype=autocast_dtype(args.precision, device),
                   device=device, progress=not args.no_progress, rtol=args.tol, atol=args.tol, accel=accel)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        nrow = args.num // len(classes) if classes and args.num % len(classes) == 0 else None
        save_grid_png(gen.images, out, nrow=nrow)
    else:
        save_npz(out, gen.images, gen.labels)
    note = ""
    if accel is not None:
        st = accel.stats
        note = (f", accel {accel!r}: {st.full_calls}/{st.calls} model calls in full, "
                f"{st.block_evals / max(st.calls, 1):.2f} of the block stack per call")
    print(f"flowdit: wrote {len(labels)} samples to {out} (solver {args.solver}, NFE {gen.nfe}, cfg {args.cfg}{note})")
    return 0


def add_parsers(sub) -> None:
    """Register this module's commands on the ``flowdit`` subparsers ``sub``."""
    from ..accel.registry import POLICIES

    s = command(sub, "sample", help="sample images from a trained run",
                description="Sample from a run's EMA weights to a PNG grid or an .npz (ADM layout: "
                            "arr_0 uint8 [N,H,W,C], arr_1 int64 labels).")
    s.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    # -n as well: under torchrun, "--num" is refused as an abbreviation of its --numa-binding.
    s.add_argument("-n", "--num", type=_positive_int, default=100, help="number of samples (-n under torchrun)")
    s.add_argument("--classes", help="comma-separated class indices (default: all classes, balanced)")
    s.add_argument("--solver", default="heun", help="fixed-step: " + ", ".join(_solvers(adaptive=False))
                   + "; adaptive: " + ", ".join(_solvers()[len(_solvers(adaptive=False)):]))
    s.add_argument("--steps", type=_positive_int, default=16, help="solver steps (ignored by adaptive solvers)")
    s.add_argument("--cfg", type=_non_negative_float,
                   help="classifier-free guidance scale (1 = none; default: the run's sample.cfg)")
    s.add_argument("--guidance-interval", help="apply guidance only for t in [lo,hi], e.g. 0.1,0.9")
    s.add_argument("--shift", type=_positive_float, help="time shift of the schedule (default: the run's flow.shift)")
    s.add_argument("--tol", type=_positive_float, default=1e-4, help="rtol = atol of adaptive solvers")
    s.add_argument("--seed", type=_seed, default=0, help="seed of the noise (sample i always gets the same noise)")
    s.add_argument("--batch-size", type=_positive_int, default=256, help="samples per model call")
    s.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the hardware runs it natively")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--no-ema", action="store_true", help="use the raw training weights")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--out", required=True, help="output .png grid or .npz")
    s.add_argument("--accel", help="training-free acceleration, e.g. taylorseer:interval=4,order=2 "
                   "(docs/acceleration.md; policies: " + ", ".join(POLICIES)
                   + "; any cache gate with any reuse: cache:gate=NAME,reuse=NAME,...)")
    s.set_defaults(func=cmd_sample)
