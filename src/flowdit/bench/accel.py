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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flowdit.accel import FullCompute, TeaCache, build_policy, calibrate_teacache
from flowdit.accel.base import BlockPolicyBase
from flowdit.errors import FlowditError

from .accel_args import DEFAULT_METHODS, add_arguments  # noqa: F401  (re-exported)
from .machine import machine_info



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample(model, meta, labels, seed, policy, args, steps, device, first_index=0):
    from flowdit.sampling.generate import generate

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
    parts = {p.name: {"seconds": 0.0, "images": [], "nfe": 0, "state": 0, "peak": 0} for p in plans}
    for p in plans:
        p.policy.reset_stats()
    for b, lo in enumerate(range(0, len(labels), args.batch_size)):
        batch = labels[lo:lo + args.batch_size]
        for p in plans if b % 2 == 0 else plans[::-1]:
            part = parts[p.name]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            gen = _sample(model, meta, batch, seed, p.policy, args, p.steps, device, first_index=lo)
            _sync(device)
            part["seconds"] += time.perf_counter() - t0
            if device.type == "cuda":
                part["peak"] = max(part["peak"], torch.cuda.max_memory_allocated(device))
            part["images"].append(gen.images)
            part["nfe"] = max(part["nfe"], gen.nfe)
            part["state"] = max(part["state"], p.policy.state_bytes())
    for p in plans:
        part = parts[p.name]
        part["images"] = torch.cat(part["images"])
        st = p.policy.stats
        part.update(flops=st.flops, calls=st.calls, full_calls=st.full_calls)
    return parts


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


