"""Training-step time of DDT-mnist against DiT-mnist, measured interleaved (a sanity number).

Builds one trainer per model from ``configs/mnist.yaml`` (``model.name`` replaced; the real
data, objective, optimizer, EMA and precision), runs a few warm-up steps each, then takes
turns: ``--steps`` training steps of one model, then of the next, ``--repeats`` times. Prints
the median and every repeat's seconds per step, with the machine and the load average.

    OMP_NUM_THREADS=1 python benchmarks/ddt_train_step.py --root /path/to/mnist
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import machine_info

from flowdit.train.config import RunConfig
from flowdit.train.trainer import Trainer
from flowdit.utils.config import load_config


def main(argv=None) -> None:
    """Parse the options, time the models in turn, print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="directory of the MNIST IDX files")
    ap.add_argument("--models", default="DiT-mnist,DDT-mnist", help="registry models, comma-separated")
    ap.add_argument("--batch", type=int, default=128, help="batch size")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per model and repeat")
    ap.add_argument("--repeats", type=int, default=3, help="turns per model")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    ap.add_argument("--precision", default="auto", help="train.precision (auto, fp32, bf16)")
    args = ap.parse_args(argv)
    names = args.models.split(",")
    out = tempfile.mkdtemp(prefix="ddt_step_")
    trainers = {}
    for name in names:
        cfg = load_config(RunConfig, str(Path(__file__).resolve().parents[1] / "configs" / "mnist.yaml"), [
            f"model.name={name}", f"data.root={args.root}", f"out_dir={out}", f"name={name.replace('/', '_')}",
            f"train.batch_size={args.batch}", f"train.precision={args.precision}"])
        trainers[name] = Trainer(cfg, progress=False)
    for tr in trainers.values():
        for _ in range(args.warmup):
            tr.train_step()
    times = {name: [] for name in names}
    load_before = machine_info()["load_average"]
    for _ in range(args.repeats):
        for name, tr in trainers.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                tr.train_step()
            times[name].append((time.perf_counter() - t0) / args.steps)
    info = machine_info()
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} with {torch.get_num_threads()} thread(s); "
          f"load average before {tuple(round(v, 2) for v in load_before)}, after "
          f"{tuple(round(v, 2) for v in info['load_average'])}; precision {args.precision}, batch {args.batch}")
    print("| model | params | s / step (median) | repeats |")
    print("|---|---|---|---|")
    for name, tr in trainers.items():
        reps = ", ".join(f"{v:.3f}" for v in times[name])
        print(f"| {name} | {tr.model.param_count():,} | {statistics.median(times[name]):.3f} | {reps} |")
    for tr in trainers.values():
        tr.close()


if __name__ == "__main__":
    main()
