"""flowdit's caches on diffusers' SD3 and FLUX transformers, through the bridge.

Two parts, both on random-weight models built from their constructors (no weights can be
downloaded here):

1. *Exactness* on the tiny test models: every stack-level cache and the per-block FORA
   and TaylorSeer at their full-compute settings against the uncached bridge (max |difference| of the final latent), with the
   model calls and block evaluations it spent.
2. *Wall-clock* on mid-size models (where the tiny ones would time Python overhead only):
   each cache at a skipping setting against the uncached bridge, all timed in turns within
   this one process (repeat by repeat, so machine noise falls on all alike), with the PSNR
   of its latent to the uncached one. Random weights make a quality score meaningless, so
   closeness to the uncached trajectory is what is reported.

    python benchmarks/diffusers_bridge.py --repeats 3 --out benchmarks/results/diffusers_bridge
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from flowdit.accel import build_policy
from flowdit.interop.diffusers import scheduler_grid, text_condition, wrap_transformer
from flowdit.sampling.context import StepContext
from flowdit.sampling.guidance import cfg_velocity
from flowdit.sampling.sample import sample

EXACT = ["none", "fora:interval=1,cache=stack", "taylorseer:interval=1,order=2,cache=stack",
         "gated_taylor:threshold=0", "fbcache:threshold=0", "teacache:threshold=0", "delta_dit:interval=1,blocks=1",
         "fora:interval=1", "taylorseer:interval=1"]
# Per-block FORA and TaylorSeer at their defaults (cache=blocks: FORA interval 3;
# TaylorSeer interval 4, order 4, warm-up 2) next to the stack-level caches.
TIMED = ["fora:interval=3", "taylorseer", "fora:interval=3,cache=stack", "taylorseer:interval=4,order=1,cache=stack",
         "taylorseer:interval=5,order=1,cache=stack,spaced=1", "gated_taylor:threshold=0.05",
         "fbcache:threshold=0.08", "teacache:threshold=0.1", "delta_dit:interval=2"]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``, as ``lscpu`` shows it), else the platform's."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(family: str, size: str):
    """A random-weight transformer, its scheduler, latent shape and text shapes."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    if family == "sd3":
        heads, dim_head, layers, side, text = (4, 8, 2, 16, 7) if size == "tiny" else (8, 64, 8, 32, 64)
        tr = SD3Transformer2DModel(sample_size=side, patch_size=2, in_channels=4, num_layers=layers,
                                   attention_head_dim=dim_head, num_attention_heads=heads, joint_attention_dim=64,
                                   caption_projection_dim=heads * dim_head, pooled_projection_dim=64, out_channels=4,
                                   pos_embed_max_size=side)
        sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
        return tr.eval(), sch, (4, side, side), (text, 64, 64)
    heads, dim_head, double, single, side, text = (4, 8, 1, 2, 8, 5) if size == "tiny" else (8, 64, 4, 8, 32, 64)
    rope = (2, 2, 4) if size == "tiny" else (16, 24, 24)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=double, num_single_layers=single,
                                attention_head_dim=dim_head, num_attention_heads=heads, joint_attention_dim=64,
                                pooled_projection_dim=32, axes_dims_rope=rope)
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                          base_image_seq_len=256, max_image_seq_len=4096)
    return tr.eval(), sch, (4, side, side), (text, 64, 32)


def run(model, grid, noise, cond, neg, cfg, spec):
    policy = None if spec == "none" else build_policy(spec)
    ctx = StepContext(block_policy=policy)
    if cfg == 1.0:
        def fn(x, t):
            return model(x, t, cond, ctx=ctx)
    else:
        fn = cfg_velocity(model, cond, neg, cfg, ctx=ctx)
    t0 = time.perf_counter()
    out = sample(fn, noise, solver="euler", schedule=grid, step_context=ctx)
    return out.x, time.perf_counter() - t0, out.nfe, policy


def inputs(shape, text, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, *shape, generator=g)
    L, dt, dp = text
    cond = text_condition(torch.randn(batch, L, dt, generator=g), torch.randn(batch, dp, generator=g))
    neg = text_condition(torch.randn(batch, L, dt, generator=g), torch.randn(batch, dp, generator=g))
    return noise, cond, neg


