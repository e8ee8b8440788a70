"""Post-training quantization of a trained DiT: quality, size on disk and speed per method.

    python benchmarks/compress.py --run runs/mnist --num 2000 --seeds 0,1,2 \\
        --methods fp32 bf16 torch_dynamic w8a8 rtn smoothquant lrq --name compress_mnist

Each method is a preset of ``flowdit compress quantize`` with optional overrides,
``name[:key=value,...]`` (``lrq:wbits=3,abits=4``, ``lrq:codec=uniform``,
``lrq:rotation=none``), or one of the float references: ``fp32``, ``bf16`` (bf16 autocast,
the fast float path on CPUs with native bf16) and ``torch_dynamic``
(``torch.ao.quantization.quantize_dynamic`` on the same layers: int8 weights, per-tensor
dynamic int8 activations, the library reference). All methods share one calibration
(the float model's own trajectories, a seed the evaluation does not use).

Per method: size of the stored weights on disk (the safetensors file ``flowdit compress
quantize`` writes), FID and class accuracy under the shipped evaluator (mean +- std over
seeds, class-balanced, fixed solver), PSNR of its samples to the fp32 samples of the same
noise, and time as a ratio to fp32 measured in this process with the two taking turns:
the attention + MLP linears of the blocks alone on the calibration inputs, one forward of
the whole model, and a whole ``--time-steps``-step sampling batch. Fake-quantized methods
(``kind fake``: W4, W3, ...) compute in float what a low-bit kernel would, so their times
are those of the simulation, not of a kernel; only fp32, bf16, torch_dynamic and w8a8
run as they would be deployed.

Finished cells (images and timings) are saved under ``benchmarks/results/<name>.cells/``;
a rerun with the same arguments reuses them.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from common import RESULTS, finish, machine_info, markdown_table
from flowdit.bench.cells import Cells
from flowdit.checkpoint_io import tensors_checksum
from flowdit.compress import calibrate, preset, quantize_model, target_linears
from flowdit.evaluate import evaluate_samples
from flowdit.inference import balanced_labels, generate, load_run_model
from flowdit.models.quantized import int8_backend

FLOAT = ("fp32", "bf16", "torch_dynamic")


class Float32In(torch.nn.Module):
    """Runs a float32-only module (PyTorch's dynamic int8 linear) on bf16 inputs under autocast."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.float()).to(x.dtype)


def parse_method(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    kw = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        # "none" is None (no activation quantization, no smoothing) except for rotation,
        # whose "none" is a value of its own.
        kw[k] = (None if v.lower() == "none" and k != "rotation" else int(v) if v.isdigit()
                 else float(v) if v.replace(".", "", 1).isdigit() else v)
    return name, kw


def config_of(name: str, kw: dict):
    """The preset ``name`` with ``kw`` replaced, ``None`` values included."""
    from dataclasses import fields, replace

    base = preset(name)
    bad = set(kw) - {f.name for f in fields(base)}
    if bad:
        raise SystemExit(f"--methods {name}: unknown key {sorted(bad)[0]!r}")
    return replace(base, **kw)


def build(spec: str, model, stats, tmp: Path):
    """``(model to sample, amp dtype, weight bytes on disk, config dict or None)`` of one method."""
    name, kw = parse_method(spec)
    if name == "fp32" or name == "bf16":
        path = tmp / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return model, (torch.bfloat16 if name == "bf16" else None), path.stat().st_size, None
    if name == "torch_dynamic":
        m = copy.deepcopy(model)
        for lname, lin in target_linears(m).items():
            parent, _, child = lname.rpartition(".")
            q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
            setattr(m.get_submodule(parent), child, Float32In(q[0]))
        path = tmp / "torch_dynamic.pt"
        torch.save(m.state_dict(), path)
        return m.eval(), None, path.stat().st_size, None
    cfg = config_of(name, kw)
    qmodel, spec_, tensors = quantize_model(model, cfg, stats)
    path = tmp / f"{spec.replace(':', '_').replace(',', '_').replace('=', '')}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return qmodel, None, path.stat().st_size, asdict(cfg)


def block_linears_time(model, inputs: dict[str, torch.Tensor]) -> callable:
    layers = {n: model.get_submodule(n) for n in inputs}

    def run():
        with torch.no_grad():
            for n, x in inputs.items():
                layers[n](x)
    return run


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(4.0 / mse)).mean())


def linear_inputs(model, x, t, y, names) -> dict[str, torch.Tensor]:
    """What each named linear of the float ``model`` receives in one forward of ``(x, t, y)``."""
    got = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: got.__setitem__(n, a[0].detach()))
               for n in names]
    with torch.no_grad():
        model(x, t, y)
    for h in handles:
        h.remove()
    return got


