"""flowdit's DiT against diffusers' ``DiTTransformer2DModel``, the same architecture, side by side.

    pip install diffusers          # optional: only this benchmark needs it
    python benchmarks/vs_diffusers.py [--models S/2,B/2,mnist] [--repeats 3] [--compile]

Both toolkits build the same DiT (depth, width, heads, patch size, input shape, adaLN-Zero,
tanh GELU, learned class embedding with a null class). They differ in one known way:
diffusers gives every block its own timestep/label embedder (``norm1.emb``) where DiT and
flowdit share one, so parameters are reported in full and without embedders, and compute is
compared in FLOPs counted by ``torch.utils.flop_counter`` on each model as it runs.

Measured in one process, interleaved (flowdit fp32, diffusers fp32, flowdit bf16, diffusers
bf16, then again), so that machine noise hits both alike:

- training throughput: forward + backward + AdamW step on an MSE loss, images/s;
- sampling throughput: one forward under ``no_grad``, images/s (a sampler step);
- model FLOPs utilisation (MFU): counted model FLOPs x images/s over the machine's matmul
  peak in the same precision, itself measured here (best of square matmuls);
- peak memory on CUDA (``max_memory_allocated``); on a CPU there is no allocator counter to
  read, and the column is left empty.

Writes ``benchmarks/results/vs_diffusers.{json,md}`` (``--name`` to change).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from common import machine_info, timed, write_results
from flowdit.models.registry import build_model

# name: (flowdit registry name, input side, channels, classes, batch for training, batch for sampling)
MODELS = {
    "S/2": ("DiT-S/2", 32, 4, 1000, 16, 32),
    "B/2": ("DiT-B/2", 32, 4, 1000, 8, 16),
    "mnist": ("DiT-mnist", 28, 1, 10, 128, 256),
}


def build_pair(key: str, device: torch.device):
    """The same DiT in flowdit and in diffusers, both fp32 master weights on ``device``."""
    from diffusers import DiTTransformer2DModel

    name, side, ch, classes, _, _ = MODELS[key]
    ours = build_model(name, side, ch, classes).to(device)
    cfg = ours.config
    theirs = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=ch, out_channels=ch, num_layers=cfg.depth, sample_size=side, patch_size=cfg.patch_size,
        activation_fn="gelu-approximate", num_embeds_ada_norm=classes, norm_type="ada_norm_zero",
    ).to(device)
    return ours, theirs


def params(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, parameters outside the timestep / label embedders)."""
    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for n, p in model.named_parameters()
              if n.startswith(("t_embedder.", "y_embedder.")) or ".norm1.emb." in n)
    return total, total - emb


