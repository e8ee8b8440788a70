"""Pin what the sampling, acceleration and editing entry points return, bit for bit.

    python benchmarks/pin_samples.py --out pins.json
    python benchmarks/pin_samples.py --out after.json --compare pins.json

Trains ``DiT-digits`` for a few steps on the embedded digits (fp32, fixed seed, one
thread: deterministic), loads it back from its run directory, then runs every solver
with and without classifier-free guidance, every block policy at its defaults and at a
non-trivial setting, the inversion round trip, RF-Edit, RF-Inversion, FlowChef and the
other restoration methods, and the reflow pair sampler, all from fixed-seed noise. Each
case is recorded as the SHA-256 of its output tensor's bytes plus its max-abs value.

``--compare OLD.json`` prints, per case, ``identical`` or the max-abs difference of the
recorded values (the digests differ) and exits 1 when a case is missing or differs by
more than ``--tol`` (1e-6). A refactor that keeps the order of operations must leave
every case identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPE = (1, 8, 8)
NUM = 20  # samples per case: two batches of a non-divisible size exercise the batching
BATCH = 12


def _load_run_model(path):
    """The library's run loader, wherever this version of the code keeps it."""
    try:
        from flowdit.inference import load_run_model
    except ImportError:
        from flowdit.train.run import load_run_model
    return load_run_model(path)


def digest(x: torch.Tensor) -> dict:
    """SHA-256 of a tensor's bytes (contiguous, on the CPU) and its max-abs value."""
    x = x.detach().cpu().contiguous()
    raw = x.view(torch.uint8) if x.dtype != torch.bool else x.to(torch.uint8)
    return {"sha256": hashlib.sha256(raw.numpy().tobytes()).hexdigest(),
            "max_abs": float(x.float().abs().max()) if x.numel() else 0.0,
            "shape": list(x.shape), "dtype": str(x.dtype)}


def train_model(run_root: Path, steps: int):
    """Train DiT-digits ``steps`` steps (fp32, seed 0) into ``run_root/pin`` and load it back."""
    from flowdit.cli import main

    argv = ["train", "--config", str(Path(__file__).parent.parent / "configs" / "digits.yaml"),
            "--no-progress", "--no-outputs", "--device", "cpu", f"out_dir={run_root}", "name=pin",
            f"train.steps={steps}", f"train.ckpt_every={steps}", "train.precision=fp32", "train.batch_size=64",
            "optim.warmup_steps=5", "train.log_every=1000", "train.sample_every=0"]
    rc = main(argv)
    if rc != 0:
        sys.exit(f"pin_samples: training failed with status {rc}")
    return _load_run_model(run_root / "pin")


def cases(model) -> dict[str, torch.Tensor]:
    """Every pinned output, by case name."""
    from flowdit.accel import build_policy
    from flowdit.accel.registry import POLICIES
    from flowdit.distill.pairs import model_sampler
    from flowdit.edit import (build_operator, invert_images, measure, regenerate_images, restore_images,
                              rf_edit, rf_inversion)
    from flowdit.sampling import ADAPTIVE_METHODS, SOLVERS
    try:
        from flowdit.inference import generate, indexed_noise
    except ImportError:  # the layout before flowdit.inference
        from flowdit.sampling.generate import generate, indexed_noise

    out: dict[str, torch.Tensor] = {}
    labels = torch.arange(NUM) % model.num_classes

    def gen(name, **kw):
        kw.setdefault("steps", 6)
        g = generate(model, labels, SHAPE, seed=3, batch_size=BATCH, **kw)
        out[name] = g.images
        out[name + " | nfe"] = torch.tensor([g.nfe])

    for solver in list(SOLVERS) + list(ADAPTIVE_METHODS):
        for cfg in (1.0, 1.5):
            gen(f"solver {solver} cfg {cfg}", solver=solver, cfg_scale=cfg, rtol=1e-4, atol=1e-4)
    gen("solver heun cfg 2 interval 0.2,0.8 shift 2", solver="heun", cfg_scale=2.0,
        guidance_interval=(0.2, 0.8), shift=2.0)
    gen("solver euler cfg 1.5 bf16", solver="euler", cfg_scale=1.5, steps=3, amp_dtype=torch.bfloat16)

    # Every policy at its defaults and at a setting that caches, forecasts or prunes often.
    settings = {
        "none": "none:cfg=split", "fora": "fora:interval=2,cache=stack", "delta_dit": "delta_dit:interval=3,blocks=2",
        "taylorseer": "taylorseer:interval=3,order=1,spaced=1,cache=stack",
        "gated_taylor": "gated_taylor:threshold=0.05,max_skip=3", "fbcache": "fbcache:threshold=0.3",
        "teacache": "teacache:threshold=0.3,coeffs=1/0", "ras": "ras:ratio=0.25,metric=l2norm,warmup=2,cfg=split",
        "tome": "tome:ratio=0.5", "grat": "grat:group=2,mode=local",
    }
    # RAS's default metric (the channel std) needs two channels; the digits have one.
    defaults = {"ras": "ras:metric=l2norm"}
    for name in POLICIES:
        for spec in (defaults.get(name, name), settings.get(name)):
            if spec is None:
                continue
            policy = build_policy(spec)
            gen(f"accel {spec} euler 12 cfg 1.5", solver="euler", steps=12, cfg_scale=1.5, accel=policy)
            st = policy.stats
            out[f"accel {spec} euler 12 cfg 1.5 | stats"] = torch.tensor(
                [st.calls, st.full_calls, st.block_evals], dtype=torch.float64)

    real = generate(model, labels, SHAPE, solver="heun", steps=8, cfg_scale=1.5, seed=11, batch_size=BATCH).images
    for solver in ("euler", "rf2", "fireflow"):
        z, nfe = invert_images(model, real, labels, solver, 6, 1.0, None, BATCH)
        x, nfe_r = regenerate_images(model, z, labels, solver, 6, 1.0, 1.0, None, BATCH)
        out[f"invert {solver}"] = z
        out[f"regenerate {solver}"] = x
        xg, _ = regenerate_images(model, z, labels, solver, 6, 2.0, 1.5, None, BATCH)
        out[f"regenerate {solver} cfg 1.5 shift 2"] = xg
        out[f"invert {solver} | nfe"] = torch.tensor([nfe, nfe_r])
    zn, _ = invert_images(model, real, None, "rf2", 4, 1.0, None, BATCH)
    out["invert rf2 null class"] = zn

    target = (labels + 3) % model.num_classes
    for solver, inject, cfg in (("rf2", 2, 1.0), ("fireflow", 3, 1.5), ("euler", 0, 1.0)):
        res = rf_edit(model, real, labels, target, inject, solver, 6, 1.0, None, cfg, None, BATCH)
        out[f"rf_edit {solver} inject {inject} cfg {cfg}"] = res.images
        out[f"rf_edit {solver} inject {inject} cfg {cfg} | noise"] = res.noise
    res = rf_edit(model, real, None, target, 2, "rf2", 6, 1.0, [0, 2], 1.0, None, BATCH)
    out["rf_edit rf2 blocks 0,2 null source"] = res.images
    for gamma, eta, cfg in ((0.5, 0.9, 1.0), (0.3, 0.6, 1.5)):
        res = rf_inversion(model, real, labels, target, gamma, eta, (0, 3), "euler", 8, 1.0, cfg, 5, None, None, BATCH)
        out[f"rf_inversion gamma {gamma} eta {eta} cfg {cfg}"] = res.images

    noise = indexed_noise(range(NUM), SHAPE, 7)
    for task in ("inpaint", "sr2", "deblur"):
        op = build_operator(task, SHAPE, NUM, seed=1)
        y = measure(op, real, 0.05, seed=1)
        # The replacement baseline needs a pseudo-inverse, which deblurring has not.
        for method in ("flowchef", "unguided") + (("baseline",) if task != "deblur" else ()):
            x, nfe = restore_images(model, y, op, noise, None, method, 8, 1.0, 1.0, None, BATCH)
            out[f"restore {task} {method}"] = x
        x, _ = restore_images(model, y, op, noise, labels, "flowchef", 8, 1.0, 0.5, None, BATCH, guide_last_step=True)
        out[f"restore {task} flowchef labels step 0.5 last step"] = x

    for solver, cfg in (("rf2", 1.5), ("euler", 1.0)):
        fn = model_sampler(model, solver=solver, steps=4, cfg_scale=cfg)
        out[f"pairs {solver} cfg {cfg}"] = fn(noise, labels)
    out["pairs euler unlabelled"] = model_sampler(model, solver="euler", steps=4, cfg_scale=1.5)(noise, None)
    return out


