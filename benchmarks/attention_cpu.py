"""Attention in a bf16 training step on a CPU: why flowdit runs it in fp32 there.

    python benchmarks/attention_cpu.py [--models mnist,mnist/2,S/2,B/2] [--repeats 3]

PyTorch's CPU flash-attention backward is much slower in bf16 than in fp32 for DiT's head
sizes, while every matmul around it is several times faster in bf16 on CPUs with AMX /
AVX512-BF16. For each model this measures, interleaved in one process:

- one attention layer's forward + backward at the model's shape (batch, heads, tokens, head
  dim), with bf16 inputs through the bf16 kernel, with bf16 inputs upcast to fp32 (flowdit's
  path), and with fp32 inputs;
- the whole training step (forward, backward, AdamW) of the model in fp32, in bf16 autocast
  with attention left in bf16, and in bf16 autocast with flowdit's default processor.

Writes ``benchmarks/results/attention_cpu.{json,md}`` (``--name`` to change).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from common import machine_info, timed, write_results
from flowdit.models.attention import SDPAProcessor, merge_heads, qkv_heads, sdpa
from flowdit.models.registry import build_model
from vs_diffusers import MODELS, make_calls


class Bf16SDPAProcessor(SDPAProcessor):
    """SDPA in whatever dtype autocast gives it (bf16): the path flowdit avoids on a CPU."""

    def __call__(self, attn, x, ctx=None):
        q, k, v = qkv_heads(attn, x)
        return attn.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))


def attention_layer(shape: tuple[int, int, int, int], mode: str):
    """Closure: forward + backward of SDPA on fixed inputs of ``shape`` ``[B, H, N, Dh]``."""
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))

    def call():
        o = sdpa(q, k, v) if mode == "bf16 upcast" else F.scaled_dot_product_attention(q, k, v)
        o.float().sum().backward()

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mnist,mnist/2,S/2,B/2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--name", default="attention_cpu")
    args = ap.parse_args()
    info = machine_info()
    models = dict(MODELS, **{"mnist/2": ("DiT-mnist/2", 28, 1, 10, 64, 128)})
    rows = []
    for key in args.models.split(","):
        if key not in models:
            sys.exit(f"attention_cpu: unknown model {key!r}; choose from {', '.join(models)}")
        name, side, ch, classes, batch, _ = models[key]
        model = build_model(name, side, ch, classes).train()
        cfg = model.config
        shape = (batch, cfg.num_heads, cfg.num_tokens, cfg.hidden_size // cfg.num_heads)
        layer = {m: attention_layer(shape, m) for m in ("bf16", "bf16 upcast", "fp32")}
        steps = {}
        for label, dt, proc in (("step fp32", None, SDPAProcessor()),
                                 ("step bf16, attention bf16", torch.bfloat16, Bf16SDPAProcessor()),
                                 ("step bf16, flowdit", torch.bfloat16, SDPAProcessor())):
            train_step, _ = make_calls(model, "flowdit", batch, side, ch, classes, torch.device("cpu"), dt)
            steps[label] = (proc, train_step)
        times = {k: [] for k in list(layer) + list(steps)}
        for _ in range(args.repeats):
            for m, call in layer.items():
                times[m] += timed(call, repeats=2, warmup=1)
            for label, (proc, train_step) in steps.items():
                model.set_attn_processor(proc)
                times[label] += timed(train_step, repeats=1, warmup=1)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"model": key, "shape": shape, "batch": batch,
                     "layer_ms": {m: 1000 * med[m] for m in layer},
                     "step_images_per_s": {s.removeprefix("step "): batch / med[s] for s in steps}})
        print(f"{key}: done", flush=True)
    cmd = "python benchmarks/attention_cpu.py " + " ".join(sys.argv[1:])
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, {torch.get_num_threads()} threads, torch {info['torch']}, "
             f"CPU capability {torch.backends.cpu.get_cpu_capability()}; load average at start "
             f"{info['load_average'][0]:.2f}; commit {info['commit']}.", f"Command: `{cmd.strip()}`", "",
             "One attention layer, forward + backward (ms), and the whole training step (images/s):", "",
             "| model | B, H, N, Dh | bf16 kernel | bf16 upcast to fp32 | fp32 | step fp32 | step bf16, attention bf16 "
             "| step bf16, flowdit | flowdit bf16 / fp32 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lm, st = r["layer_ms"], r["step_images_per_s"]
        lines.append(f"| {r['model']} | {', '.join(map(str, r['shape']))} | {lm['bf16']:.1f} | {lm['bf16 upcast']:.1f} | "
                     f"{lm['fp32']:.1f} | {st['fp32']:.1f} | {st['bf16, attention bf16']:.1f} | {st['bf16, flowdit']:.1f} | "
                     f"{st['bf16, flowdit'] / st['fp32']:.2f}x |")
    md = write_results(args.name, {"machine": info, "command": cmd, "rows": rows}, "\n".join(lines))
    print("\n".join(lines))
    print(f"\nwrote {md}")


if __name__ == "__main__":
    main()
