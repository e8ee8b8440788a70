"""What the sampling loop costs on top of the model: ``generate`` against a bare loop.

    python benchmarks/loop_overhead.py [--model DiT-mnist] [--num 256] [--steps 16] [--repeats 5]

Both sample the same noise with Euler and classifier-free guidance (one batched forward
of ``2 x num`` rows per step) and give the same images (checked). The bare loop is the
least any sampler must do: concatenate the rows, call the model, combine the two halves,
take the step. ``generate`` adds the schedule, the solver object, the guidance wrapper,
the step context, NFE counting and the output clamp. The two are timed interleaved in
one process; the table gives the medians and the overhead of ``generate`` in percent.
An untrained model is enough: the cost of a call does not depend on the weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from common import machine_info, timed, write_results
from flowdit.models.registry import build_model
from flowdit.inference import generate, indexed_noise

SHAPES = {"DiT-mnist": (1, 28), "DiT-mnist/2": (1, 28), "DiT-digits": (1, 8), "DiT-S/2": (4, 32), "DiT-B/2": (4, 32)}


@torch.no_grad()
def bare_euler_cfg(model, noise: torch.Tensor, y: torch.Tensor, steps: int, scale: float) -> torch.Tensor:
    """The minimal guided Euler sampler: ``2B`` rows per call, ``v = v_u + s (v_c - v_u)``."""
    x = noise
    y2 = torch.cat([y, torch.full_like(y, model.null_class)])
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        t = ts[i].expand(2 * len(x))
        v_c, v_u = model(torch.cat([x, x]), t, y2).chunk(2)
        x = x + (ts[i + 1] - ts[i]) * (v_u + scale * (v_c - v_u))
    return x.clamp(-1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-mnist", choices=sorted(SHAPES))
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    ch, side = SHAPES[args.model]
    model = build_model(args.model, side, ch, 10).eval()
    # adaLN-Zero starts as the identity map; give the output layer weights so that the
    # velocity, and the check below, are not trivially zero.
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)
    for b in model.blocks:
        torch.nn.init.normal_(b.adaLN_modulation[1].weight, std=0.02)
    labels = torch.arange(args.num) % 10
    shape = (ch, side, side)

    def ours():
        return generate(model, labels, shape, solver="euler", steps=args.steps, cfg_scale=args.cfg,
                        batch_size=args.num).images

    def bare():  # the same per-index noise: drawing it is part of sampling either way
        return bare_euler_cfg(model, indexed_noise(range(args.num), shape, 0), labels, args.steps, args.cfg)

    diff = (ours() - bare()).abs().max().item()
    if diff > 1e-5:
        sys.exit(f"loop_overhead: generate and the bare loop disagree by {diff:.3g}")
    info = machine_info()
    t_ours, t_bare = [], []
    for _ in range(args.repeats):
        t_ours += timed(ours, repeats=1, warmup=0)
        t_bare += timed(bare, repeats=1, warmup=0)
    m_ours, m_bare = statistics.median(t_ours), statistics.median(t_bare)
    overhead = 100 * (m_ours / m_bare - 1)
    cmd = "python benchmarks/loop_overhead.py " + " ".join(sys.argv[1:])
    table = (f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, load average at start "
             f"{info['load_average'][0]:.2f}, commit {info['commit']}.\nCommand: `{cmd.strip()}`\n\n"
             f"| model | images | Euler steps, CFG | bare loop s | generate s | overhead | max abs. difference |\n"
             f"| --- | --- | --- | --- | --- | --- | --- |\n"
             f"| {args.model} | {args.num} | {args.steps}, {args.cfg:g} | {m_bare:.3f} | {m_ours:.3f} | "
             f"{overhead:+.1f}% | {diff:.1e} |")
    name = "loop_overhead" + ("" if args.model == "DiT-mnist" else "_" + args.model.replace("/", "_"))
    md = write_results(name, {"machine": info, "command": cmd, "bare_s": t_bare, "generate_s": t_ours,
                              "overhead_percent": overhead, "max_abs_diff": diff}, table)
    print(table)
    print(f"\nwrote {md}")


if __name__ == "__main__":
    main()