class Cells:
    """Finished measurements of one benchmark, saved so that a killed run resumes.

    One file per measurement and seed, ``<dir>/<key hash>.pt``, holding its timings, counts
    and images; written to a temporary name and renamed, so a file is whole or absent.
    The key is the measurement's own name (with the seed) plus ``setting`` (model checksum,
    sampler, guidance, precision, sample count, batch size), so a changed setting never
    reuses a cell, while a run with more seeds reuses the seeds it shares.
    """

    def __init__(self, directory: Path, setting: dict, fresh: bool = False):
        self.dir, self.setting = directory, setting
        self.reused: list[str] = []
        if fresh and directory.is_dir():
            for f in directory.glob("*.pt"):
                f.unlink()

    def _path(self, name: str) -> Path:
        key = json.dumps({"name": name, **self.setting}, sort_keys=True)
        return self.dir / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"

    def get(self, name: str) -> dict | None:
        path = self._path(name)
        if not path.is_file():
            return None
        try:
            rec = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged cell is measured again, not trusted
            print(f"ignoring unreadable cell {path}: {e}", file=sys.stderr, flush=True)
            return None
        if rec.get("name") != name or rec.get("setting") != self.setting:
            return None
        self.reused.append(name)
        return rec["row"]

    def put(self, name: str, row: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._path(name)
        tmp = path.with_suffix(".tmp")
        torch.save({"name": name, "setting": self.setting, "row": row}, tmp)
        os.replace(tmp, path)


def quality(row, labels, seeds, dataset, root, reference) -> None:
    """Add FID (mean, std and per seed), class accuracy, PSNR and SSIM (means over seeds) to ``row``."""
    from flowdit.eval.pixel import psnr, ssim
    from flowdit.evaluate import evaluate_samples

    fid, acc, ps, ss = [], [], [], []
    for i, (s, img) in enumerate(zip(seeds, row.pop("_images"))):
        r = evaluate_samples(img, labels, dataset, root=root, seed=s)
        fid.append(r["fid"])
        acc.append(r["class_accuracy"])
        if reference is not None:
            p = psnr(img, reference[i])
            ps.append(float(p.clamp(max=100.0).mean()))
            ss.append(float(ssim(img, reference[i]).mean()))
    row["fid_per_seed"] = fid
    row["fid"] = statistics.fmean(fid)
    row["fid_std"] = statistics.stdev(fid) if len(fid) > 1 else 0.0
    row["class_accuracy"] = statistics.fmean(acc)
    row["psnr"] = statistics.fmean(ps) if ps else None
    row["ssim"] = statistics.fmean(ss) if ss else None


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and std over seeds of the per-seed differences ``a - b``."""
    d = [x - y for x, y in zip(a, b)]
    return statistics.fmean(d), (statistics.stdev(d) if len(d) > 1 else 0.0)


def _interp(x: float, pts: list[tuple[float, float]]) -> float | None:
    pts = sorted(pts)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def plot(rows, path: Path) -> None:
    """Pareto plot: FID against block GFLOPs per image, and against the wall-clock speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    base = sorted((r for r in rows if r["kind"] != "cache"), key=lambda r: r["gflops_per_image"])
    caches = [r for r in rows if r["kind"] == "cache"]
    for ax, key, label in ((axes[0], "gflops_per_image", "block GFLOPs / image"),
                           (axes[1], "speedup", "wall-clock speedup vs uncached")):
        ax.plot([r[key] for r in base], [r["fid"] for r in base], "k-o", ms=4, label="uncached, fewer steps")
        for i, r in enumerate(caches):
            ax.plot(r[key], r["fid"], marker="os^Dv<>p*hX"[i % 11], ls="", color=f"C{i % 10}", label=r["method"])
        # log scale only when a broken method's FID is many times the others'
        fids = [r["fid"] for r in rows]
        ax.set(xlabel=label, ylabel="FID (evaluator features)", yscale="log" if max(fids) > 3 * min(fids) else "linear")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_xscale("log")
    axes[0].invert_xaxis()
    axes[1].legend(fontsize=6, loc="best")
    fig.suptitle("Training-free acceleration: FID against compute; points below the black curve beat running fewer steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> Path:
    """Run the benchmark described by parsed ``args``; returns the Markdown path."""
    from flowdit.train.outputs import balanced_labels
    from flowdit.train.run import load_run_model

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

    from flowdit.train.checkpoint import tensors_checksum

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
    ref = rows[0]
    reference = list(ref["_images"])
    for r in rows:
        quality(r, labels, seeds, dataset, root, reference)
        r["speedup"] = ref["seconds"] / r["seconds"]
        per_seed = [a / b for a, b in zip(ref["seconds_per_seed"], r["seconds_per_seed"])]
        r["speedup_std"] = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
        r["flops_ratio"] = r["gflops_per_image"] / ref["gflops_per_image"]
        r["nfe_equivalent"] = ref["nfe"] * r["flops_ratio"]
    # The honest baseline, read off at a cache's compute and at its wall-clock time.
    curve = [r for r in rows if r["kind"] != "cache"]
    for r in rows:
        # Paired by seed: the same noise and classes went into both FIDs.
        r["dfid_vs_uncached"] = _paired(r["fid_per_seed"], ref["fid_per_seed"])
        if r["kind"] == "cache":
            r["fewer_steps_fid_at_same_flops"] = _interp(r["gflops_per_image"],
                                                         [(c["gflops_per_image"], c["fid"]) for c in curve])
            at = _interp(r["speedup"], [(c["speedup"], c["fid"]) for c in curve])
            r["fewer_steps_fid_at_same_time"] = at
            r["beats_fewer_steps"] = None if at is None else r["fid"] < at
            r["dfid_vs_fewer_steps"] = None if at is None else _paired(
                r["fid_per_seed"],
                [_interp(r["speedup"], [(c["speedup"], c["fid_per_seed"][i]) for c in curve]) for i in range(len(seeds))])

    argv = sys.argv[3:] if sys.argv[1:3] == ["bench", "accel"] else sys.argv[1:]
    cmd = "flowdit bench accel " + shlex.join(argv)
    mc = meta["model_config"]
    lines = [
        f"Model: `{args.run}` (width {mc['hidden_size']}, depth {mc['depth']}, patch {mc['patch_size']}); "
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
        "| method | steps | NFE | NFE-equiv. (FLOPs) | block GFLOPs / img | speedup | FID | dFID vs uncached | "
        "class acc. % | PSNR dB | SSIM | full / all calls | cache MB | FID of fewer steps: same FLOPs | same time | "
        "dFID vs it | beats it? |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    def num(x):
        return "" if x is None else f"{x:.2f}"

    def pm(ms):
        return "" if ms is None else f"{ms[0]:+.2f} ± {ms[1]:.2f}"

    for r in rows:
        beats = {None: "n/a" if r["kind"] == "cache" else "", True: "yes", False: "no"}[r.get("beats_fewer_steps")]
        fid = f"{r['fid']:.2f}" + (f" ± {r['fid_std']:.2f}" if len(seeds) > 1 else "")
        lines.append(
            f"| {r['method']} | {r['steps']} | {r['nfe']} | {r['nfe_equivalent']:.1f} | {r['gflops_per_image']:.4f} | "
            f"{r['speedup']:.2f}x" + (f" ± {r['speedup_std']:.2f}" if len(seeds) > 1 else "") + f" | {fid} | {'' if r['kind'] == 'reference' else pm(r['dfid_vs_uncached'])} | "
            f"{100 * r['class_accuracy']:.1f} | "
            f"{'inf' if r['psnr'] is not None and r['psnr'] >= 100 else format(r['psnr'], '.1f')} | {r['ssim']:.3f} | "
            f"{r['full_calls']}/{r['model_calls']} | {r['cache_mb']:.2f} | {num(r.get('fewer_steps_fid_at_same_flops'))} | "
            f"{num(r.get('fewer_steps_fid_at_same_time'))} | {pm(r.get('dfid_vs_fewer_steps'))} | "
            f"{beats} |")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "command": cmd, "batch_size": args.batch_size, "rows": rows}
    (out / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = out / f"{args.name}.md"
    md.write_text("\n".join(lines) + "\n")
    plot(rows, md.with_suffix(".png"))
    print("\n".join(lines))
    print(f"\nwrote {md}, {md.with_suffix('.json')} and {md.with_suffix('.png')}")
    return md


def check(args: argparse.Namespace) -> None:
    """Reject bad numeric options before loading anything."""
    if args.num <= 0 or args.steps <= 0 or args.batch_size <= 0:
        raise FlowditError("--num, --steps and --batch-size must be positive")
