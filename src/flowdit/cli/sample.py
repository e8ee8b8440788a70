"""``flowdit sample``: sample a trained run to a PNG grid or an .npz, or a local diffusers
SD3 / FLUX pipeline folder (``--diffusers PATH``) to images, latents and settings."""

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


# Options of a run's sampling that a diffusers pipeline has no use for, and the options
# only a diffusers pipeline takes: (attribute, flag).
_RUN_ONLY = (("ckpt", "--ckpt"), ("num", "--num"), ("classes", "--classes"),
             ("guidance_interval", "--guidance-interval"), ("shift", "--shift"), ("tol", "--tol"),
             ("no_ema", "--no-ema"))
_DIFFUSERS_ONLY = (("guidance", "--guidance"),)
_SIZE_FLAGS = (("height", "--height"), ("width", "--width"), ("rope_scaling", "--rope-scaling"),
               ("proportional_attn", "--proportional-attn"))
_PROMPT_FLAGS = (("prompt", "--prompt"), ("prompts", "--prompts"), ("negative_prompt", "--negative-prompt"))
_RUN_DEFAULTS = {"num": 100, "tol": 1e-4, "batch_size": 256}


def _given(args: argparse.Namespace, attr: str) -> bool:
    return getattr(args, attr, None) not in (None, False)


def cmd_sample(args: argparse.Namespace) -> int:
    """``flowdit sample``: a trained run (``--ckpt``) or a diffusers pipeline (``--diffusers``)."""
    if args.diffusers is not None:
        for attr, flag in _RUN_ONLY:
            if _given(args, attr):
                raise ConfigError(f"{flag} does not apply with --diffusers (it is an option of a flowdit run)")
        for attr, flag in _SIZE_FLAGS[2:]:
            if _given(args, attr):
                raise ConfigError(f"{flag} does not apply with --diffusers (an option of a flowdit RoPE run)")
        from .sample_diffusers import sample_diffusers

        return sample_diffusers(args)
    for attr, flag in _DIFFUSERS_ONLY:
        if _given(args, attr):
            raise ConfigError(f"{flag} needs --diffusers PATH (a diffusers pipeline folder)")
    prompt_flags = [f for a, f in _PROMPT_FLAGS if _given(args, a)]
    if not prompt_flags:
        for attr, flag in _SIZE_FLAGS:
            if _given(args, attr):
                raise ConfigError(f"{flag} applies to prompts (--ckpt of a text-to-image run with --prompt, "
                                  "or --diffusers)")
    if args.ckpt is None:
        if prompt_flags:
            raise ConfigError(f"{prompt_flags[0]} needs --ckpt RUN (a text-to-image run) or --diffusers PATH")
        raise ConfigError("--ckpt RUN or --diffusers PATH is required")
    if prompt_flags:
        return _sample_text_run(args)
    for key, value in _RUN_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return _sample_run(args)


def _sample_run(args: argparse.Namespace) -> int:
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
    if meta.get("text") is not None:
        raise ConfigError(f"--ckpt {args.ckpt}: a text-conditioned run; pass --prompt TEXT or --prompts FILE")
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


def _sample_text_run(args: argparse.Namespace) -> int:
    """``--ckpt`` of a text-to-image run with ``--prompt`` / ``--prompts``: ``-n`` images per
    prompt (default 1) to a captioned grid (.png) or an .npz holding ``arr_0`` (uint8
    ``[N, H, W, C]``) and ``prompts``."""
    import io

    import numpy as np

    from ..data.base import to_uint8
    from ..inference.text import generate_from_prompts, load_text_run
    from ..utils.files import atomic_write
    from ..utils.images import save_captioned_grid
    from ..utils.precision import autocast_dtype
    from .sample_diffusers import read_prompts

    for attr, flag in (("classes", "--classes"), ("guidance_interval", "--guidance-interval"), ("tol", "--tol")):
        if _given(args, attr):
            raise ConfigError(f"{flag} does not apply to prompts")
    flags = " / ".join(f for a, f in _PROMPT_FLAGS[:2] if _given(args, a))
    try:
        run = load_text_run(args.ckpt, use_ema=not args.no_ema)
    except ConfigError as e:
        raise ConfigError(f"--ckpt {args.ckpt}: {e} ({flags} given)") from None
    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise FlowditError(f"--out must end in .png (a captioned grid) or .npz, got {args.out!r}")
    _check_solver(args.solver)
    _check_writable(out, "--out")
    prompts = read_prompts(args)
    if not prompts:
        raise ConfigError("--prompt / --prompts: no prompts given")
    accel = None
    if args.accel:
        from ..accel import build_policy

        try:
            accel = build_policy(args.accel)
        except ConfigError as e:
            raise ConfigError(f"--accel {args.accel!r}: {e}") from None
    for attr, flag in _SIZE_FLAGS[2:]:
        if _given(args, attr) and getattr(run.model.config, "pos_embed", None) != "rope":
            raise ConfigError(f"{flag} needs a model with RoPE positions (e.g. FLUX-shapes); --ckpt {args.ckpt} "
                              "has sin-cos positions")
    if args.rope_scaling is not None or args.proportional_attn:
        run.model.set_extrapolation(rope_scaling=args.rope_scaling, proportional_attn=args.proportional_attn or None)
    try:
        run.sample_shape(args.height, args.width)  # a bad size fails before sampling
    except ConfigError as e:
        raise ConfigError(f"--height / --width: {e}") from None
    device = _device(args)
    if args.shift is not None:
        run.shift = args.shift
    cfg_scale = args.cfg if args.cfg is not None else float(run.meta.get("config", {}).get("sample", {}).get("cfg", 4.0))
    per = args.num or 1
    wanted = [p for p in prompts for _ in range(per)]
    imgs, nfe = generate_from_prompts(run, wanted, solver=args.solver, steps=args.steps, cfg_scale=cfg_scale,
                                      seed=args.seed, negative=args.negative_prompt or "",
                                      amp_dtype=autocast_dtype(args.precision, device), accel=accel,
                                      batch_size=args.batch_size or 64, progress=not args.no_progress,
                                      height=args.height, width=args.width)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        save_captioned_grid(imgs, wanted, out, nrow=per if per > 1 else min(8, len(wanted)))
    else:
        buf = io.BytesIO()
        np.savez(buf, arr_0=to_uint8(imgs).permute(0, 2, 3, 1).numpy(), prompts=np.array(wanted))
        atomic_write(out, lambda f: f.write(buf.getvalue()))
    print(f"flowdit: wrote {len(wanted)} samples for {len(prompts)} prompts to {out} (solver {args.solver}, "
          f"NFE {nfe}, cfg {cfg_scale})")
    return 0


