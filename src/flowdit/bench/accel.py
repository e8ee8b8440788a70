"""``flowdit bench accel``: every block policy against the uncached sampler and against
simply running fewer solver steps, on the same model, seeds and classes.

For each method (a policy spec) the benchmark samples ``--num`` images per seed with
the given solver, steps and guidance, and reports:

* wall-clock speedup: the uncached sampler's seconds divided by the method's, both
  measured in this run and interleaved: for every seed, all measurements take turns
  batch by batch (``measure_seed``), so a slow spell of a shared machine slows them all
  alike; the table gives the ratio of the sums over seeds and the spread of the per-seed
  ratios;
* compute: block FLOPs per image actually run (blocks that ran, on the tokens that ran)
  and the equivalent NFE (the uncached NFE times the FLOPs ratio);
* quality: FID and class accuracy from ``flowdit.evaluate.evaluate_samples``; PSNR and
  SSIM against the uncached output of the same seeds (``flowdit.eval.pixel``);
* memory: bytes held in the policy's caches after a batch, and the peak CUDA memory
  when sampling on a GPU.

The honest baseline -- the uncached sampler with fewer steps (``--fewer-steps``) -- is
run too; each method is compared with that curve at the same FLOPs and at the same
wall-clock speedup (linear interpolation; "n/a" outside its range), and counts as beating
it when its FID is lower than the curve's at the same wall-clock time. Because every row
samples the same seeds and classes, FID differences are also given per seed (paired):
the method's FID minus the uncached sampler's, and minus the fewer-steps curve's at the
same time, as mean +- std over seeds. The seed-to-seed spread of FID itself is mostly
shared by all rows, so the paired spread is the one that says whether a gap is real.

Every finished seed of every measurement is saved under ``<out-dir>/<name>.cells/`` (its
images and timings, keyed by the model's weights checksum and every sampling setting); a
killed run started again with the same arguments reuses them (``--fresh`` starts over). Results go
to ``<out-dir>/<name>.{json,md,png}``.

This module is the orchestration; the pieces live beside it: ``timing`` (interleaved
measurement), ``cells`` (the resumable store), ``report`` (quality, the baseline
comparison, the table, plot and files).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flowdit.accel import FullCompute, TeaCache, build_policy, calibrate_teacache
from flowdit.accel.base import BlockPolicyBase
from flowdit.checkpoint_io import tensors_checksum
from flowdit.errors import FlowditError
from flowdit.inference import balanced_labels, generate, load_run_model

from .accel_args import DEFAULT_METHODS, add_arguments  # noqa: F401  (re-exported)
from .cells import Cells
from .machine import machine_info
from .report import plot, quality, score_rows, table_lines, write_report  # noqa: F401  (plot, quality re-exported)
from .timing import measure_interleaved


def _sample(model, meta, labels, seed, policy, args, steps, device, first_index=0):
    """One batch of ``labels`` sampled with ``policy`` at ``steps`` under the benchmark's settings."""
    shape = tuple(meta["data"]["shape"])
    shift = float(meta["config"]["flow"].get("shift", 1.0))
    amp = torch.bfloat16 if args.precision == "bf16" else None
    return generate(model, labels, shape, solver=args.solver, steps=steps, cfg_scale=args.cfg, shift=shift,
                    seed=seed, batch_size=args.batch_size, device=device, accel=policy, amp_dtype=amp,
                    first_index=first_index)


@dataclass
class Plan:
    """One measurement: the uncached sampler at some step count, or a policy at ``args.steps``."""

    name: str
    spec: str | None
    steps: int
    kind: str  # "reference", "fewer_steps" or "cache"
    policy: BlockPolicyBase

    @property
    def method(self) -> str:
        if self.kind == "fewer_steps":
            return f"uncached, {self.steps} steps"
        return self.spec or "uncached"


def measure_seed(model, meta, labels, seed, plans, args, device) -> dict[str, dict]:
    """Sample one seed with every measurement in ``plans``, interleaved; time and count each.

    The samples are drawn ``args.batch_size`` at a time and the measurements take turns
    on each batch (in alternating order), so a slow or fast spell of a shared machine
    falls on every measurement alike instead of on whichever ran during it. Each batch
    uses the noise of its own sample indices, so the images do not depend on the batch
    size. Returns, per plan name, the seed's seconds, images ``[N, C, H, W]`` and the
    policy's counts (calls, full calls, block FLOPs, cache bytes, NFE).
    """
    return measure_interleaved(
        plans, labels, args.batch_size, device,
        # Looked up at call time, so that a test can stand in for the sampler.
        lambda p, batch, lo: _sample(model, meta, batch, seed, p.policy, args, p.steps, device, first_index=lo))


def combine(plan: Plan, parts: list[dict], n_images: int) -> dict:
    """One table row from the per-seed parts of a measurement (images under ``"_images"``)."""
    return {"method": plan.method, "kind": plan.kind, "policy": repr(plan.policy), "steps": plan.steps,
            "nfe": max(q["nfe"] for q in parts), "seconds": sum(q["seconds"] for q in parts),
            "seconds_per_seed": [q["seconds"] for q in parts],
            "gflops_per_image": sum(q["flops"] for q in parts) / (n_images * len(parts)) / 1e9,
            "model_calls": sum(q["calls"] for q in parts), "full_calls": sum(q["full_calls"] for q in parts),
            "cache_mb": max(q["state"] for q in parts) / 2**20,
            "peak_cuda_mb": max(q["peak"] for q in parts) / 2**20 if parts[0]["peak"] else None,
            "_images": [q["images"] for q in parts]}


