"""``flowdit compress quantize``: a post-training quantized copy of a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from .common import _check_solver, _non_negative_float, _positive_int, _seed, command


# Not a string, so argparse does not convert it: "not given" (the preset's value) differs
# from "none" (no activation quantization, no smoothing).
_PRESET = object()


def _bits_or_none(text: str):
    if text.strip().lower() in ("none", "fp", "float"):
        return None
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a bit width or 'none', got {text!r}") from None
    return v


def _alpha_or_none(text: str):
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'none', got {text!r}") from None


def cmd_quantize(args: argparse.Namespace) -> int:
    import json
    import shutil
    import time

    from ..compress import calibrate, preset, quantize_model
    from ..inference import load_run_model
    from ..train.checkpoint import load_checkpoint, save_checkpoint
    from ..utils.files import atomic_write_text

    overrides = {"wbits": args.wbits, "codec": args.codec, "rotation": args.rotation, "seed": args.seed}
    cfg = preset(args.method, **overrides)
    from dataclasses import replace

    if args.abits is not _PRESET:
        cfg = replace(cfg, abits=args.abits)
    if args.smooth_alpha is not _PRESET:
        cfg = replace(cfg, smooth_alpha=args.smooth_alpha)
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"--method {args.method}: {e}") from None
    _check_solver(args.calib_solver, adaptive=False)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty; choose a new directory")
    src = load_checkpoint(args.ckpt, load_tensors_only=True)
    if src.meta.get("model_class") == "MMDiT":
        raise ConfigError(f"--ckpt {args.ckpt}: a text-to-image run; quantization takes class-conditional DiT runs")
    if "compression" in src.meta:
        raise ConfigError(f"--ckpt {args.ckpt}: already compressed; quantize the float run it came from")
    model, meta = load_run_model(args.ckpt)
    shape = tuple(meta["data"]["shape"])

    t0 = time.perf_counter()
    stats = calibrate(model, shape, num_samples=args.calib_samples, solver=args.calib_solver,
                      steps=args.calib_steps, cfg_scale=args.calib_cfg, seed=args.calib_seed)
    _, spec, tensors = quantize_model(model, cfg, stats)
    spec["calibration"] = {"samples": args.calib_samples, "solver": args.calib_solver, "steps": args.calib_steps,
                           "cfg": args.calib_cfg, "seed": args.calib_seed}
    spec["source"] = str(Path(src.path).resolve())
    seconds = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    run_cfg = Path(src.path).parent.parent / "config.yaml"
    if run_cfg.is_file():
        shutil.copyfile(run_cfg, out / "config.yaml")
    ckpt = save_checkpoint(out, src.step, {"ema": tensors}, meta=dict(src.meta, compression=spec))
    atomic_write_text(out / "compression.json", json.dumps(spec, indent=2) + "\n")
    size = (ckpt / "ema.safetensors").stat().st_size
    src_size = (Path(src.path) / "ema.safetensors").stat().st_size
    n_out = sum(1 for v in spec["layers"].values() if v["rotation"] == "outlier")
    rot = f", {n_out} of {len(spec['layers'])} layers on the outlier-aware rotation" if cfg.rotation == "ars" else ""
    abits = "float" if cfg.abits is None else cfg.abits
    print(f"flowdit: wrote {out} ({args.method}: W{cfg.wbits} A{abits}, {cfg.codec}{rot}); "
          f"weights {size / 1e6:.2f} MB vs {src_size / 1e6:.2f} MB float; {seconds:.0f} s")
    return 0


def add_parsers(sub) -> None:
    """Register this module's commands on the ``flowdit`` subparsers ``sub``."""
    c = command(sub, "compress", help="compress a trained run (post-training quantization)")
    csub = c.add_subparsers(dest="compress_command", required=True, metavar="ACTION")
    q = command(csub, "quantize", help="quantize a run's transformer blocks",
                description="Calibrate on the model's own sampling trajectories, quantize the attention and MLP "
                            "linears of every block, and write a new run directory that sample, evaluate and the "
                            "benchmarks load like any run. Methods: w8a8 (SmoothQuant + real int8 matmuls), rtn "
                            "(uniform round-to-nearest with clipping search), smoothquant, lrq (LRQ-DiT: twin-log "
                            "weights, adaptive rotation).")
    q.add_argument("--ckpt", required=True, help="run directory or checkpoint directory of the float model")
    q.add_argument("--out", required=True, help="new run directory to write (must not exist or be empty)")
    q.add_argument("--method", default="w8a8", choices=["w8a8", "rtn", "smoothquant", "lrq"], help="method preset")
    q.add_argument("--wbits", type=_positive_int, help="weight bits (default: the preset's; w8a8 is 8)")
    q.add_argument("--abits", type=_bits_or_none, default=_PRESET,
                   help="activation bits or 'none' for weight-only (default: the preset's, 8)")
    q.add_argument("--codec", choices=["uniform", "twin_log", "twin_log_own"],
                   help="weight quantizer (default: the preset's; twin_log_own is flowdit's variant)")
    q.add_argument("--rotation", choices=["none", "hadamard", "ars"], help="input rotation (default: the preset's)")
    q.add_argument("--smooth-alpha", type=_alpha_or_none, default=_PRESET, help="SmoothQuant alpha or 'none' (default: the preset's)")
    q.add_argument("--calib-samples", type=_positive_int, default=64, help="calibration images (trajectories)")
    q.add_argument("--calib-steps", type=_positive_int, default=16, help="solver steps of each calibration trajectory")
    q.add_argument("--calib-solver", default="heun", help="fixed-step solver of the calibration trajectories")
    q.add_argument("--calib-cfg", type=_non_negative_float, default=1.5, help="guidance scale during calibration")
    q.add_argument("--calib-seed", type=_seed, default=1234, help="noise seed of the calibration trajectories")
    q.add_argument("--seed", type=_seed, help="seed of the random rotations")
    q.set_defaults(func=cmd_quantize)
