"""Training throughput and sampling time per image, fp32 vs bf16 autocast, side by side.

    python benchmarks/throughput.py [--repeats 5] [--configs digits,mnist]

For each recipe's model, the two precisions are measured interleaved in one process
(fp32, bf16, fp32, bf16, ...) so that machine noise hits both alike; the table gives the
median and the bf16 / fp32 ratio. A training step is the trainer's own step (forward,
backward, clipping, AdamW, EMA) on the recipe's global batch; sampling is ``generate``
of 64 images with Heun, 8 steps (16 NFE), classifier-free guidance 1.5 (one batched
forward of 128 rows per evaluation).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

import torch

from common import machine_info, timed, write_results
from flowdit.inference import generate
from flowdit.train.config import RunConfig
from flowdit.train.trainer import Trainer
from flowdit.utils.config import load_config

RECIPES = {
    "digits": ["configs/digits.yaml"],
    "mnist": ["configs/mnist.yaml"],
}


def bench_recipe(name: str, repeats: int, mnist_root: str | None) -> list[dict]:
    overrides = [f"out_dir={tempfile.mkdtemp()}", "train.precision=fp32"]
    if name == "mnist" and mnist_root:
        overrides.append(f"data.root={mnist_root}")
    cfg = load_config(RunConfig, RECIPES[name][0], overrides)
    tr = Trainer(cfg, progress=False)
    shape, K = tr.dataset.shape, tr.dataset.num_classes
    labels = torch.arange(64) % K
    rows = {p: {"recipe": name, "model": cfg.model.name, "precision": p, "batch": cfg.train.batch_size,
                "params": tr.model.param_count(), "train": [], "sample": []} for p in ("fp32", "bf16")}
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    for _ in range(repeats):
        for p, dt in dtypes.items():
            tr.amp_dtype = dt
            rows[p]["train"] += timed(tr.train_step, repeats=2, warmup=1)
            rows[p]["sample"] += timed(lambda: generate(tr.ema, labels, shape, solver="heun", steps=8,
                                                        cfg_scale=1.5, amp_dtype=dt), repeats=1, warmup=0)
    out = []
    for p, r in rows.items():
        r["train_images_per_s"] = r["batch"] / statistics.median(r["train"])
        r["sample_ms_per_image"] = 1000 * statistics.median(r["sample"]) / len(labels)
        out.append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", default="digits,mnist")
    ap.add_argument("--mnist-root", default="../shared/data/mnist")
    args = ap.parse_args()
    info = machine_info()
    rows = []
    for name in args.configs.split(","):
        rows += bench_recipe(name, args.repeats, args.mnist_root)
    info["load_average_end"] = __import__("os").getloadavg()
    lines = [
        "| recipe | model | params | batch | precision | train images/s | bf16 / fp32 | sample ms / image (Heun 8, CFG) | fp32 / bf16 time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    by = {(r["recipe"], r["precision"]): r for r in rows}
    for r in rows:
        base = by[(r["recipe"], "fp32")]
        tr_ratio = r["train_images_per_s"] / base["train_images_per_s"]
        sm_ratio = base["sample_ms_per_image"] / r["sample_ms_per_image"]
        lines.append(f"| {r['recipe']} | {r['model']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['precision']} | "
                     f"{r['train_images_per_s']:.0f} | {tr_ratio:.2f}x | {r['sample_ms_per_image']:.2f} | {sm_ratio:.2f}x |")
    cmd = "python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    table = (f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, load average at start "
             f"{info['load_average'][0]:.2f}, commit {info['commit']}.\nCommand: `{cmd.strip()}`\n\n" + "\n".join(lines))
    name = "throughput" if args.configs == "digits,mnist" else "throughput_" + args.configs.replace(",", "_")
    md = write_results(name, {"machine": info, "command": cmd, "rows": rows}, table)
    print(table)
    print(f"\nwrote {md}")


if __name__ == "__main__":
    main()