def compare(new: dict, old: dict, tol: float) -> int:
    """Print per case identical / max-abs difference; the number of cases beyond ``tol``."""
    bad = 0
    for name in sorted(set(old) | set(new)):
        if name not in new or name not in old:
            print(f"MISSING   {name} ({'not in new' if name not in new else 'not in old'})")
            bad += 1
            continue
        a, b = new[name], old[name]
        if a["sha256"] == b["sha256"]:
            print(f"identical {name}")
            continue
        diff = a.get("diff_vs_old")
        shown = "n/a" if diff is None else f"{diff:.3g}"
        print(f"DIFFERENT {name}: max-abs diff {shown} (max-abs {a['max_abs']:.6g} vs {b['max_abs']:.6g})")
        if diff is None or diff > tol:
            bad += 1
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output JSON of {case: sha256, max-abs}")
    ap.add_argument("--compare", help="an earlier output JSON to compare with")
    ap.add_argument("--tol", type=float, default=1e-6, help="largest allowed max-abs difference")
    ap.add_argument("--train-steps", type=int, default=50, help="training steps of the pinned model")
    ap.add_argument("--keep-tensors", help="also save every output tensor to this .pt")
    ap.add_argument("--compare-tensors", help="the tensors an earlier run kept (--keep-tensors): gives the "
                                              "max-abs difference of a case whose digest changed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, meta = train_model(Path(tmp), args.train_steps)
    torch.manual_seed(0)
    results = cases(model)
    # The weights themselves: training and loading are part of what is pinned.
    flat = torch.cat([p.detach().flatten() for p in model.state_dict().values()])
    results = {"model weights": flat, **results}
    record = {name: digest(x) for name, x in results.items()}
    if args.compare_tensors:
        old_tensors = torch.load(args.compare_tensors, weights_only=True)
        for name, x in results.items():
            if name in old_tensors and old_tensors[name].shape == x.shape:
                record[name]["diff_vs_old"] = float((x.double() - old_tensors[name].double()).abs().max())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cases": record, "seconds": round(time.perf_counter() - t0, 1),
                                          "torch": torch.__version__}, indent=1, sort_keys=True) + "\n")
    if args.keep_tensors:
        torch.save({k: v.detach().cpu() for k, v in results.items()}, args.keep_tensors)
    print(f"pin_samples: {len(record)} cases in {time.perf_counter() - t0:.0f} s -> {args.out}")
    if args.compare:
        old = json.loads(Path(args.compare).read_text())["cases"]
        bad = compare(record, old, args.tol)
        same = sum(1 for k in record if k in old and record[k]["sha256"] == old[k]["sha256"])
        print(f"pin_samples: {same} of {len(old)} cases identical, {bad} beyond {args.tol:g}")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