def timing(models: dict, shape, num_classes: int, batch: int, steps: int, repeats: int, names) -> dict:
    """Seconds of every method (median of ``repeats``, methods taking turns), per measure:
    the block linears on the inputs they get in one forward of ``2 * batch`` rows, that
    forward, and a ``steps``-step Euler sampling of ``batch`` images with guidance."""
    x = torch.randn(2 * batch, *shape, generator=torch.Generator().manual_seed(0))
    t = torch.rand(2 * batch, generator=torch.Generator().manual_seed(1))
    y = torch.arange(2 * batch) % (num_classes + 1)
    lin_inputs = linear_inputs(models["fp32"][0], x, t, y, names)
    labels = balanced_labels(num_classes, batch)
    fns = {}
    for name, (m, amp) in models.items():
        def fwd(m=m, amp=amp):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
                m(x, t, y)

        def smp(m=m, amp=amp):
            generate(m, labels, shape, solver="euler", steps=steps, cfg_scale=1.5, seed=7, batch_size=batch, amp_dtype=amp)

        def lin(m=m, amp=amp):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
                block_linears_time(m, lin_inputs)()
        fns[name] = {"linears": lin, "forward": fwd, "sample": smp}
    out = {n: {k: [] for k in ("linears", "forward", "sample")} for n in models}
    for kind in ("linears", "forward", "sample"):
        reps = repeats if kind != "sample" else max(2, repeats // 4)
        for n in models:  # warm-up (oneDNN prepacking, allocator)
            fns[n][kind]()
        for r in range(reps):
            for n in (list(models) if r % 2 == 0 else list(models)[::-1]):
                t0 = time.perf_counter()
                fns[n][kind]()
                out[n][kind].append(time.perf_counter() - t0)
    return {n: {k: statistics.median(v) for k, v in d.items()} | {"spread": {k: [min(v), max(v)] for k, v in d.items()}}
            for n, d in out.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--methods", nargs="+", default=["fp32", "bf16", "torch_dynamic", "w8a8", "rtn", "smoothquant", "lrq"],
                   help="methods, space-separated, each name[:key=value,...]")
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--solver", default="heun")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-steps", type=int, default=16)
    p.add_argument("--time-batch", type=int, default=32, help="images per timed batch (the model sees twice that with guidance)")
    p.add_argument("--time-steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--timing-only", action="store_true", help="skip sampling and evaluation: the table has sizes and speed-ups")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="sampling precision of the float parts of every method but fp32 (quantized layers stay exact)")
    p.add_argument("--fused", action="store_true", help="time the int8 layers with their compiled input quantization")
    p.add_argument("--name", default="compress")
    p.add_argument("--cells", help="name of the cells directory (default: --name), so tables can share cells")
    p.add_argument("--fresh", action="store_true")
    args = p.parse_args(argv)
    methods = list(dict.fromkeys(args.methods))
    for m in methods:  # validate every method before any work
        name, kw = parse_method(m)
        if name not in FLOAT:
            config_of(name, kw).validate()
    seeds = [int(s) for s in args.seeds.split(",")]
    t_start = time.perf_counter()
    load0 = machine_info().get("load_average")

    model, meta = load_run_model(args.run)
    shape = tuple(meta["data"]["shape"])
    dataset, root = meta["config"]["data"]["dataset"], meta["config"]["data"].get("root")
    labels = balanced_labels(model.num_classes, args.num)
    setting = {"model": tensors_checksum(args.run), "precision": args.precision,
               "solver": args.solver, "steps": args.steps, "cfg": args.cfg, "num": args.num,
               "calib": [args.calib_samples, args.calib_steps]}
    cells = Cells(RESULTS / f"{args.cells or args.name}.cells", setting, fresh=args.fresh)
    t0 = time.perf_counter()
    stats = calibrate(model, shape, num_samples=args.calib_samples, steps=args.calib_steps)
    calib_s = time.perf_counter() - t0

    tmp = Path(tempfile.mkdtemp(prefix="flowdit-compress-"))
    built, rows = {}, []
    for m in methods:
        t0 = time.perf_counter()
        qm, amp, nbytes, cfg = build(m, model, stats, tmp)
        built[m] = (qm, amp)
        rows.append({"method": m, "bytes": nbytes, "config": cfg, "quantize_seconds": round(time.perf_counter() - t0, 1)})
        print(f"built {m}: {nbytes / 1e6:.2f} MB", flush=True)

    fp32_images = {}
    for row in rows:
        m = row["method"]
        qm, amp = built[m]
        runs = []
        for s in ([] if args.timing_only else seeds):
            rec = cells.get(f"{m}/seed{s}")
            if rec is None:
                t0 = time.perf_counter()
                amp_s = amp if amp is not None or m == "fp32" or args.precision == "fp32" else torch.bfloat16
                gen = generate(qm, labels, shape, solver=args.solver, steps=args.steps, cfg_scale=args.cfg, seed=s,
                               batch_size=250, amp_dtype=amp_s)
                secs = time.perf_counter() - t0
                metrics = evaluate_samples(gen.images, gen.labels, dataset, root=root, seed=s)
                rec = {"images": gen.images.to(torch.float16), "metrics": metrics, "seconds": secs}
                cells.put(f"{m}/seed{s}", rec)
            if m == "fp32":
                fp32_images[s] = rec["images"]
            runs.append(rec)
            print(f"{m} seed {s}: FID {rec['metrics']['fid']:.2f}, acc {100 * rec['metrics']['class_accuracy']:.1f}",
                  flush=True)
        for k in ("fid", "class_accuracy"):
            vals = [r["metrics"][k] for r in runs]
            row[k] = statistics.mean(vals) if vals else None
            row[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        row["seeds"] = [] if args.timing_only else seeds
        row["_images"] = [r["images"] for r in runs]
    if "fp32" in built and not args.timing_only:
        for row in rows:
            row["psnr_to_fp32"] = None if row["method"] == "fp32" else statistics.mean(
                psnr(im, fp32_images[s]) for im, s in zip(row["_images"], seeds))
    for row in rows:
        row.pop("_images")

    times = None
    if not args.no_timing and "fp32" in built:
        if args.fused:
            from flowdit.models.quantized import Int8Linear
            for qm, _ in built.values():
                for mod in qm.modules():
                    if isinstance(mod, Int8Linear):
                        mod.fused = True
        times = timing(built, shape, model.num_classes, args.time_batch, args.time_steps, args.repeats, list(stats))
        for row in rows:
            t = times[row["method"]]
            row["seconds"] = {k: t[k] for k in ("linears", "forward", "sample")}
            row["speedup"] = {k: times["fp32"][k] / t[k] for k in ("linears", "forward", "sample")}

    fp_bytes = next((r["bytes"] for r in rows if r["method"] == "fp32"), None)
    fp_fid = next((r["fid"] for r in rows if r["method"] == "fp32"), None)
    lines = []
    for r in rows:
        c = r["config"]
        kind = "float" if c is None and r["method"] != "torch_dynamic" else "int8" if c is None else c["kind"]
        bits = "-" if c is None else f"W{c['wbits']}A{c['abits'] if c['abits'] else 'fp'}"
        detail = "-" if c is None else f"{c['codec']}, rot {c['rotation']}, smooth {c['smooth_alpha']}"
        sp = r.get("speedup")
        sp_cells = " | ".join("-" if sp is None else f"{sp[k]:.2f}x" for k in ("linears", "forward", "sample"))
        dfid = "-" if fp_fid is None or r["method"] == "fp32" else f"{100 * (r['fid'] - fp_fid) / fp_fid:+.1f}%"
        fid = "-" if r["fid"] is None else f"{r['fid']:.2f} ± {r['fid_std']:.2f}"
        acc = "-" if r["class_accuracy"] is None else f"{100 * r['class_accuracy']:.1f}"
        ps = r.get("psnr_to_fp32")
        lines.append(f"| {r['method']} | {kind} | {bits} | {detail} | {r['bytes'] / 1e6:.2f} "
                     f"| {fid} | {dfid} | {acc} "
                     f"| {'-' if ps is None else f'{ps:.1f}'} | {sp_cells} |")
    table = markdown_table("| method | kind | bits | weights, rotation, smoothing | MB on disk | FID | FID vs fp32 "
                           "| class acc. % | PSNR to fp32 (dB) | linears speed-up | forward speed-up | "
                           f"{args.time_steps}-step sampling speed-up |", lines)
    mach = machine_info()
    quality = ("no sampling (--timing-only); " if args.timing_only else
               f"{args.num} samples per seed, seeds {args.seeds}, ")
    head = (f"Model: `{args.run}`; {quality}{args.solver} {args.steps} steps, "
            f"CFG {args.cfg}, sampled in {args.precision} (fp32 row: fp32; quantized layers exact in float32); calibration {args.calib_samples} trajectories of {args.calib_steps} steps "
            f"({calib_s:.0f} s). fp32 weights {fp_bytes / 1e6 if fp_bytes else float('nan'):.2f} MB.\n"
            f"Machine: {mach.get('cpu')}, {mach.get('torch_threads')} threads, torch "
            f"{torch.__version__}, int8 backend {int8_backend()}, load average at start {load0}. Speed-ups are fp32 "
            f"time / method time (float parts of quantized models in fp32{', int8 input quantization compiled' if args.fused else ''}), medians of {args.repeats} turns ({max(2, args.repeats // 4)} for sampling), batch "
            f"{args.time_batch} images ({2 * args.time_batch} rows with guidance).\n")
    payload = {"rows": rows, "times": times, "calibration_seconds": calib_s, "seconds": time.perf_counter() - t_start}
    finish(args.name, "compress.py", argv, payload, head + "\n" + table)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