def make_calls(model, kind: str, batch: int, side: int, ch: int, classes: int, device, amp_dtype):
    """``(train_step, forward)`` closures for one model on fixed random inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, ch, side, side, generator=g).to(device)
    target = torch.randn(batch, ch, side, side, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    t = torch.rand(batch, generator=g).to(device)
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    if kind == "flowdit":
        def fwd():
            return model(x, t, y)
    else:  # diffusers takes integer timesteps in [0, 1000)
        steps = (t * 999).long()

        def fwd():
            return model(x, timestep=steps, class_labels=y, return_dict=False)[0]

    def train_step():
        with amp():
            loss = F.mse_loss(fwd().float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sample_step():
        with amp():
            fwd()

    return train_step, sample_step


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """Best measured FLOP/s of square matmuls in ``dtype`` (the roofline MFU is taken against)."""
    best = 0.0
    for n in (1024, 2048, 4096):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        secs = min(timed(lambda: a @ b, repeats=repeats, warmup=1))
        best = max(best, 2 * n**3 / secs)
    return best


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def bench_model(key: str, repeats: int, device: torch.device, compile_: bool, precisions: list[str]) -> list[dict]:
    name, side, ch, classes, b_train, b_sample = MODELS[key]
    ours, theirs = build_pair(key, device)
    precisions = {p: PRECISIONS[p] for p in precisions}
    entries = {}
    for kind, model in (("flowdit", ours), ("diffusers", theirs)):
        model.train()
        run_model = torch.compile(model) if compile_ else model
        for p, dt in precisions.items():
            tr, _ = make_calls(run_model, kind, b_train, side, ch, classes, device, dt)
            _, sm = make_calls(run_model, kind, b_sample, side, ch, classes, device, dt)
            total, non_emb = params(model)
            entries[(kind, p)] = {
                "model": key, "toolkit": kind, "precision": p, "compiled": compile_, "params": total,
                "params_non_embedding": non_emb, "batch_train": b_train, "batch_sample": b_sample,
                "train_flops_per_image": count_flops(tr) / b_train,
                "sample_flops_per_image": count_flops(sm) / b_sample,
                "_train": tr, "_sample": sm, "train_s": [], "sample_s": [], "peak_mem_train": None,
            }
    for _ in range(repeats):
        for p in precisions:
            for kind in ("flowdit", "diffusers"):
                e = entries[(kind, p)]
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                e["train_s"] += timed(e["_train"], repeats=2, warmup=1)
                if device.type == "cuda":
                    e["peak_mem_train"] = torch.cuda.max_memory_allocated() / 2**20
                e["sample_s"] += timed(e["_sample"], repeats=2, warmup=1)
    rows = []
    for e in entries.values():
        e.pop("_train"), e.pop("_sample")
        e["train_images_per_s"] = e["batch_train"] / statistics.median(e["train_s"])
        e["sample_images_per_s"] = e["batch_sample"] / statistics.median(e["sample_s"])
        rows.append(e)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="S/2,B/2,mnist")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precisions", default="fp32,bf16",
                    help="fp32 and/or bf16 (autocast); on a CPU without native bf16 the bf16 rows take very long")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not precisions or set(precisions) - set(PRECISIONS):
        sys.exit(f"vs_diffusers: --precisions takes {', '.join(PRECISIONS)}; got {args.precisions!r}")
    try:
        import diffusers
    except ImportError:
        sys.exit("vs_diffusers: diffusers is not installed (pip install diffusers)")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    info = machine_info()
    info["diffusers"] = diffusers.__version__
    peaks = {p: matmul_peak(device, PRECISIONS[p] or torch.float32) for p in precisions}
    print("matmul peak: " + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()), flush=True)
    rows = []
    for key in args.models.split(","):
        if key not in MODELS:
            sys.exit(f"vs_diffusers: unknown model {key!r}; choose from {', '.join(MODELS)}")
        rows += bench_model(key, args.repeats, device, args.compile, precisions)
        print(f"{key}: done", flush=True)
    info["load_average_end"] = os.getloadavg()

    by = {(r["model"], r["toolkit"], r["precision"]): r for r in rows}
    for r in rows:
        r["train_mfu"] = r["train_flops_per_image"] * r["train_images_per_s"] / peaks[r["precision"]]
        r["sample_mfu"] = r["sample_flops_per_image"] * r["sample_images_per_s"] / peaks[r["precision"]]
        base = by[(r["model"], "diffusers", r["precision"])]
        r["train_ratio_vs_diffusers"] = r["train_images_per_s"] / base["train_images_per_s"]
        r["sample_ratio_vs_diffusers"] = r["sample_images_per_s"] / base["sample_images_per_s"]
    cmd = "python benchmarks/vs_diffusers.py " + " ".join(sys.argv[1:])
    mem = "" if device.type == "cpu" else " | peak MiB (train)"
    lines = [
        f"Machine: {info['cpu']}{' / ' + info['cuda'] if info['cuda'] else ''}, {info['cores']} cores, torch "
        f"{info['torch']}, diffusers {info['diffusers']}, {'compiled' if args.compile else 'eager'}; load average "
        f"{info['load_average'][0]:.2f} at start, {info['load_average_end'][0]:.2f} at end; commit {info['commit']}.",
        "Matmul peak measured here: " + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()) + ".",
        f"Command: `{cmd.strip()}`", "",
        "| model | toolkit | precision | params (non-emb.) | GFLOP / image (train) | train img/s | ratio | "
        "train MFU | sample img/s | ratio | sample MFU" + mem + " |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | ---" + (" | ---" if mem else "") + " |",
    ]
    for r in rows:
        line = (f"| {r['model']} | {r['toolkit']} | {r['precision']} | {r['params'] / 1e6:.2f}M "
                f"({r['params_non_embedding'] / 1e6:.2f}M) | {r['train_flops_per_image'] / 1e9:.2f} | "
                f"{r['train_images_per_s']:.1f} | {r['train_ratio_vs_diffusers']:.2f}x | {100 * r['train_mfu']:.1f}% | "
                f"{r['sample_images_per_s']:.1f} | {r['sample_ratio_vs_diffusers']:.2f}x | {100 * r['sample_mfu']:.1f}%")
        if mem:
            line += f" | {r['peak_mem_train']:.0f}"
        lines.append(line + " |")
    name = args.name or ("vs_diffusers_compiled" if args.compile else "vs_diffusers")
    md = write_results(name, {"machine": info, "command": cmd, "matmul_peak": peaks, "rows": rows}, "\n".join(lines))
    print("\n".join(lines))
    print(f"\nwrote {md}")


if __name__ == "__main__":
    main()