def psnr(a, b):
    mse = (a - b).pow(2).mean().item()
    peak = b.abs().max().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak ** 2 / mse)).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=28, help="Euler steps of the timed part (default 28)")
    ap.add_argument("--cfg", type=float, default=1.0, help="guidance scale of the timed part (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of every method (default 3)")
    ap.add_argument("--out", default="benchmarks/results/diffusers_bridge", help="output path without suffix")
    args = ap.parse_args(argv)
    if args.steps < 2 or args.repeats < 1:
        ap.error("--steps must be >= 2 and --repeats >= 1")
    import diffusers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    machine = (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"diffusers {diffusers.__version__}, threads {torch.get_num_threads()}, "
               f"load average at start {os.getloadavg()[0]:.2f}, commit {commit}")
    rows = []
    for family in ("sd3", "flux"):
        model_tr, sch, shape, text = build(family, "tiny")
        model = wrap_transformer(model_tr)
        seq = (shape[1] // 2) * (shape[2] // 2)
        grid = scheduler_grid(sch, 8, image_seq_len=seq)
        noise, cond, neg = inputs(shape, text, 2)
        ref, _, _, _ = run(model, grid, noise, cond, neg, 3.0, "none")
        for spec in EXACT:
            out, _, nfe, pol = run(model, grid, noise, cond, neg, 3.0, spec)
            st = pol.stats if pol else None
            rows.append({"part": "exact", "family": family, "method": spec, "nfe": nfe,
                         "max_abs_diff": (out - ref).abs().max().item(),
                         "full_calls": st.full_calls if st else nfe, "block_evals": st.block_evals if st else nfe})
            print(f"[exact] {family} {spec}: max|diff| {rows[-1]['max_abs_diff']:.1e}", flush=True)

    for family in ("sd3", "flux"):
        model_tr, sch, shape, text = build(family, "mid")
        model = wrap_transformer(model_tr)
        n_params = sum(p.numel() for p in model_tr.parameters())
        seq = (shape[1] // 2) * (shape[2] // 2)
        grid = scheduler_grid(sch, args.steps, image_seq_len=seq)
        noise, cond, neg = inputs(shape, text, 1)
        specs = ["none"] + TIMED
        times = {s: [] for s in specs}
        outs, stats = {}, {}
        run(model, grid, noise, cond, neg, args.cfg, "none")  # warm-up
        for r in range(args.repeats):
            for spec in specs:
                out, sec, nfe, pol = run(model, grid, noise, cond, neg, args.cfg, spec)
                times[spec].append(sec)
                outs[spec] = out
                stats[spec] = (nfe, pol.stats.full_calls if pol else nfe)
                print(f"[timed] {family} repeat {r} {spec}: {sec:.2f} s", flush=True)
        base = times["none"]
        for spec in specs:
            ratios = [b / s for b, s in zip(base, times[spec])]
            rows.append({"part": "timed", "family": family, "params": n_params, "method": spec,
                         "tokens": seq + text[0] if family == "flux" else (shape[1] // 2) ** 2 + text[0],
                         "nfe": stats[spec][0], "full_calls": stats[spec][1],
                         "seconds": statistics.median(times[spec]),
                         "speedup": sum(base) / sum(times[spec]),
                         "speedup_std": statistics.pstdev(ratios) if len(ratios) > 1 else 0.0,
                         "psnr_to_uncached": psnr(outs[spec], outs["none"])})

    cmd = "python benchmarks/diffusers_bridge.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"Machine: {machine}.", f"Command: `{cmd}`", "",
             "Exactness on the tiny models (8 Euler steps, CFG 3 batched, batch 2): final latent against the uncached bridge.",
             "", "| model | method | model calls | full calls | max abs difference |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["part"] == "exact":
            lines.append(f"| {r['family']} | {r['method']} | {r['nfe']} | {r['full_calls']} | {r['max_abs_diff']:.1e} |")
    lines += ["", f"Wall-clock on the mid-size models ({args.steps} Euler steps, CFG {args.cfg:g}, batch 1, "
              f"{args.repeats} interleaved repeats): speedup = uncached seconds over the method's, summed over "
              "repeats (± std of the per-repeat ratios); PSNR of the final latent to the uncached one.", "",
              "| model | params | tokens | method | full calls / calls | s per sample (median) | speedup | PSNR dB |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["part"] == "timed":
            lines.append(f"| {r['family']} | {r['params'] / 1e6:.1f}M | {r['tokens']} | {r['method']} | "
                         f"{r['full_calls']}/{r['nfe']} | {r['seconds']:.2f} | {r['speedup']:.2f}x ± "
                         f"{r['speedup_std']:.2f} | {r['psnr_to_uncached']:.1f} |")
    text_out = "\n".join(lines) + "\n"
    print(text_out)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(text_out)
    with open(args.out + ".json", "w") as f:
        json.dump({"machine": machine, "command": cmd, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
