"""``flowdit invert``, ``edit``, ``restore``: inversion, editing and restoration of input images."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError, FlowditError
from .common import (
    _check_solver,
    _check_writable,
    _device,
    _non_negative_float,
    _non_negative_int,
    _parse_classes,
    _positive_float,
    _positive_int,
    _seed,
    _solvers,
    command,
)


def _load_inputs(path: str, model):
    """Images ``[N, C, H, W]`` in [-1, 1] and labels (or None) from a PNG or an ADM-layout .npz,
    checked against the model's input shape (a PNG of another size is resized)."""
    S = model.config.input_size
    return _read_images(path, model.in_channels, S, S, "the model takes")


def _read_images(path: str, channels: int, height: int, width: int, what: str):
    """Images ``[N, channels, height, width]`` in [-1, 1] and labels (or None) from a PNG
    (resized when of another size) or an ADM-layout .npz (which must be of that shape)."""
    import numpy as np
    import torch

    from ..data import to_float
    from ..errors import DataError
    from ..utils.images import load_npz

    src = Path(path)
    if not src.is_file():
        raise DataError(f"input file {src} does not exist")
    if src.suffix == ".npz":
        images, labels = load_npz(src)
    elif src.suffix.lower() == ".png":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(src) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                if im.size != (width, height):
                    im = im.resize((width, height), Image.Resampling.LANCZOS)
                arr = np.array(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{src}: not a readable PNG ({exc})") from None
        arr = arr[None, :, :, None] if arr.ndim == 2 else arr[None]
        images, labels = to_float(torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()), None
    else:
        raise DataError(f"--input must be a .png image or an .npz (ADM layout), got {src.name!r}")
    if tuple(images.shape[1:]) != (channels, height, width):
        raise DataError(f"{src}: images are {tuple(images.shape[1:])} (C, H, W) but {what} "
                        f"{(channels, height, width)}")
    if len(images) == 0:
        raise DataError(f"{src}: holds no images")
    return images, labels


def _labels_arg(text, n: int, num_classes: int, fallback, flag: str = "--class", allow_null: bool = True):
    """A class flag as one class for all images or a comma list of n classes; else
    ``fallback``. ``allow_null``: the null class ``num_classes`` (unconditional) is valid."""
    import torch

    if text is None:
        return fallback
    classes = _parse_classes(text, num_classes, flag, null_class=num_classes if allow_null else None)
    if len(classes) == 1:
        return torch.full((n,), classes[0], dtype=torch.long)
    if len(classes) != n:
        raise ConfigError(f"{flag} {text!r} has {len(classes)} entries for {n} images; give one or {n}")
    return torch.tensor(classes, dtype=torch.long)


def _setup(args, outputs: tuple = ()):
    """Check the solver, the output locations ``(path, flag)`` and the device, then load
    the model: ``(model, device, shift, autocast dtype)``."""
    import torch

    from ..inference import load_run_model
    from ..utils.precision import autocast_dtype

    if getattr(args, "solver", None) is not None:
        _check_solver(args.solver, adaptive=False)
    for path, flag in outputs:
        if path is not None:
            _check_writable(path, flag)
    device = _device(args)
    torch.manual_seed(args.seed)
    model, meta = load_run_model(args.ckpt, use_ema=not args.no_ema)
    model.to(device)
    shift = args.shift
    if shift is None:
        shift = float(meta.get("config", {}).get("flow", {}).get("shift", 1.0))
    return model, device, shift, autocast_dtype(args.precision, device)


def _save_images(out: Path, images, labels) -> None:
    from ..utils.images import save_grid_png, save_npz

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

    from ..edit.inversion import invert_images, regenerate_images
    from ..eval.pixel import psnr

    out = _check_out(args.out, (".npz", ".safetensors"))
    recon_out = _check_out(args.recon, (".png", ".npz"), "--recon") if args.recon else None
    model, device, shift, amp = _setup(args, ((out, "--out"), (recon_out, "--recon")))
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

    from ..edit.rf_edit import rf_edit
    from ..edit.rf_inversion import rf_inversion

    out = _check_out(args.out, (".png", ".npz"))
    if args.method == "rf-inversion":
        eta_steps = _eta_steps(args.eta_steps)
    policy = None
    if args.accel:  # a bad spec fails before the checkpoint is read
        if args.method != "rf-edit":
            raise FlowditError("--accel applies to --method rf-edit only")
        from ..accel import build_policy

        try:
            policy = build_policy(args.accel)
        except FlowditError as e:
            raise FlowditError(f"--accel {args.accel!r}: {e}") from None
    if (args.target is None) == (args.target_prompt is None):
        raise ConfigError("give --target (a class) or --target-prompt (a text-to-image run), one of the two")
    if args.target_prompt is not None:
        if args.source is not None:
            raise ConfigError("--source is a class; with --target-prompt give --source-prompt")
        return _edit_text(args, out, policy, eta_steps if args.method == "rf-inversion" else None)
    if args.source_prompt is not None:
        raise ConfigError("--source-prompt needs --target-prompt")
    model, device, shift, amp = _setup(args, ((out, "--out"),))
    images, labels = _load_inputs(args.input, model)
    n = len(images)
    null = torch.full((n,), model.null_class, dtype=torch.long)
    source = _labels_arg(args.source, n, model.num_classes, labels if labels is not None else null, "--source")
    # The target is a class to edit into: the null class is no target.
    target = _labels_arg(args.target, n, model.num_classes, None, "--target", allow_null=False)
    if args.method == "rf-edit":
        blocks = None
        if args.blocks:
            try:
                blocks = [int(b) for b in args.blocks.split(",")]
            except ValueError:
                raise FlowditError(f"--blocks must be comma-separated block indices, got {args.blocks!r}") from None
        res = rf_edit(model, images, source, target, args.inject, args.solver, args.steps, shift, blocks,
                      args.cfg, amp, args.batch_size, device, policy=policy)
        detail = f"inject {args.inject}" + ("" if policy is None else f", accel {policy!r}")
    else:
        res = rf_inversion(model, images, source, target, args.gamma, args.eta, eta_steps, args.solver, args.steps,
                           shift, args.cfg, args.seed, None, amp, args.batch_size, device)
        detail = f"gamma {args.gamma}, eta {args.eta} on steps {args.eta_steps}"
    _save_images(out, res.images, target)
    print(f"flowdit: wrote {n} edited images to {out} ({args.method}, {detail}, NFE {res.nfe_invert} + {res.nfe_edit})")
    return 0


def _edit_text(args, out: Path, policy, eta_steps) -> int:
    """``flowdit edit`` of a text-to-image run: invert under ``--source-prompt`` (default the
    empty prompt), regenerate under ``--target-prompt``; a latent run encodes the input
    through its autoencoder first and decodes the edit."""
    import torch

    from ..edit.rf_edit import rf_edit
    from ..edit.rf_inversion import rf_inversion
    from ..inference.text import encode_prompts, load_text_run
    from ..utils.precision import autocast_dtype

    _check_solver(args.solver, adaptive=False)
    _check_writable(out, "--out")
    device = _device(args)
    torch.manual_seed(args.seed)
    try:
        run = load_text_run(args.ckpt, use_ema=not args.no_ema)
    except ConfigError as e:
        raise ConfigError(f"--ckpt {args.ckpt}: {e} (--target-prompt given)") from None
    _, h, w = run.shape
    factor = run.space.factor if run.space is not None else 1
    size = (h * factor, w * factor)
    images, _ = _read_images(args.input, 3, size[0], size[1], "the run generates")
    n = len(images)
    x = run.space.encode(images) if run.space is not None else images
    source = encode_prompts(run.encoder, [args.source_prompt or ""] * n)
    target = encode_prompts(run.encoder, [args.target_prompt] * n)
    negative = encode_prompts(run.encoder, [""] * n)
    shift = run.shift if args.shift is None else args.shift
    amp = autocast_dtype(args.precision, device)
    run.model.to(device)
    if args.method == "rf-edit":
        blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else None
        res = rf_edit(run.model, x, source, target, args.inject, args.solver, args.steps, shift, blocks, args.cfg,
                      amp, args.batch_size, device, policy=policy, negative=negative)
        detail = f"inject {args.inject}" + ("" if policy is None else f", accel {policy!r}")
    else:
        res = rf_inversion(run.model, x, source, target, args.gamma, args.eta, eta_steps, args.solver, args.steps,
                           shift, args.cfg, args.seed, None, amp, args.batch_size, device, negative=negative)
        detail = f"gamma {args.gamma}, eta {args.eta} on steps {args.eta_steps}"
    edited = run.space.decode(res.images) if run.space is not None else res.images
    _save_images(out, edited.float(), None)
    print(f"flowdit: wrote {n} edited images to {out} ({args.method}, {detail}, NFE {res.nfe_invert} + "
          f"{res.nfe_edit}): {args.source_prompt or '(empty prompt)'!r} -> {args.target_prompt!r}")
    return 0


def _eta_steps(text: str) -> tuple[int, int]:
    try:
        start, stop = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--eta-steps must be 'start,stop' (two integers), got {text!r}") from None
    if not 0 <= start <= stop:
        raise ConfigError(f"--eta-steps must satisfy 0 <= start <= stop, got {text!r}")
    return start, stop


def cmd_restore(args: argparse.Namespace) -> int:
    import time

    import torch

    from ..edit.flowchef import restore_images
    from ..edit.operators import Inpaint, build_operator, measure
    from ..eval.pixel import psnr, ssim
    from ..inference import indexed_noise

    out = _check_out(args.out, (".png", ".npz"))
    degraded_out = _check_out(args.degraded, (".png", ".npz"), "--degraded") if args.degraded else None
    model, device, shift, amp = _setup(args, ((out, "--out"), (degraded_out, "--degraded")))
    images, labels = _load_inputs(args.input, model)
    n, shape = len(images), tuple(images.shape[1:])
    op = build_operator(args.task, shape, n, box=args.box, p=args.drop, seed=args.seed)
    y = measure(op, images, args.noise_std, seed=args.seed)
    cond = _labels_arg(args.classes, n, model.num_classes, None, "--class", allow_null=False)
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
        p.add_argument("--solver", default=solver, help="fixed-step solver: " + ", ".join(_solvers(adaptive=False)))
    p.add_argument("--steps", type=_positive_int, default=steps, help="solver steps")
    p.add_argument("--shift", type=_positive_float, help="time shift of the grid (default: the run's flow.shift)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of every random draw")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="images per model call")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the hardware runs it natively")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights")


