"""The ``flowdit`` command line: ``train``, ``sample``, ``eval``, ``evaluator train``,
``invert``, ``edit``, ``restore``, ``reflow pairs``, ``bench accel``.

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
    if args.cfg is None:
        # The run's own guidance: a student trained on guided pairs (label_dropout 0) never
        # updates its null class, and a fixed default scale would guide through it.
        args.cfg = float(meta.get("config", {}).get("sample", {}).get("cfg", 1.5))
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


def cmd_reflow_pairs(args: argparse.Namespace) -> int:
    import torch

    from .distill.pairs import model_sampler, write_pairs
    from .train.dist import barrier, cleanup, init_distributed
    from .train.run import load_run_model
    from .train.trainer import autocast_dtype

    if args.num <= 0 or args.steps <= 0:
        raise FlowditError(f"--num and --steps must be positive, got {args.num} and {args.steps}")
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


# -- invert / edit / restore ------------------------------------------------------------


def _load_inputs(path: str, model):
    """Images ``[N, C, H, W]`` in [-1, 1] and labels (or None) from a PNG or an ADM-layout .npz,
    checked against the model's input shape (a PNG of another size is resized)."""
    import numpy as np
    import torch

    from .data import to_float
    from .errors import DataError
    from .utils.images import load_npz

    src = Path(path)
    if not src.is_file():
        raise DataError(f"input file {src} does not exist")
    C, S = model.in_channels, model.config.input_size
    if src.suffix == ".npz":
        images, labels = load_npz(src)
    elif src.suffix.lower() == ".png":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(src) as im:
                im = im.convert("L" if C == 1 else "RGB")
                if im.size != (S, S):
                    im = im.resize((S, S), Image.Resampling.LANCZOS)
                arr = np.array(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{src}: not a readable PNG ({exc})") from None
        arr = arr[None, :, :, None] if arr.ndim == 2 else arr[None]
        images, labels = to_float(torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()), None
    else:
        raise DataError(f"--input must be a .png image or an .npz (ADM layout), got {src.name!r}")
    if tuple(images.shape[1:]) != (C, S, S):
        raise DataError(f"{src}: images are {tuple(images.shape[1:])} (C, H, W) but the model takes {(C, S, S)}")
    if len(images) == 0:
        raise DataError(f"{src}: holds no images")
    return images, labels


def _labels_arg(text, n: int, num_classes: int, fallback):
    """``--class`` as one class for all images or a comma list of n classes; else ``fallback``."""
    import torch

    if text is None:
        return fallback
    classes = _parse_classes(text, num_classes + 1)
    if len(classes) == 1:
        return torch.full((n,), classes[0], dtype=torch.long)
    if len(classes) != n:
        raise FlowditError(f"class list {text!r} has {len(classes)} entries for {n} images; give one or {n}")
    return torch.tensor(classes, dtype=torch.long)


def _setup(args):
    import torch

    from .train.run import load_run_model
    from .train.trainer import autocast_dtype

    if getattr(args, "steps", 1) <= 0:
        raise FlowditError(f"--steps must be positive, got {args.steps}")
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_run_model(args.ckpt, use_ema=not args.no_ema)
    model.to(device)
    shift = args.shift
    if shift is None:
        shift = float(meta.get("config", {}).get("flow", {}).get("shift", 1.0))
    return model, device, shift, autocast_dtype(args.precision, device)


def _save_images(out: Path, images, labels) -> None:
    from .utils.images import save_grid_png, save_npz

    if out.suffix == ".png":
        save_grid_png(images.clamp(-1, 1), out)
    else:
        save_npz(out, images.clamp(-1, 1), labels)


def _check_out(path: str, suffixes: tuple[str, ...], flag: str = "--out") -> Path:
    out = Path(path)
    if out.suffix not in suffixes:
        raise FlowditError(f"{flag} must end in {' or '.join(suffixes)}, got {path!r}")
    return out


def cmd_invert(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .edit.inversion import invert_images, regenerate_images
    from .eval.pixel import psnr

    out = _check_out(args.out, (".npz", ".safetensors"))
    recon_out = _check_out(args.recon, (".png", ".npz"), "--recon") if args.recon else None
    model, device, shift, amp = _setup(args)
    images, labels = _load_inputs(args.input, model)
    null = torch.full((len(images),), model.null_class, dtype=torch.long)
    labels = _labels_arg(args.classes, len(images), model.num_classes, labels if labels is not None else null)
    noise, nfe = invert_images(model, images, labels, args.solver, args.steps, shift, amp, args.batch_size, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"solver": args.solver, "steps": str(args.steps), "shift": str(shift), "input": str(args.input)}
    if out.suffix == ".npz":
        np.savez(out, noise=noise.numpy(), labels=labels.numpy(), **{k: np.array(v) for k, v in info.items()})
    else:
        from safetensors.torch import save_file

        save_file({"noise": noise.contiguous(), "labels": labels.contiguous()}, str(out), metadata=info)
    msg = f"flowdit: wrote {len(noise)} latents to {out} (solver {args.solver}, {args.steps} steps, NFE {nfe})"
    if recon_out is not None:
        recon, nfe_r = regenerate_images(model, noise, labels, args.solver, args.steps, shift, 1.0, amp,
                                         args.batch_size, device)
        _save_images(recon_out, recon, labels)
        msg += f"; regenerated to {recon_out} (NFE {nfe_r}, PSNR {psnr(recon.clamp(-1, 1), images).mean():.2f} dB)"
    print(msg)
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    import torch

    from .edit.rf_edit import rf_edit
    from .edit.rf_inversion import rf_inversion

    out = _check_out(args.out, (".png", ".npz"))
    model, device, shift, amp = _setup(args)
    images, labels = _load_inputs(args.input, model)
    n = len(images)
    null = torch.full((n,), model.null_class, dtype=torch.long)
    source = _labels_arg(args.source, n, model.num_classes, labels if labels is not None else null)
    target = _labels_arg(args.target, n, model.num_classes, None)
    if args.method == "rf-edit":
        blocks = None
        if args.blocks:
            try:
                blocks = [int(b) for b in args.blocks.split(",")]
            except ValueError:
                raise FlowditError(f"--blocks must be comma-separated block indices, got {args.blocks!r}") from None
        res = rf_edit(model, images, source, target, args.inject, args.solver, args.steps, shift, blocks,
                      args.cfg, amp, args.batch_size, device)
        detail = f"inject {args.inject}"
    else:
        try:
            eta_steps = tuple(int(v) for v in args.eta_steps.split(","))
            assert len(eta_steps) == 2
        except (ValueError, AssertionError):
            raise FlowditError(f"--eta-steps must be 'start,stop', got {args.eta_steps!r}") from None
        res = rf_inversion(model, images, source, target, args.gamma, args.eta, eta_steps, args.solver, args.steps,
                           shift, args.cfg, args.seed, None, amp, args.batch_size, device)
        detail = f"gamma {args.gamma}, eta {args.eta} on steps {args.eta_steps}"
    _save_images(out, res.images, target)
    print(f"flowdit: wrote {n} edited images to {out} ({args.method}, {detail}, NFE {res.nfe_invert} + {res.nfe_edit})")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    import time

    import torch

    from .edit.flowchef import restore_images
    from .edit.operators import Inpaint, build_operator, measure
    from .eval.pixel import psnr, ssim
    from .sampling.generate import indexed_noise

    out = _check_out(args.out, (".png", ".npz"))
    degraded_out = _check_out(args.degraded, (".png", ".npz"), "--degraded") if args.degraded else None
    model, device, shift, amp = _setup(args)
    images, labels = _load_inputs(args.input, model)
    n, shape = len(images), tuple(images.shape[1:])
    op = build_operator(args.task, shape, n, box=args.box, p=args.drop, seed=args.seed)
    y = measure(op, images, args.noise_std, seed=args.seed)
    cond = _labels_arg(args.classes, n, model.num_classes, None)
    noise = indexed_noise(range(n), shape, args.seed)
    t0 = time.perf_counter()
    restored, nfe = restore_images(model, y, op, noise, cond, args.method, args.steps, shift, args.step_size, amp,
                                   args.batch_size, device)
    secs = time.perf_counter() - t0
    restored = restored.clamp(-1, 1)
    _save_images(out, restored, labels)
    if degraded_out is not None:
        # What a viewer should see of y: missing pixels black, low-resolution blown back up.
        view = torch.where(op.mask.bool().expand_as(y), y, -1.0) if isinstance(op, Inpaint) else (
            op.pinv(y) if op.pinv is not None else y)
        _save_images(degraded_out, view.clamp(-1, 1), labels)
    print(f"flowdit: wrote {n} restored images to {out} ({args.task}, {args.method}, NFE {nfe}, "
          f"{secs / n:.4f} s/image): PSNR {psnr(restored, images).mean():.2f} dB, SSIM {ssim(restored, images).mean():.3f}")
    return 0


def _edit_common(p: argparse.ArgumentParser, solver: str | None = "rf2", steps: int = 10) -> None:
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    p.add_argument("--input", required=True, help="a .png image or an .npz (ADM layout: arr_0 uint8 [N,H,W,C], "
                                                  "arr_1 labels)")
    if solver is not None:
        p.add_argument("--solver", default=solver, help="euler, rf2 (RF-Solver-2), fireflow, midpoint, heun, rf3")
    p.add_argument("--steps", type=int, default=steps, help="solver steps")
    p.add_argument("--shift", type=float, help="time shift of the grid (default: the run's flow.shift)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights")


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
    # -n as well: under torchrun, "--num" is refused as an abbreviation of its --numa-binding.
    s.add_argument("-n", "--num", type=int, default=100, help="number of samples (-n under torchrun)")
    s.add_argument("--classes", help="comma-separated class indices (default: all classes, balanced)")
    s.add_argument("--solver", default="heun", help="euler, heun, midpoint, rf2, rf3, fireflow, renoise (2-RF++ few-step) or dopri5")
    s.add_argument("--steps", type=int, default=16, help="solver steps (ignored by dopri5)")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale (1 = none; default: the run's sample.cfg)")
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

    rf = sub.add_parser("reflow", help="reflow: coupling data from a trained model")
    rfsub = rf.add_subparsers(dest="reflow_command", required=True, metavar="ACTION")
    rp = rfsub.add_parser("pairs", help="generate (noise, sample, label) pairs from a run",
                          description="Integrate a run's ODE from seeded noise and write the pairs as verified "
                                      "shards with a manifest. Deterministic per seed; run it again to resume; "
                                      "under torchrun each process writes its own shards.")
    rp.add_argument("--ckpt", required=True, help="run directory or checkpoint directory of the teacher")
    rp.add_argument("-n", "--num", type=int, required=True, help="number of pairs (-n under torchrun)")
    rp.add_argument("--out", required=True, help="output directory")
    rp.add_argument("--solver", default="rf2")
    rp.add_argument("--steps", type=int, default=8)
    rp.add_argument("--cfg", type=float, default=1.5, help="guidance folded into the pairs (1 = none)")
    rp.add_argument("--seed", type=int, default=0)
    rp.add_argument("--shard-size", type=int, default=5000)
    rp.add_argument("--batch-size", type=int, default=500)
    rp.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    rp.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    rp.add_argument("--no-progress", action="store_true")
    rp.set_defaults(func=cmd_reflow_pairs)

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

    iv = sub.add_parser("invert", help="invert images to their latent noise (t = 0 -> 1)",
                        description="Integrate the flow ODE from the images (t = 0) to noise (t = 1), unguided, "
                                    "under each image's class (the .npz labels, --class, or the null class).")
    _edit_common(iv)
    iv.add_argument("--class", dest="classes", help="class for all images, or a comma list of one per image")
    iv.add_argument("--out", required=True, help="output .npz (noise, labels) or .safetensors")
    iv.add_argument("--recon", help="also regenerate from the latents to this .png grid or .npz")
    iv.set_defaults(func=cmd_invert)

    ed = sub.add_parser("edit", help="edit images to another class (RF-Edit or RF-Inversion)",
                        description="Invert under the source class and regenerate under the target class, "
                                    "keeping the source's style: RF-Edit injects the attention values recorded "
                                    "during inversion for the first --inject steps; RF-Inversion uses the "
                                    "controlled forward / reverse ODEs (--gamma, --eta).")
    _edit_common(ed)
    ed.add_argument("--method", choices=["rf-edit", "rf-inversion"], default="rf-edit")
    ed.add_argument("--target", required=True, help="target class for all images, or a comma list")
    ed.add_argument("--source", help="source class(es) (default: the .npz labels, else the null class)")
    ed.add_argument("--inject", type=int, default=2, help="RF-Edit: steps that inject the recorded values")
    ed.add_argument("--blocks", help="RF-Edit: comma-separated blocks (default: the second half)")
    ed.add_argument("--gamma", type=float, default=0.5, help="RF-Inversion: forward controller strength")
    ed.add_argument("--eta", type=float, default=0.9, help="RF-Inversion: reverse controller strength")
    ed.add_argument("--eta-steps", default="0,3", help="RF-Inversion: 'start,stop' regeneration steps under eta")
    ed.add_argument("--cfg", type=float, default=1.0, help="guidance scale of the regeneration")
    ed.add_argument("--out", required=True, help="output .png grid or .npz")
    ed.set_defaults(func=cmd_edit)

    rs = sub.add_parser("restore", help="degrade images with a known operator and restore them (FlowChef)",
                        description="Simulate y = A x (+ noise) on the input images and solve for x by steered "
                                    "sampling (Euler steps): FlowChef (gradient-free, 1 NFE per step), the replacement "
                                    "baseline, or unguided sampling; prints PSNR / SSIM against the inputs.")
    _edit_common(rs, solver=None, steps=20)
    rs.add_argument("--task", required=True, choices=["inpaint", "inpaint_random", "sr2", "sr4", "deblur"])
    rs.add_argument("--method", choices=["flowchef", "baseline", "unguided"], default="flowchef")
    rs.add_argument("--step-size", type=float, default=1.0, help="FlowChef step, in units of 1 / ||A||^2")
    rs.add_argument("--noise-std", type=float, default=0.0, help="measurement noise std (images in [-1, 1])")
    rs.add_argument("--box", type=float, default=0.5, help="inpaint: side of the missing box, fraction of H")
    rs.add_argument("--drop", type=float, default=0.7, help="inpaint_random: fraction of missing pixels")
    rs.add_argument("--class", dest="classes", help="condition on this class (default: unconditional)")
    rs.add_argument("--degraded", help="also write the measurement (viewable) to this .png or .npz")
    rs.add_argument("--out", required=True, help="output .png grid or .npz")
    rs.set_defaults(func=cmd_restore)

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
