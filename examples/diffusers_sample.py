"""Sample a local SD3 or FLUX pipeline folder with flowdit's solvers and caches.

    python examples/diffusers_sample.py PATH --prompt "a red cube on a table" \
        --solver heun --steps 14 --cfg 5 --accel "fbcache:threshold=0.08" --out cube.png

PATH is a folder written by ``pipeline.save_pretrained`` (or a downloaded model snapshot);
nothing is fetched from the network. The pipeline's own text encoders, scheduler grid and
VAE are used; only the integration is flowdit's. This script needs real weights and has
not been run on them here (no weights can be downloaded on the machines flowdit is tested
on); ``tests/test_interop_diffusers.py`` checks every part of it on tiny random models.
"""

from __future__ import annotations

import argparse
import sys

import torch

from flowdit.errors import ConfigError
from flowdit.interop.diffusers import DiffusersBridge


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path", help="local diffusers pipeline folder (SD3 or FLUX)")
    ap.add_argument("--prompt", required=True, help="text prompt")
    ap.add_argument("--negative", default="", help="negative prompt for --cfg > 1 (default: empty)")
    ap.add_argument("--solver", default="euler", help="flowdit solver (default: euler)")
    ap.add_argument("--steps", type=int, default=28, help="solver steps (default: 28)")
    ap.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (default: 1, none)")
    ap.add_argument("--guidance", type=float, default=None, help="FLUX-dev's embedded guidance (default: 3.5)")
    ap.add_argument("--accel", default=None, help="cache spec, e.g. fbcache:threshold=0.08 (default: none)")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (default: 1024)")
    ap.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16",
                    help="weights' dtype (default: bfloat16)")
    ap.add_argument("--out", default="sample.png", help="output image (default: sample.png)")
    args = ap.parse_args(argv)
    if args.size < 16:
        ap.error(f"--size must be at least 16 pixels, got {args.size}")
    try:
        bridge = DiffusersBridge.from_pretrained(args.path, torch_dtype=getattr(torch, args.dtype),
                                                 guidance=args.guidance)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        bridge.pipeline.to(device)
        cond = bridge.encode([args.prompt], device=device)
        neg = bridge.encode([args.negative], device=device) if args.cfg != 1.0 else None
        side = args.size // bridge.pipeline.vae_scale_factor
        if bridge.model.family == "flux":
            side -= side % 2
        g = torch.Generator().manual_seed(args.seed)
        noise = torch.randn(1, bridge.latent_channels, side, side, generator=g).to(device, cond["encoder_hidden_states"].dtype)
        latent = bridge.sample(noise, cond, neg, cfg=args.cfg, solver=args.solver, steps=args.steps,
                               accel=args.accel, progress=True)
        vae = bridge.pipeline.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latent = latent / vae.config.scaling_factor + shift
        with torch.no_grad():
            image = vae.decode(latent.to(vae.dtype)).sample
        bridge.pipeline.image_processor.postprocess(image, output_type="pil")[0].save(args.out)
    except ConfigError as err:
        print(f"diffusers_sample: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
