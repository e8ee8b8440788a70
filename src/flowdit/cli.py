"""The ``flowdit`` command line: ``flowdit train``, ``flowdit sample``.

Every command takes ``--help``. Errors in arguments, configs, data or checkpoints are
printed as one line naming the problem (``flowdit: error: ...``), exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import FlowditError


def _parse_classes(text: str | None, num_classes: int) -> list[int] | None:
    if text is None:
        return None
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise FlowditError(f"--classes must be comma-separated integers, got {text!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise FlowditError(f"--classes {text!r}: each class must be in 0..{num_classes - 1}")
    return classes


def _parse_interval(text: str | None):
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise FlowditError(f"--guidance-interval must be 'lo,hi' with 0 <= lo < hi <= 1, got {text!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise FlowditError(f"--guidance-interval must satisfy 0 <= lo < hi <= 1, got {text!r}")
    return lo, hi


def cmd_train(args: argparse.Namespace) -> int:
    from .train.config import RunConfig
    from .train.outputs import write_run_outputs
    from .train.trainer import Trainer
    from .utils.config import load_config

    cfg = load_config(RunConfig, args.config, args.overrides)
    trainer = Trainer(cfg, resume=args.resume, device=args.device, progress=not args.no_progress)
    last = trainer.fit()
    if trainer.dist.is_main and not args.no_outputs:
        metrics = write_run_outputs(
            trainer.run_dir, trainer.ema, cfg, amp_dtype=trainer.amp_dtype, device=trainer.device,
            extra={"final_loss": last.get("loss"), "train_steps": trainer.step,
                   "params": trainer.model.param_count()},
            progress=not args.no_progress,
        )
        acc = metrics.get("class_accuracy")
        print(f"flowdit: wrote {trainer.run_dir}/samples.png, samples.npz, metrics.json"
              + (f" (class accuracy {acc:.3f})" if acc is not None else ""))
    from .train.dist import cleanup

    cleanup(trainer.dist)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from .sampling.generate import generate
    from .train.outputs import balanced_labels
    from .train.run import load_run_model
    from .train.trainer import autocast_dtype
    from .utils.images import save_grid_png, save_npz

    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise FlowditError(f"--out must end in .png (a grid) or .npz (ADM layout), got {args.out!r}")
    if args.num <= 0:
        raise FlowditError(f"--num must be positive, got {args.num}")
    if args.steps <= 0:
        raise FlowditError(f"--steps must be positive, got {args.steps}")
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
    gen = generate(model, labels, shape, solver=args.solver, steps=args.steps, cfg_scale=args.cfg,
                   guidance_interval=_parse_interval(args.guidance_interval), shift=shift, seed=args.seed,
                   batch_size=args.batch_size, amp_dtype=autocast_dtype(args.precision, device),
                   device=device, progress=not args.no_progress, rtol=args.tol, atol=args.tol)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        nrow = args.num // len(classes) if classes and args.num % len(classes) == 0 else None
        save_grid_png(gen.images, out, nrow=nrow)
    else:
        save_npz(out, gen.images, gen.labels)
    print(f"flowdit: wrote {len(labels)} samples to {out} (solver {args.solver}, NFE {gen.nfe}, cfg {args.cfg})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowdit", description="Rectified-flow diffusion transformers.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a class-conditional DiT",
                       description="Train a DiT with the rectified-flow objective. Settings come from a YAML "
                                   "recipe and key=value overrides (e.g. train.steps=500 optim.lr=3e-4).")
    t.add_argument("--config", help="YAML recipe (configs/digits.yaml); omitted: the built-in defaults")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="override one config key")
    t.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    t.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--no-outputs", action="store_true", help="skip the final samples and metrics.json")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="sample images from a trained run",
                       description="Sample from a run's EMA weights to a PNG grid or an .npz (ADM layout: "
                                   "arr_0 uint8 [N,H,W,C], arr_1 int64 labels).")
    s.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    s.add_argument("--num", type=int, default=100, help="number of samples")
    s.add_argument("--classes", help="comma-separated class indices (default: all classes, balanced)")
    s.add_argument("--solver", default="heun", help="euler, heun, midpoint, rf2, rf3 or dopri5")
    s.add_argument("--steps", type=int, default=16, help="solver steps (ignored by dopri5)")
    s.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale (1 = none)")
    s.add_argument("--guidance-interval", help="apply guidance only for t in [lo,hi], e.g. 0.1,0.9")
    s.add_argument("--shift", type=float, help="time shift of the schedule (default: the run's flow.shift)")
    s.add_argument("--tol", type=float, default=1e-4, help="rtol = atol of adaptive solvers")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--no-ema", action="store_true", help="use the raw training weights")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--out", required=True, help="output .png grid or .npz")
    s.set_defaults(func=cmd_sample)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FlowditError as exc:
        print(f"flowdit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowdit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