def run(args: argparse.Namespace) -> Path:
    """Run the benchmark described by parsed ``args``; returns the Markdown path."""
    torch.manual_seed(0)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_run_model(args.run)
    model.to(device)
    dataset, root = meta["config"]["data"]["dataset"], meta["config"]["data"].get("root")
    seeds = [int(s) for s in str(args.seeds).split(",")]
    labels = balanced_labels(model.num_classes, args.num)
    specs = [s.strip() for s in args.methods.split(";") if s.strip()]
    fewer = sorted({int(s) for s in args.fewer_steps.split(",") if s.strip()} - {args.steps})
    # Every policy is built here, so a bad spec fails before any sampling.
    plans = [Plan(f"uncached x{args.steps}", None, args.steps, "reference", FullCompute())]
    plans += [Plan(f"uncached x{k}", None, k, "fewer_steps", FullCompute()) for k in fewer]
    plans += [Plan(f"{spec} x{args.steps}", spec, args.steps, "cache", build_policy(spec)) for spec in specs]
    info = machine_info()
    t_start = time.perf_counter()

    setting = {"weights": tensors_checksum(args.run), "solver": args.solver, "cfg": args.cfg,
               "precision": args.precision, "num": args.num, "batch_size": args.batch_size, "device": device.type}
    cells = Cells(Path(args.out_dir) / f"{args.name}.cells", setting, fresh=args.fresh)

    for p in plans:
        if isinstance(p.policy, TeaCache) and not p.policy.coeffs:
            calibrate_teacache(p.policy, lambda p=p: _sample(model, meta, labels[:1], seeds[0], p.policy, args,
                                                             p.steps, device))
    parts: dict[str, list[dict]] = {p.name: [] for p in plans}
    for s in seeds:
        todo = []
        for p in plans:
            part = cells.get(f"{p.name} | seed {s}")
            if part is None:
                todo.append(p)
            parts[p.name].append(part)
        if todo:
            t0 = time.perf_counter()
            measured = measure_seed(model, meta, labels, s, todo, args, device)
            for p in todo:
                cells.put(f"{p.name} | seed {s}", measured[p.name])
                parts[p.name][-1] = measured[p.name]
            print(f"seed {s}: {len(todo)} measurements in {time.perf_counter() - t0:.0f} s: "
                  + ", ".join(f"{p.name} {measured[p.name]['seconds']:.1f} s" for p in todo),
                  flush=True)
    rows = [combine(p, parts[p.name], len(labels)) for p in plans]
    score_rows(rows, labels, seeds, dataset, root)

    argv = sys.argv[3:] if sys.argv[1:3] == ["bench", "accel"] else sys.argv[1:]
    cmd = "flowdit bench accel " + shlex.join(argv)
    mc = meta["model_config"]
    depth = mc.get("depth", mc.get("encoder_depth", 0) + mc.get("decoder_depth", 0))  # a DDT counts both stacks
    lines = [
        f"Model: `{args.run}` (width {mc['hidden_size']}, depth {depth}, patch {mc['patch_size']}); "
        f"{args.solver}, {args.steps} steps, CFG {args.cfg:g}, {args.precision}; {args.num} samples "
        f"per seed, seeds {args.seeds}; "
        f"FID on the evaluator's features against the {dataset} training set; PSNR/SSIM against the uncached "
        "output of the same seeds.",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}"
        + (f", {info['cuda']}" if info["cuda"] else "")
        + f", load average at start {info['load_average'][0]:.2f}, commit {info['commit']}, "
        f"{time.perf_counter() - t_start:.0f} s in all. Every seed's measurements took turns batch by batch "
        f"({args.batch_size} images a batch), so that machine noise falls on all of them alike; speedup is the uncached "
        "seconds over the method's, summed over seeds, +- the std of the per-seed ratios."
        + (f" {len(cells.reused)} of {len(plans) * len(seeds)} seed measurements were reused from an earlier (interrupted or "
           "partly deleted) run of the same command, timed in that process." if cells.reused else ""),
        f"Command: `{cmd}`", "",
        "dFID columns are paired by seed (mean ± std over seeds of the per-seed difference): against the uncached "
        "sampler, and against the fewer-steps curve at the same wall-clock time; negative is better.", "",
    ]
    lines += table_lines(rows, len(seeds))
    payload = {"machine": info, "command": cmd, "batch_size": args.batch_size, "rows": rows}
    md = write_report(Path(args.out_dir), args.name, payload, lines, rows)
    print("\n".join(lines))
    print(f"\nwrote {md}, {md.with_suffix('.json')} and {md.with_suffix('.png')}")
    return md


def check(args: argparse.Namespace) -> None:
    """Reject bad numeric options before loading anything."""
    if args.num <= 0 or args.steps <= 0 or args.batch_size <= 0:
        raise FlowditError("--num, --steps and --batch-size must be positive")