def add_parsers(sub) -> None:
    """Register this module's commands on the ``flowdit`` subparsers ``sub``."""
    iv = command(sub, "invert", help="invert images to their latent noise (t = 0 -> 1)",
                 description="Integrate the flow ODE from the images (t = 0) to noise (t = 1), unguided, "
                             "under each image's class (the .npz labels, --class, or the null class).")
    _edit_common(iv)
    iv.add_argument("--class", dest="classes", help="class for all images, or a comma list of one per image")
    iv.add_argument("--out", required=True, help="output .npz (noise, labels) or .safetensors")
    iv.add_argument("--recon", help="also regenerate from the latents to this .png grid or .npz")
    iv.set_defaults(func=cmd_invert)


    ed = command(sub, "edit", help="edit images to another class (RF-Edit or RF-Inversion)",
                 description="Invert under the source class and regenerate under the target class, "
                             "keeping the source's style: RF-Edit injects the attention values recorded "
                             "during inversion for the first --inject steps; RF-Inversion uses the "
                             "controlled forward / reverse ODEs (--gamma, --eta).")
    _edit_common(ed)
    ed.add_argument("--method", choices=["rf-edit", "rf-inversion"], default="rf-edit", help="editing method")
    ed.add_argument("--target", help="target class for all images, or a comma list (class-conditional runs)")
    ed.add_argument("--target-prompt", help="text-to-image runs: the prompt to edit into")
    ed.add_argument("--source-prompt", help="text-to-image runs: the prompt of the input (default: the empty prompt)")
    ed.add_argument("--source", help="source class(es) (default: the .npz labels, else the null class)")
    ed.add_argument("--inject", type=_non_negative_int, default=2,
                    help="RF-Edit: steps that inject the recorded values")
    ed.add_argument("--blocks", help="RF-Edit: comma-separated blocks (default: the second half)")
    ed.add_argument("--accel", help="RF-Edit: a block policy active during inversion and regeneration, e.g. "
                    "fora:interval=2 (docs/acceleration.md)")
    ed.add_argument("--gamma", type=_non_negative_float, default=0.5, help="RF-Inversion: forward controller strength")
    ed.add_argument("--eta", type=_non_negative_float, default=0.9, help="RF-Inversion: reverse controller strength")
    ed.add_argument("--eta-steps", default="0,3", help="RF-Inversion: 'start,stop' regeneration steps under eta")
    ed.add_argument("--cfg", type=_non_negative_float, default=1.0, help="guidance scale of the regeneration")
    ed.add_argument("--out", required=True, help="output .png grid or .npz")
    ed.set_defaults(func=cmd_edit)


    rs = command(sub, "restore", help="degrade images with a known operator and restore them (FlowChef)",
                 description="Simulate y = A x (+ noise) on the input images and solve for x by steered "
                             "sampling (Euler steps): FlowChef (gradient-free, 1 NFE per step), the replacement "
                             "baseline, or unguided sampling; prints PSNR / SSIM against the inputs.")
    _edit_common(rs, solver=None, steps=20)
    rs.add_argument("--task", required=True, choices=["inpaint", "inpaint_random", "sr2", "sr4", "deblur"],
                    help="degradation operator")
    rs.add_argument("--method", choices=["flowchef", "baseline", "unguided"], default="flowchef",
                    help="restoration method")
    rs.add_argument("--step-size", type=_positive_float, default=1.0,
                    help="FlowChef step, in units of 1 / ||A||^2")
    rs.add_argument("--noise-std", type=_non_negative_float, default=0.0,
                    help="measurement noise std (images in [-1, 1])")
    rs.add_argument("--box", type=_positive_float, default=0.5, help="inpaint: side of the missing box, fraction of H")
    rs.add_argument("--drop", type=_non_negative_float, default=0.7,
                    help="inpaint_random: fraction of missing pixels")
    rs.add_argument("--class", dest="classes", help="condition on this class (default: unconditional)")
    rs.add_argument("--degraded", help="also write the measurement (viewable) to this .png or .npz")
    rs.add_argument("--out", required=True, help="output .png grid or .npz")
    rs.set_defaults(func=cmd_restore)
