"""``flowdit sample --diffusers PATH``: a local diffusers SD3 / FLUX pipeline folder sampled
with flowdit's solvers, guidance and caches through ``flowdit.interop.diffusers.DiffusersBridge``.

Every input is checked before diffusers is imported or a weight is read: the folder (its
``model_index.json`` and the transformer's and VAE's ``config.json``), the prompts, the
guidance options for the model family, the image size against the VAE factor times the
patch size, the solver, the cache policy and the output folder. The output folder gets
``image_NNN.png`` per prompt and ``grid.png`` (when the pipeline has a VAE), ``latents.npz``
(``latents`` float32 ``[N, C, H, W]``, unpacked for FLUX, and ``prompts``) and
``settings.json`` (every resolved setting).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from .common import _check_solver, _check_writable, _device, _solvers

__all__ = ["read_prompts", "resolve_diffusers_settings", "sample_diffusers"]

# StableDiffusion3Pipeline's default guidance_scale; FLUX: no true CFG unless asked.
DEFAULT_CFG = {"sd3": 7.0, "flux": 1.0}
FLUX_DEV_GUIDANCE = 3.5


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of ``--prompt`` (in order) followed by those of ``--prompts FILE`` (one a
    line; blank lines and lines starting with ``#`` are skipped)."""
    prompts = list(args.prompt or [])
    if args.prompts is not None:
        path = Path(args.prompts)
        if not path.is_file():
            raise ConfigError(f"--prompts {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--prompts {path}: unreadable ({err})") from None
        lines = [ln.strip() for ln in text.splitlines()]
        from_file = [ln for ln in lines if ln and not ln.startswith("#")]
        if not from_file:
            raise ConfigError(f"--prompts {path}: no prompts (the file is empty or has only blank and # lines)")
        prompts += from_file
    if not prompts:
        raise ConfigError("--diffusers needs --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def resolve_diffusers_settings(args: argparse.Namespace) -> dict:
    """Check every option of a ``--diffusers`` run and return the resolved settings; reads
    only the folder's JSON files (``flowdit.interop.diffusers.inspect_pipeline``)."""
    from ..interop.diffusers import check_accel, inspect_pipeline

    try:
        info = inspect_pipeline(args.diffusers)
    except ConfigError as err:
        raise ConfigError(f"--diffusers: {err}") from None
    if info.missing_text:
        raise ConfigError(f"--diffusers {args.diffusers}: the pipeline has no {', '.join(info.missing_text)}; "
                          f"--prompt needs its text encoders")
    prompts = read_prompts(args)
    family = info.family
    guidance = args.guidance
    if guidance is not None and family == "sd3":
        raise ConfigError("--guidance: SD3 has no guidance embedding; use --cfg (classifier-free guidance)")
    if guidance is not None and not info.guidance_embeds:
        raise ConfigError("--guidance: this FLUX model has no guidance embedding (guidance_embeds false, as "
                          "FLUX-schnell); use --cfg for true classifier-free guidance")
    if family == "flux" and info.guidance_embeds and guidance is None:
        guidance = FLUX_DEV_GUIDANCE
    cfg = DEFAULT_CFG[family] if args.cfg is None else float(args.cfg)
    if args.negative_prompt is not None and cfg == 1.0:
        raise ConfigError("--negative-prompt has no effect with --cfg 1 (no classifier-free guidance)")
    negative = (args.negative_prompt or "") if cfg != 1.0 else None
    m = info.size_multiple
    why = "the VAE factor" + (f" {info.vae_scale_factor} times the patch size" if family == "sd3"
                              else f" {info.vae_scale_factor} times FLUX's 2 x 2 packing")
    sizes = {}
    for flag, value in (("--height", args.height), ("--width", args.width)):
        value = info.default_size if value is None else value
        if value % m:
            raise ConfigError(f"{flag} {value}: must be a multiple of {m} ({why}) for this pipeline")
        if info.max_size is not None and value > info.max_size:
            raise ConfigError(f"{flag} {value}: SD3's positional embedding (pos_embed_max_size) covers at most "
                              f"{info.max_size} pixels for this pipeline")
        sizes[flag] = value
    if args.solver.strip().lower().replace("-", "_") in _solvers()[len(_solvers(adaptive=False)):]:
        raise ConfigError(f"--solver {args.solver}: adaptive solvers do not apply with --diffusers "
                          f"(the pipeline's time grid is fixed-step)")
    _check_solver(args.solver, adaptive=False)
    if args.accel:
        from ..accel import build_policy

        try:
            check_accel(family, build_policy(args.accel))
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith("--accel") else f"--accel {args.accel!r}: {msg}") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; with --diffusers --out is a folder")
    _check_writable(out, "--out")
    return {
        "diffusers": str(Path(args.diffusers).resolve()),
        "pipeline": info.pipeline,
        "family": family,
        "prompts": prompts,
        "negative_prompt": negative,
        "cfg": cfg,
        "guidance": guidance,
        "solver": args.solver.strip().lower().replace("-", "_"),
        "steps": args.steps,
        "accel": args.accel,
        "seed": args.seed,
        "height": sizes["--height"],
        "width": sizes["--width"],
        "vae_scale_factor": info.vae_scale_factor,
        "latent_shape": [info.latent_channels, sizes["--height"] // info.vae_scale_factor,
                         sizes["--width"] // info.vae_scale_factor],
        "batch_size": args.batch_size or len(prompts),
        "precision": args.precision,
        "decoded": info.has_vae,
        "out": str(out),
    }


def _quiet_loading() -> None:
    """No progress bars from diffusers' and transformers' loaders."""
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def sample_diffusers(args: argparse.Namespace) -> int:
    """Run ``flowdit sample --diffusers``: check, load the pipeline, sample, decode, write."""
    import numpy as np
    import torch

    from ..interop.diffusers import EXTRA_HINT, DiffusersBridge, decode_latents, require_diffusers
    from ..utils.files import atomic_write, write_json
    from ..utils.images import save_grid_png

    settings = resolve_diffusers_settings(args)
    device = _device(args)
    try:
        require_diffusers()
    except ConfigError as err:
        raise ConfigError(f"--diffusers needs the diffusers extra: {EXTRA_HINT} ({err})") from None
    if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda"
                                    and torch.cuda.is_bf16_supported()):
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    settings["dtype"], settings["device"] = str(dtype).replace("torch.", ""), str(device)
    if args.no_progress:
        _quiet_loading()
    bridge = DiffusersBridge.from_pretrained(args.diffusers, torch_dtype=dtype, guidance=settings["guidance"])
    pipe = bridge.pipeline
    pipe.to(device)
    prompts, n = settings["prompts"], len(settings["prompts"])
    c, h, w = settings["latent_shape"]
    noise = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(args.seed))
    settings["time_grid"] = [float(v) for v in bridge.grid(settings["steps"], h, w)]
    calls = []
    hook = bridge.model.register_forward_hook(lambda *a: calls.append(1))
    full = total = 0
    latents, images = [], []
    bs = settings["batch_size"]
    with torch.inference_mode():
        for i in range(0, n, bs):
            chunk = prompts[i:i + bs]
            cond = bridge.encode(chunk, device=device)
            neg = None if settings["negative_prompt"] is None else bridge.encode(
                [settings["negative_prompt"]] * len(chunk), device=device)
            policy = None
            if settings["accel"]:
                from ..accel import build_policy

                policy = build_policy(settings["accel"])
            x = noise[i:i + bs].to(device, cond["encoder_hidden_states"].dtype)
            lat = bridge.sample(x, cond, neg, cfg=settings["cfg"], solver=settings["solver"],
                                steps=settings["steps"], accel=policy, progress=not args.no_progress)
            if policy is not None:
                full, total = full + policy.stats.full_calls, total + policy.stats.calls
            latents.append(lat.float().cpu())
            if settings["decoded"]:
                images.append(decode_latents(pipe, lat).float().cpu())
    hook.remove()
    settings["model_calls"] = len(calls)
    if settings["accel"]:
        settings["accel_full_calls"] = full
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lat = torch.cat(latents)
    files = []
    if settings["decoded"]:
        img = torch.cat(images)
        for k, pil in enumerate(pipe.image_processor.postprocess(img, output_type="pil")):
            name = f"image_{k:03d}.png"
            atomic_write(out / name, lambda f, p=pil: p.save(f, format="PNG"))
            files.append({"file": name, "prompt": prompts[k]})
        save_grid_png(img.clamp(-1, 1), out / "grid.png", upscale=1)
    atomic_write(out / "latents.npz", lambda f: np.savez(
        f, latents=lat.numpy(), prompts=np.array(prompts, dtype=str),
        negative_prompt=np.array(settings["negative_prompt"] or "", dtype=str), seed=np.int64(args.seed)))
    settings["images"] = files
    write_json(out / "settings.json", settings)
    what = (f"{n} images (image_000.png ..., grid.png, in prompt order), latents.npz"
            if settings["decoded"] else "latents.npz only (the pipeline has no VAE to decode with)")
    note = f", accel {settings['accel']}: {full}/{total} model calls in full" if settings["accel"] else ""
    print(f"flowdit: wrote {what} and settings.json to {out} ({settings['family']}, solver {settings['solver']}, "
          f"{settings['steps']} steps, cfg {settings['cfg']}{note})")
    return 0