def add_parsers(sub) -> None:
    """Register this module's commands on the ``flowdit`` subparsers ``sub``."""
    from ..accel.registry import POLICIES
    from ..models.rope_scaling import ROPE_SCALINGS

    s = command(sub, "sample", help="sample images from a trained run or a diffusers SD3 / FLUX pipeline",
                description="Sample from a run's EMA weights to a PNG grid or an .npz (ADM layout: "
                            "arr_0 uint8 [N,H,W,C], arr_1 int64 labels); or, with --diffusers PATH, from a local "
                            "diffusers SD3 or FLUX pipeline folder with flowdit's solvers, guidance and caches to "
                            "a folder of PNGs, a grid, latents.npz and settings.json (docs/interop.md).")
    s.add_argument("--ckpt", help="run directory or checkpoint directory (this or --diffusers is required)")
    s.add_argument("--diffusers", metavar="PATH",
                   help="a local diffusers SD3 or FLUX pipeline folder (save_pretrained or a model snapshot; "
                        "offline; needs flowdit[diffusers])")
    # -n as well: under torchrun, "--num" is refused as an abbreviation of its --numa-binding.
    s.add_argument("-n", "--num", type=_positive_int, help="number of samples (-n under torchrun; default: 100)")
    s.add_argument("--classes", help="comma-separated class indices (default: all classes, balanced)")
    s.add_argument("--prompt", action="append", help="a text prompt (repeat for several): a text-to-image run or --diffusers")
    s.add_argument("--prompts", metavar="FILE", help="with --diffusers: a text file of prompts, one a line "
                   "(blank lines and lines starting with # are skipped)")
    s.add_argument("--negative-prompt", help="with --diffusers: the negative prompt of classifier-free guidance "
                   "(default: empty)")
    s.add_argument("--guidance", type=_non_negative_float,
                   help="with --diffusers: FLUX-dev's embedded (distilled) guidance scale (default: 3.5; refused "
                        "for SD3 and for FLUX models without the embedding)")
    s.add_argument("--height", type=_positive_int, help="with prompts: image height in pixels, a multiple of "
                   "the VAE factor times the patch size (default: the run's trained size; the pipeline's, "
                   "1024 for SD3 / FLUX, with --diffusers)")
    s.add_argument("--width", type=_positive_int, help="with prompts: image width in pixels (as --height)")
    s.add_argument("--rope-scaling", choices=ROPE_SCALINGS,
                   help="with prompts on a RoPE run: how positions extend beyond the trained grid "
                        "(docs/resolution.md; default none)")
    s.add_argument("--proportional-attn", action="store_true",
                   help="with prompts on a RoPE run: Lumina-Next's proportional attention (log-scaled by tokens)")
    s.add_argument("--solver", default="heun", help="fixed-step: " + ", ".join(_solvers(adaptive=False))
                   + "; adaptive: " + ", ".join(_solvers()[len(_solvers(adaptive=False)):])
                   + " (fixed-step only with --diffusers)")
    s.add_argument("--steps", type=_positive_int, default=16, help="solver steps (ignored by adaptive solvers)")
    s.add_argument("--cfg", type=_non_negative_float,
                   help="classifier-free guidance scale (1 = none; default: the run's sample.cfg; with --diffusers "
                        "7 for SD3 as its pipeline, 1 for FLUX: true CFG only when asked)")
    s.add_argument("--guidance-interval", help="apply guidance only for t in [lo,hi], e.g. 0.1,0.9")
    s.add_argument("--shift", type=_positive_float, help="time shift of the schedule (default: the run's flow.shift)")
    s.add_argument("--tol", type=_positive_float, help="rtol = atol of adaptive solvers (default: 0.0001)")
    s.add_argument("--seed", type=_seed, default=0, help="seed of the noise (sample i always gets the same noise)")
    s.add_argument("--batch-size", type=_positive_int,
                   help="samples per model call (default: 256; with --diffusers all prompts in one batch)")
    s.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the hardware runs it natively; with --diffusers the weights' "
                        "dtype, auto = bf16 on a CUDA device that supports it, else fp32")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--no-ema", action="store_true", help="use the raw training weights")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--out", required=True, help="output .png grid or .npz; with --diffusers an output folder")
    s.add_argument("--accel", help="training-free acceleration, e.g. taylorseer:interval=4,order=2 "
                   "(docs/acceleration.md; policies: " + ", ".join(POLICIES)
                   + "; any cache gate with any reuse: cache:gate=NAME,reuse=NAME,...; on diffusers models "
                   "the stack-level ones, docs/interop.md)")
    s.set_defaults(func=cmd_sample)
