"""Where a training step's time goes: the top operators of one flowdit and one diffusers
DiT training step (forward, backward, AdamW), side by side, from ``torch.profiler``.

    python benchmarks/profile_step.py [--model mnist] [--batch 128] [--steps 2] [--precision bf16]

Uses the model pairs of ``vs_diffusers.py`` (same architecture in both toolkits). Prints
per-step self time of the heaviest operators; the sum of all self times is the step.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from vs_diffusers import MODELS, build_pair, make_calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist", choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=None, help="default: the training batch of vs_diffusers.py")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast, as in training")
    args = ap.parse_args()
    _, side, ch, classes, b_train, _ = MODELS[args.model]
    batch = args.batch or b_train
    ours, theirs = build_pair(args.model, torch.device("cpu"))
    for kind, model in (("flowdit", ours), ("diffusers", theirs)):
        amp = torch.bfloat16 if args.precision == "bf16" else None
        step, _ = make_calls(model, kind, batch, side, ch, classes, torch.device("cpu"), amp)
        step()
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        events = prof.key_averages()
        total_ms = sum(e.self_cpu_time_total for e in events) / 1000 / args.steps
        print(f"{kind}: {total_ms:.1f} ms per step (batch {batch}, {args.precision}, {torch.get_num_threads()} threads)")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
            ms = e.self_cpu_time_total / 1000 / args.steps
            print(f"  {e.key[:50]:50s} {ms:8.1f} ms {100 * ms / total_ms:5.1f}%  {e.count // args.steps:4d} calls")


if __name__ == "__main__":
    main()
