"""The ``flowdit`` command line: ``train``, ``sample``, ``eval``, ``evaluator train``,
``bench accel``.

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
    accel = None
    if args.accel:  # a bad spec fails before the checkpoint is read
        from .accel import build_policy

        accel = build_policy(args.accel)
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


def cmd_evaluator_train(args: argparse.Namespace) -> int:
    import torch

    from .data import build_dataset
    from .eval.evaluator import WEIGHTS_DIR, save_classifier, train_classifier

    torch.set_num_threads(args.threads or torch.get_num_threads())
    train = build_dataset(args.dataset, root=args.data_root, split="train")
    test = build_dataset(args.dataset, root=args.data_root, split="test")
    tx, ty = train.batch(torch.arange(len(train)))
    vx, vy = test.batch(torch.arange(len(test)))
    epochs = args.epochs or (4 if args.dataset == "mnist" else 60)
    out = Path(args.out_dir) if args.out_dir else WEIGHTS_DIR
    for kind in args.kinds.split(","):
        net, record = train_classifier(kind, tx, ty, vx, vy, train.num_classes, epochs=epochs,
                                       progress=not args.no_progress)
        path = save_classifier(net, args.dataset, record, out)
        print(f"flowdit: {args.dataset} {kind}: test accuracy {record['test_accuracy']:.4f} "
              f"({record['params']} params, {record['train_seconds']} s) -> {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .evaluate import evaluate_samples
    from .train.outputs import write_json
    from .utils.images import load_npz

    src = Path(args.samples)
    meta: dict = {}
    dataset = args.dataset
    root = args.data_root
    if src.is_dir():
        npz = src / "samples.npz"
        if (src / "metrics.json").is_file():
            meta = json.loads((src / "metrics.json").read_text())
        if (src / "config.yaml").is_file() and (dataset is None or root is None):
            import yaml

            cfg = yaml.safe_load((src / "config.yaml").read_text()) or {}
            dataset = dataset or cfg.get("data", {}).get("dataset")
            root = root or cfg.get("data", {}).get("root")
    else:
        npz = src
    if dataset is None:
        raise FlowditError("--dataset is required when --samples is an .npz file (digits or mnist)")
    images, labels = load_npz(npz)
    result = evaluate_samples(images, labels, dataset, root=root, seed=args.seed)
    if args.inception_weights:
        from .evaluate import inception_fid

        result["fid_inception"] = inception_fid(images, dataset, root, args.inception_weights)
    for key in ("solver", "steps", "nfe", "cfg", "seed"):
        value = getattr(args, key, None)
        result[key] = value if value is not None else meta.get(key)
    result["samples"] = str(npz)
    out = Path(args.out) if args.out else npz.with_suffix(".eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()
             if k in ("fid", "fid_guide", "precision", "recall", "class_accuracy", "num_samples")}
    print(f"flowdit: {shown} -> {out}")
    return 0


def cmd_bench_accel(args: argparse.Namespace) -> int:
    from .bench.accel import check, run

    check(args)
    run(args)
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
    s.add_argument("--accel", help="training-free acceleration, e.g. taylorseer:interval=4,order=2 "
                   "(see docs/acceleration.md; policies: none, fora, delta_dit, taylorseer, gated_taylor, "
                   "fbcache, teacache, ras, tome, grat)")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", help="score samples: FID, precision/recall, class accuracy",
                       description="Score an .npz of samples (ADM layout) or a run directory (its samples.npz) "
                                   "with the data set's shipped evaluator network; writes a JSON of all metrics.")
    e.add_argument("--samples", required=True, help="an .npz of samples or a run directory")
    e.add_argument("--dataset", help="digits or mnist (default: the run's data set)")
    e.add_argument("--data-root", help="directory of the data set's files (mnist)")
    e.add_argument("--out", help="output JSON (default: next to the .npz, *.eval.json)")
    e.add_argument("--inception-weights", help="local Inception-v3 weights file (torch-fidelity's): adds the "
                   "standard Inception FID, computed by torch-fidelity")
    e.add_argument("--seed", type=int, help="seed the samples were drawn with (recorded)")
    e.add_argument("--solver", help="solver the samples were drawn with (recorded)")
    e.add_argument("--steps", type=int, help="solver steps (recorded)")
    e.add_argument("--nfe", type=int, help="velocity evaluations per sample (recorded)")
    e.add_argument("--cfg", type=float, help="guidance scale (recorded)")
    e.set_defaults(func=cmd_eval)

    ev = sub.add_parser("evaluator", help="train the evaluator and guide networks of a data set")
    evsub = ev.add_subparsers(dest="evaluator_command", required=True, metavar="ACTION")
    et = evsub.add_parser("train", help="train and save the evaluator and guide networks",
                          description="Reproducibly train the data set's evaluator (scores samples) and guide "
                                      "(for losses and guidance) networks and write their weights and manifest.")
    et.add_argument("--dataset", required=True, choices=["digits", "mnist"])
    et.add_argument("--data-root", help="directory of the MNIST IDX files")
    et.add_argument("--kinds", default="evaluator,guide")
    et.add_argument("--epochs", type=int, help="default: 4 for mnist, 60 for digits")
    et.add_argument("--out-dir", help="default: the package's weights directory")
    et.add_argument("--threads", type=int)
    et.add_argument("--no-progress", action="store_true")
    et.set_defaults(func=cmd_evaluator_train)

    from .bench.accel_args import add_arguments as bench_accel_arguments

    b = sub.add_parser("bench", help="side-by-side measurements")
    bsub = b.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    ba = bsub.add_parser("accel", help="training-free acceleration against the uncached sampler and fewer steps",
                         description="Run every block policy on one model, seeds and classes; write "
                                     "JSON, a Markdown table and a Pareto plot (docs/acceleration.md).")
    bench_accel_arguments(ba)
    ba.set_defaults(func=cmd_bench_accel)
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
