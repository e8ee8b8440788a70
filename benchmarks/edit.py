"""Inversion, editing and restoration on a trained class-conditional model, scored on
the data set's test images with the shipped evaluator network.

    python benchmarks/edit.py --run runs/mnist --num 1000 --seed 0

(a) Reconstruction: invert each test image (unguided, under its label) and regenerate;
    PSNR / SSIM to the input against the total NFE of the round trip, for Euler,
    RF-Solver-2 and FireFlow.
(b) Editing: invert under the image's class, regenerate under another class (seeded,
    uniform over the other classes). RF-Edit for each number of injection steps k
    (k = 0 is plain inversion + regeneration), plus RF-Inversion rows. Target-class
    accuracy (evaluator) against faithfulness to the source: PSNR / SSIM and the L2
    distance of evaluator features.
(c) Restoration: per task (box / random inpainting, x2 / x4 super-resolution, Gaussian
    deblur), FlowChef against unguided sampling and the replacement baseline (where the
    operator has a pseudo-inverse): PSNR / SSIM to the clean image, seconds and peak
    memory per image (CUDA: allocator peak; CPU: resident-set peak above the start of
    the cell, sampled every 2 ms).
(d) FlowChef classifier guidance with the guide network on null-class samples:
    evaluator accuracy of the steered class against the guidance scale.

Writes ``benchmarks/results/<name>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from contextlib import contextmanager

import torch

from common import machine_info, write_results
from flowdit.data import build_dataset
from flowdit.edit import (
    build_operator,
    classifier_guided_sample,
    invert_images,
    measure,
    model_velocity,
    regenerate_images,
    restore_images,
    rf_edit,
    rf_inversion,
)
from flowdit.eval.evaluator import load_classifier, predict
from flowdit.eval.pixel import psnr, ssim
from flowdit.inference import indexed_noise, load_run_model
from flowdit.sampling.solvers import build_solver
from flowdit.utils.precision import autocast_dtype

LABELS = {"euler": "Euler", "rf2": "RF-Solver-2", "fireflow": "FireFlow"}


def steps_for(solver: str, nfe: int) -> int:
    """Steps whose round-trip half (one direction) costs about ``nfe`` evaluations."""
    if solver == "fireflow":
        return max(1, nfe - 1)
    return max(1, round(nfe / build_solver(solver).nfe_per_step))


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose ``mb`` is set to the peak memory of the block (see module docstring)."""
    out = {"mb": None}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield out
        torch.cuda.synchronize()
        out["mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base, peak, stop = rss(), [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            stop.wait(0.002)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        yield out
    finally:
        stop.set()
        th.join()
        out["mb"] = max(0, max(peak[0], rss()) - base) / 2**20


def faithfulness(evaluator, out, src, target):
    out = out.clamp(-1, 1)
    f_out, logits = predict(evaluator, out)
    f_src, _ = predict(evaluator, src)
    return {"target_accuracy": float((logits.argmax(1) == target).float().mean()),
            "psnr": float(psnr(out, src).mean()), "ssim": float(ssim(out, src).mean()),
            "feature_distance": float((f_out - f_src).norm(dim=1).mean())}


def plot(payload, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    rec = payload["reconstruction"]
    for solver in dict.fromkeys(r["solver"] for r in rec):
        pts = sorted((r for r in rec if r["solver"] == solver), key=lambda r: r["nfe"])
        axes[0].plot([p["nfe"] for p in pts], [p["psnr"] for p in pts], marker="o", ms=3, label=LABELS.get(solver, solver))
    axes[0].set(xscale="log", xlabel="NFE (inversion + regeneration)", ylabel="PSNR (dB)", title="(a) reconstruction")
    axes[0].legend(fontsize=8)
    ed = payload["editing"]
    plain = [r for r in ed if r["method"] == "rf-edit" and r["inject_steps"] == 0]
    for spec in dict.fromkeys(r["blocks"] for r in ed if r["method"] == "rf-edit"):
        rfe = sorted(plain + [r for r in ed if r["method"] == "rf-edit" and r["blocks"] == spec and r["inject_steps"] > 0],
                     key=lambda r: r["inject_steps"])
        axes[1].plot([r["psnr"] for r in rfe], [100 * r["target_accuracy"] for r in rfe], marker="o",
                     label=f"RF-Edit ({spec} blocks)")
        for r in rfe:
            axes[1].annotate(f"k={r['inject_steps']}", (r["psnr"], 100 * r["target_accuracy"]), fontsize=7)
    for r in (r for r in ed if r["method"] == "rf-inversion"):
        axes[1].scatter([r["psnr"]], [100 * r["target_accuracy"]], marker="s",
                        label=f"RF-Inversion g={r['gamma']}, eta={r['eta']}")
    axes[1].set(xlabel="PSNR to source (dB)", ylabel="target-class accuracy (%)", title="(b) editing trade-off")
    axes[1].legend(fontsize=7)
    res = payload["restoration"]
    tasks = list(dict.fromkeys(r["task"] for r in res))
    methods = list(dict.fromkeys(r["method"] for r in res))
    w = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs = [i + j * w for i, t in enumerate(tasks) for r in res if r["task"] == t and r["method"] == m]
        ys = [r["psnr"] for t in tasks for r in res if r["task"] == t and r["method"] == m]
        axes[2].bar(xs, ys, width=w, label=m)
    axes[2].set_xticks([i + 0.4 - w / 2 for i in range(len(tasks))], tasks, fontsize=8)
    axes[2].set(ylabel="PSNR (dB)", title="(c) restoration")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory of the model")
    ap.add_argument("--num", type=int, default=1000, help="test images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="recon,edit,restore,cg")
    ap.add_argument("--solvers", default="euler,rf2,fireflow")
    ap.add_argument("--nfe", default="2,4,8,16,32", help="evaluations per direction (a)")
    ap.add_argument("--edit-solver", default="rf2")
    ap.add_argument("--edit-steps", type=int, default=10)
    ap.add_argument("--inject", default="0,1,2,3,4,6", help="RF-Edit injection steps k (b)")
    ap.add_argument("--edit-blocks", default="half,all",
                    help="RF-Edit block sets to sweep: half (the second half, the default) and/or all (b)")
    ap.add_argument("--edit-cfg", type=float, default=1.0, help="guidance scale of the edited regeneration (b)")
    ap.add_argument("--rf-inversion", default="0.5:0.9,0.5:0.5", help="gamma:eta pairs for RF-Inversion rows (b)")
    ap.add_argument("--eta-steps", default="0,3")
    ap.add_argument("--tasks", default="inpaint,inpaint_random,sr2,sr4,deblur")
    ap.add_argument("--restore-steps", type=int, default=20)
    ap.add_argument("--step-size", type=float, default=1.0)
    ap.add_argument("--noise-std", type=float, default=0.0)
    ap.add_argument("--cg-scales", default="0,1,3", help="classifier-guidance scales (d)")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="fp32")
    ap.add_argument("--device", default=None)
    ap.add_argument("--data-root", help="data directory (default: the run's data.root)")
    ap.add_argument("--name", default=None, help="result file name (default: <dataset>_edit)")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = autocast_dtype(args.precision, device)
    model, meta = load_run_model(args.run)
    model.to(device)
    dataset, root = meta["config"]["data"]["dataset"], args.data_root or meta["config"]["data"].get("root")
    shift = float(meta["config"]["flow"].get("shift", 1.0))
    evaluator, _ = load_classifier(dataset, "evaluator")
    guide, _ = load_classifier(dataset, "guide")
    test = build_dataset(dataset, root=root, split="test")
    n = min(args.num, len(test))
    x, y = test.batch(torch.arange(n))
    shape = tuple(x.shape[1:])
    K = model.num_classes
    info = machine_info()
    parts = set(args.parts.split(","))
    bs = args.batch_size
    t_start = time.perf_counter()
    payload = {"machine": info, "command": "python benchmarks/edit.py " + " ".join(sys.argv[1:]), "num": n,
               "seed": args.seed, "run": args.run, "precision": args.precision, "device": str(device),
               "reconstruction": [], "editing": [], "restoration": [], "classifier_guidance": []}

    if "recon" in parts:
        for solver in args.solvers.split(","):
            done = set()
            for nfe in [int(v) for v in args.nfe.split(",")]:
                steps = steps_for(solver, nfe)
                if steps in done:
                    continue
                done.add(steps)
                t0 = time.perf_counter()
                z, n1 = invert_images(model, x, y, solver, steps, shift, amp, bs, device)
                rec, n2 = regenerate_images(model, z, y, solver, steps, shift, 1.0, amp, bs, device)
                secs = time.perf_counter() - t0
                rec = rec.clamp(-1, 1)
                r = {"solver": solver, "steps": steps, "nfe": n1 + n2, "psnr": float(psnr(rec, x).mean()),
                     "ssim": float(ssim(rec, x).mean()), "seconds_per_image": secs / n}
                payload["reconstruction"].append(r)
                print(f"(a) {solver:8s} steps {steps:3d} NFE {r['nfe']:3d}: PSNR {r['psnr']:.2f} SSIM {r['ssim']:.3f}",
                      flush=True)

    if "edit" in parts:
        g = torch.Generator().manual_seed(args.seed)
        target = (y + torch.randint(1, K, (n,), generator=g)) % K
        depth = len(model.attention_modules())
        block_sets = {"half": None, "all": list(range(depth))}
        for spec in args.edit_blocks.split(","):
            if spec not in block_sets:
                raise SystemExit(f"--edit-blocks: unknown block set {spec!r}; valid: half, all")
            injects = [int(v) for v in args.inject.split(",")]
            for k in injects if spec == args.edit_blocks.split(",")[0] else [v for v in injects if v > 0]:
                t0 = time.perf_counter()
                res = rf_edit(model, x, y, target, k, args.edit_solver, args.edit_steps, shift, block_sets[spec],
                              args.edit_cfg, amp, bs, device)
                r = {"method": "rf-edit", "blocks": spec, "inject_steps": k, "solver": args.edit_solver,
                     "steps": args.edit_steps, "nfe": res.nfe_invert + res.nfe_edit,
                     "seconds_per_image": (time.perf_counter() - t0) / n, **faithfulness(evaluator, res.images, x, target)}
                payload["editing"].append(r)
                print(f"(b) RF-Edit {spec} k={k}: acc {100 * r['target_accuracy']:.1f}% PSNR {r['psnr']:.2f} "
                      f"SSIM {r['ssim']:.3f} feat {r['feature_distance']:.2f}", flush=True)
        eta_steps = tuple(int(v) for v in args.eta_steps.split(","))
        for pair in [p for p in args.rf_inversion.split(",") if p]:
            gamma, eta = (float(v) for v in pair.split(":"))
            t0 = time.perf_counter()
            res = rf_inversion(model, x, y, target, gamma, eta, eta_steps, "euler", args.edit_steps, shift,
                               args.edit_cfg, args.seed, None, amp, bs, device)
            r = {"method": "rf-inversion", "gamma": gamma, "eta": eta, "eta_steps": list(eta_steps), "solver": "euler",
                 "steps": args.edit_steps, "nfe": res.nfe_invert + res.nfe_edit,
                 "seconds_per_image": (time.perf_counter() - t0) / n, **faithfulness(evaluator, res.images, x, target)}
            payload["editing"].append(r)
            print(f"(b) RF-Inversion gamma {gamma} eta {eta}: acc {100 * r['target_accuracy']:.1f}% "
                  f"PSNR {r['psnr']:.2f} SSIM {r['ssim']:.3f}", flush=True)

    if "restore" in parts:
        noise = indexed_noise(range(n), shape, args.seed)
        for task in args.tasks.split(","):
            op = build_operator(task, shape, n, seed=args.seed)
            meas = measure(op, x, args.noise_std, seed=args.seed)
            # "flowchef+last": flowdit's variant that also guides the final step (the
            # authors' loop skips it), measured beside the faithful default.
            for label in ("flowchef", "flowchef+last", "unguided", "baseline"):
                method = label.split("+")[0]
                if method == "baseline" and op.pinv is None:
                    continue
                t0 = time.perf_counter()
                with peak_memory(device) as mem:
                    out, nfe = restore_images(model, meas, op, noise, None, method, args.restore_steps, shift,
                                              args.step_size, amp, bs, device, guide_last_step=label.endswith("+last"))
                secs = time.perf_counter() - t0
                out = out.clamp(-1, 1)
                r = {"task": task, "method": label, "steps": args.restore_steps, "nfe": nfe,
                     "noise_std": args.noise_std, "psnr": float(psnr(out, x).mean()), "ssim": float(ssim(out, x).mean()),
                     "seconds_per_image": secs / n, "peak_mb_per_image": mem["mb"] / min(bs, n)}
                payload["restoration"].append(r)
                print(f"(c) {task:14s} {label:13s}: PSNR {r['psnr']:.2f} SSIM {r['ssim']:.3f} "
                      f"{1000 * r['seconds_per_image']:.2f} ms/img {r['peak_mb_per_image']:.3f} MB/img", flush=True)

    if "cg" in parts:
        labels = torch.arange(n) % K
        noise = indexed_noise(range(n), shape, args.seed)
        for scale in [float(v) for v in args.cg_scales.split(",")]:
            outs = []
            for lo in range(0, n, bs):
                fn = model_velocity(model, None, 1.0, amp)
                res = classifier_guided_sample(fn, noise[lo:lo + bs].to(device), guide.to(device),
                                               labels[lo:lo + bs].to(device), scale, args.restore_steps, shift)
                outs.append(res.x.float().cpu().clamp(-1, 1))
            _, logits = predict(evaluator, torch.cat(outs))
            r = {"scale": scale, "steps": args.restore_steps, "nfe": args.restore_steps,
                 "class_accuracy": float((logits.argmax(1) == labels).float().mean())}
            payload["classifier_guidance"].append(r)
            print(f"(d) guide scale {scale}: evaluator accuracy {100 * r['class_accuracy']:.1f}%", flush=True)

    name = args.name or f"{dataset}_edit"
    mc = meta["model_config"]
    lines = [f"Model: `{args.run}` ({mc['hidden_size']} wide, depth {mc['depth']}, patch {mc['patch_size']}); "
             f"{n} {dataset} test images; seed {args.seed}; precision {args.precision}; device {device}.",
             f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, load average at start "
             f"{info['load_average'][0]:.2f}, commit {info['commit']}, {time.perf_counter() - t_start:.0f} s in all.",
             f"Command: `{payload['command']}`", ""]
    if payload["reconstruction"]:
        lines += ["(a) Inversion + regeneration (unguided, under the true label)", "",
                  "| solver | steps | NFE (both ways) | PSNR dB | SSIM | s / image |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {LABELS.get(r['solver'], r['solver'])} | {r['steps']} | {r['nfe']} | {r['psnr']:.2f} | "
                  f"{r['ssim']:.3f} | {r['seconds_per_image']:.4f} |" for r in payload["reconstruction"]]
        lines.append("")
    if payload["editing"]:
        lines += [f"(b) Editing to another class ({args.edit_steps} steps, regeneration cfg {args.edit_cfg:g}; "
                  f"RF-Edit with {args.edit_solver}, values of the second half or all blocks; RF-Inversion with Euler, eta on steps {args.eta_steps})", "",
                  "| method | setting | NFE | target acc. % | PSNR to source dB | SSIM | evaluator feature dist. |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in payload["editing"]:
            setting = (f"{r['blocks']} blocks, k = {r['inject_steps']}" if r["method"] == "rf-edit"
                       else f"gamma {r['gamma']}, eta {r['eta']}")
            lines.append(f"| {r['method']} | {setting} | {r['nfe']} | {100 * r['target_accuracy']:.1f} | {r['psnr']:.2f} | "
                         f"{r['ssim']:.3f} | {r['feature_distance']:.2f} |")
        lines.append("")
    if payload["restoration"]:
        lines += [f"(c) Restoration ({args.restore_steps} Euler steps, 1 NFE each; FlowChef step size {args.step_size}; "
                  f"measurement noise std {args.noise_std}; unconditional)", "",
                  "| task | method | PSNR dB | SSIM | ms / image | peak MB / image |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['task']} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {1000 * r['seconds_per_image']:.2f} | "
                  f"{r['peak_mb_per_image']:.3f} |" for r in payload["restoration"]]
        lines.append("")
    if payload["classifier_guidance"]:
        lines += ["(d) FlowChef classifier guidance with the guide network (null-class samples, balanced targets)", "",
                  "| guide scale | evaluator accuracy % |", "| --- | --- |"]
        lines += [f"| {r['scale']:g} | {100 * r['class_accuracy']:.1f} |" for r in payload["classifier_guidance"]]
    md = write_results(name, payload, "\n".join(lines))
    if payload["reconstruction"] and payload["editing"] and payload["restoration"]:
        plot(payload, md.with_suffix(".png"))
    print("\n".join(lines))
    print(f"\nwrote {md}")


if __name__ == "__main__":
    main()
