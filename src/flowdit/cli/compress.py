"""``flowdit compress quantize|prune|adapt``: a quantized, depth-pruned or adapted copy of a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from .common import (_check_solver, _non_negative_float, _non_negative_int, _positive_float, _positive_int,
                     _seed, command)


# Not a string, so argparse does not convert it: "not given" (the preset's value) differs
# from "none" (no activation quantization, no smoothing).
_PRESET = object()


def _bits_or_none(text: str):
    if text.strip().lower() in ("none", "fp", "float"):
        return None
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a bit width or 'none', got {text!r}") from None
    return v


def _alpha_or_none(text: str):
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'none', got {text!r}") from None


def cmd_quantize(args: argparse.Namespace) -> int:
    import json
    import shutil
    import time

    from ..compress import calibrate, preset, quantize_model
    from ..inference import load_run_model
    from ..train.checkpoint import load_checkpoint, save_checkpoint
    from ..utils.files import atomic_write_text

    overrides = {"wbits": args.wbits, "codec": args.codec, "rotation": args.rotation, "seed": args.seed}
    cfg = preset(args.method, **overrides)
    from dataclasses import replace

    if args.abits is not _PRESET:
        cfg = replace(cfg, abits=args.abits)
    if args.smooth_alpha is not _PRESET:
        cfg = replace(cfg, smooth_alpha=args.smooth_alpha)
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"--method {args.method}: {e}") from None
    _check_solver(args.calib_solver, adaptive=False)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty; choose a new directory")
    src = load_checkpoint(args.ckpt, load_tensors_only=True)
    if src.meta.get("model_class") == "MMDiT":
        raise ConfigError(f"--ckpt {args.ckpt}: a text-to-image run; quantization takes class-conditional DiT runs")
    if "compression" in src.meta:
        raise ConfigError(f"--ckpt {args.ckpt}: already compressed; quantize the float run it came from")
    model, meta = load_run_model(args.ckpt)
    shape = tuple(meta["data"]["shape"])

    t0 = time.perf_counter()
    stats = calibrate(model, shape, num_samples=args.calib_samples, solver=args.calib_solver,
                      steps=args.calib_steps, cfg_scale=args.calib_cfg, seed=args.calib_seed)
    _, spec, tensors = quantize_model(model, cfg, stats)
    spec["calibration"] = {"samples": args.calib_samples, "solver": args.calib_solver, "steps": args.calib_steps,
                           "cfg": args.calib_cfg, "seed": args.calib_seed}
    spec["source"] = str(Path(src.path).resolve())
    seconds = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    run_cfg = Path(src.path).parent.parent / "config.yaml"
    if run_cfg.is_file():
        shutil.copyfile(run_cfg, out / "config.yaml")
    ckpt = save_checkpoint(out, src.step, {"ema": tensors}, meta=dict(src.meta, compression=spec))
    atomic_write_text(out / "compression.json", json.dumps(spec, indent=2) + "\n")
    size = (ckpt / "ema.safetensors").stat().st_size
    src_size = (Path(src.path) / "ema.safetensors").stat().st_size
    n_out = sum(1 for v in spec["layers"].values() if v["rotation"] == "outlier")
    rot = f", {n_out} of {len(spec['layers'])} layers on the outlier-aware rotation" if cfg.rotation == "ars" else ""
    abits = "float" if cfg.abits is None else cfg.abits
    print(f"flowdit: wrote {out} ({args.method}: W{cfg.wbits} A{abits}, {cfg.codec}{rot}); "
          f"weights {size / 1e6:.2f} MB vs {src_size / 1e6:.2f} MB float; {seconds:.0f} s")
    return 0


def _kept_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices like 0,2,4, got {text!r}") from None


def _source_run(path: str):
    """The float class-conditional run at ``path`` (its checkpoint), refusing the others."""
    from ..train.checkpoint import load_checkpoint

    src = load_checkpoint(path, load_tensors_only=True)
    if src.meta.get("model_class") == "MMDiT":
        raise ConfigError(f"--ckpt {path}: a text-to-image run; compression takes class-conditional DiT runs")
    if "compression" in src.meta:
        raise ConfigError(f"--ckpt {path}: already quantized; compress the float run it came from")
    return src


def cmd_prune(args: argparse.Namespace) -> int:
    import json
    import shutil

    from ..compress.depth import FlowStream, keep_blocks
    from ..compress.prune import PruneConfig, select_blocks
    from ..checkpoint_io import latest_checkpoint
    from ..compress.recovery import RecoveryConfig, recover, recovery_setting
    from ..data import build_dataset
    from ..inference import load_run_model
    from ..train.checkpoint import load_checkpoint, save_checkpoint
    from ..utils.files import atomic_write_text

    rec = RecoveryConfig(steps=args.recover_steps, lr=args.lr, ema_decay=args.ema_decay, ckpt_every=args.ckpt_every)
    cfg = PruneConfig(method=args.method, keep=args.keep, kept=args.kept, groups=args.groups,
                      search_steps=args.search_steps, importance_inputs=args.importance_inputs,
                      batch_size=args.batch_size, seed=args.seed, recovery=rec)
    out = Path(args.out)
    selection_file = out / "selection.json"
    resuming = out.exists() and any(out.iterdir())
    if resuming and not args.resume:
        raise ConfigError(f"--out {out}: exists and is not empty; choose a new directory (or --resume it)")
    if resuming and not selection_file.is_file():
        raise ConfigError(f"--out {out}: not a pruning run of flowdit compress prune (no selection.json)")
    src = _source_run(args.ckpt)
    model, meta = load_run_model(args.ckpt)
    try:
        cfg.validate(len(model.blocks))
    except ConfigError as e:
        raise ConfigError(f"--method {args.method}: {e}") from None
    data = meta["config"]["data"]
    dataset = build_dataset(data["dataset"], root=args.data_root or data.get("root"), split="train",
                            image_size=data.get("image_size"), channels=data.get("channels"))

    if resuming:
        selection = json.loads(selection_file.read_text())
        if selection.get("method") != args.method or selection.get("keep") != (cfg.keep or len(cfg.kept)):
            raise ConfigError(f"--out {out}: holds a {selection.get('method')} pruning to "
                              f"{selection.get('keep')} blocks; resume it with the same --method and --keep")
    else:
        selection = select_blocks(model, dataset, meta, cfg, progress=not args.no_progress)
        selection.update(method=args.method, keep=len(selection["kept"]), depth=len(model.blocks),
                         source=str(Path(src.path).resolve()))
        out.mkdir(parents=True, exist_ok=True)
        run_cfg = Path(src.path).parent.parent / "config.yaml"
        if run_cfg.is_file():
            shutil.copyfile(run_cfg, out / "config.yaml")
        atomic_write_text(selection_file, json.dumps(selection, indent=2) + "\n")
    kept = selection["kept"]
    print(f"flowdit: keeping blocks {kept} of {len(model.blocks)} ({args.method}, {selection['seconds']:.0f} s)",
          flush=True)
    student = keep_blocks(model, kept)
    new_meta = dict(src.meta, model_config=student.config_dict(),
                    pruning={"method": args.method, "kept": kept, "depth": len(model.blocks),
                             "source": selection["source"]})
    stream = FlowStream.of_run(dataset, meta, batch_size=args.batch_size, seed=args.seed)
    new_meta["pruning"]["setting"] = setting = recovery_setting(kept, rec, stream)
    resume = None
    if latest_checkpoint(out) is not None:
        ck = load_checkpoint(out)
        if ck.meta.get("pruning", {}).get("setting") != setting:
            raise ConfigError(f"--out {out}: holds a recovery with other settings (steps, lr, batch, seed); "
                              "resume it with the same flags or choose a new --out")
        resume = (ck.tensors, ck.trainer_state)

    def save(step: int, tensors: dict, state: dict) -> None:
        save_checkpoint(out, step, tensors, trainer_state=state, meta=new_meta, keep_last=2)

    _, _, log = recover(student, model, kept, stream, rec, save=save, resume=resume, progress=not args.no_progress)
    final = latest_checkpoint(out)
    params = lambda m: sum(p.numel() for p in m.parameters())
    tail = f"; recovery loss {log[-1]['loss']:.4f} after {rec.steps} steps" if log else ""
    print(f"flowdit: wrote {out} ({len(kept)} of {len(model.blocks)} blocks, {params(student) / 1e6:.2f}M of "
          f"{params(model) / 1e6:.2f}M parameters{tail}; {final.name})")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    import json
    import shutil

    import torch

    from ..checkpoint_io import latest_checkpoint
    from ..compress.adapt import AdaptConfig, adapt, adapt_setting, stored_model
    from ..compress.depth import FlowStream
    from ..data import build_dataset
    from ..data.base import ImageDataset
    from ..inference import load_run_model
    from ..train.checkpoint import load_checkpoint, save_checkpoint
    from ..utils.files import atomic_write_text

    cfg = AdaptConfig(method=args.method, rank=args.rank, steps=args.steps, lr=args.lr,
                      warmup_steps=args.warmup_steps, ema_decay=args.ema_decay, ckpt_every=args.ckpt_every)
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"--method {args.method}: {e}") from None
    out = Path(args.out)
    resuming = out.exists() and any(out.iterdir())
    if resuming and not args.resume:
        raise ConfigError(f"--out {out}: exists and is not empty; choose a new directory (or --resume it)")
    src = _source_run(args.ckpt)
    if "adapter" in src.meta or "pruning" in src.meta:
        raise ConfigError(f"--ckpt {args.ckpt}: already adapted or pruned; adapt the run it came from")
    model, meta = load_run_model(args.ckpt)
    mc = meta["model_config"]
    data = build_dataset(args.dataset, root=args.data_root, split="train")
    shape = tuple(meta["data"]["shape"])
    if tuple(data.images.shape[1:]) != shape:
        raise ConfigError(f"--dataset {args.dataset}: images {tuple(data.images.shape[1:])} do not match the "
                          f"model's {shape}")
    if args.classes is not None:
        keep = [c for c in args.classes if 0 <= c < data.num_classes]
        if len(keep) != len(args.classes):
            raise ConfigError(f"--classes: labels must lie in [0, {data.num_classes}) for {args.dataset}")
        mask = torch.isin(data.labels, torch.tensor(keep))
        data = ImageDataset(data.images[mask].contiguous(), data.labels[mask].contiguous(), data.num_classes,
                            data.class_names, data.name, data.split)
    if data.num_classes > mc["num_classes"]:
        raise ConfigError(f"--dataset {args.dataset}: {data.num_classes} classes, the model has {mc['num_classes']}")
    stream = FlowStream.of_run(data, meta, batch_size=args.batch_size, seed=args.seed)
    setting = adapt_setting(cfg, stream) | {"dataset": args.dataset, "classes": args.classes}
    resume = None
    if resuming:
        if latest_checkpoint(out) is None:
            raise ConfigError(f"--out {out}: holds no adaptation checkpoint to resume")
        ck = load_checkpoint(out)
        if "trained_parameters" in ck.meta.get("adapting", {}):
            raise ConfigError(f"--out {out}: this adaptation is complete; nothing to resume")
        if ck.meta.get("adapting", {}).get("setting") != setting:
            raise ConfigError(f"--out {out}: holds an adaptation with other settings (method, rank, steps, lr, "
                              "data, batch, seed); resume it with the same flags or choose a new --out")
        resume = (ck.tensors, ck.trainer_state)
    else:
        out.mkdir(parents=True, exist_ok=True)
        run_cfg = Path(src.path).parent.parent / "config.yaml"
        if run_cfg.is_file():
            shutil.copyfile(run_cfg, out / "config.yaml")
    source = str(Path(src.path).resolve())
    data_meta = dict(meta["data"], name=args.dataset, classes=args.classes)
    # Intermediate checkpoints keep the adapters unmerged so a resumed run continues exactly;
    # the final one is stored in the form samplers load (stored_model).
    work_meta = dict(src.meta, data=data_meta, adapting={"setting": setting, "source": source})

    def save(step: int, tensors: dict, state: dict) -> None:
        if step < cfg.steps:
            save_checkpoint(out, step, tensors, trainer_state=state, meta=work_meta, keep_last=2)

    adapted, ema, log, layers = adapt(model, stream, cfg, save=save, resume=resume, progress=not args.no_progress)
    n_trained = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    final_ema, spec = stored_model(ema, cfg, layers)
    final_model, _ = stored_model(adapted, cfg, layers)
    info = {"method": cfg.method, "rank": cfg.rank, "trained_parameters": n_trained, "source": source,
            "setting": setting, "final_loss": log[-1]["loss"] if log else None}
    final_meta = dict(src.meta, data=data_meta, adapting=info)
    if spec is not None:
        final_meta["adapter"] = spec
    save_checkpoint(out, cfg.steps, {"model": final_model.state_dict(), "ema": final_ema.state_dict()},
                    meta=final_meta, keep_last=2)
    atomic_write_text(out / "adapt.json", json.dumps(info, indent=2) + "\n")
    total = sum(p.numel() for p in final_ema.parameters())
    print(f"flowdit: wrote {out} ({cfg.method}: {n_trained:,} trained parameters of {total:,}; "
          f"loss {info['final_loss']:.4f} after {cfg.steps} steps)")
    return 0


def add_parsers(sub) -> None:
    """Register this module's commands on the ``flowdit`` subparsers ``sub``."""
    c = command(sub, "compress", help="compress or adapt a trained run (post-training quantization, depth pruning, Diffscaler)")
    csub = c.add_subparsers(dest="compress_command", required=True, metavar="ACTION")
    q = command(csub, "quantize", help="quantize a run's transformer blocks",
                description="Calibrate on the model's own sampling trajectories, quantize the attention and MLP "
                            "linears of every block, and write a new run directory that sample, evaluate and the "
                            "benchmarks load like any run. Methods: w8a8 (SmoothQuant + real int8 matmuls), rtn "
                            "(uniform round-to-nearest with clipping search), smoothquant, lrq (LRQ-DiT: twin-log "
                            "weights, adaptive rotation).")
    q.add_argument("--ckpt", required=True, help="run directory or checkpoint directory of the float model")
    q.add_argument("--out", required=True, help="new run directory to write (must not exist or be empty)")
    q.add_argument("--method", default="w8a8", choices=["w8a8", "rtn", "smoothquant", "lrq"], help="method preset")
    q.add_argument("--wbits", type=_positive_int, help="weight bits (default: the preset's; w8a8 is 8)")
    q.add_argument("--abits", type=_bits_or_none, default=_PRESET,
                   help="activation bits or 'none' for weight-only (default: the preset's, 8)")
    q.add_argument("--codec", choices=["uniform", "twin_log", "twin_log_own"],
                   help="weight quantizer (default: the preset's; twin_log_own is flowdit's variant)")
    q.add_argument("--rotation", choices=["none", "hadamard", "ars"], help="input rotation (default: the preset's)")
    q.add_argument("--smooth-alpha", type=_alpha_or_none, default=_PRESET, help="SmoothQuant alpha or 'none' (default: the preset's)")
    q.add_argument("--calib-samples", type=_positive_int, default=64, help="calibration images (trajectories)")
    q.add_argument("--calib-steps", type=_positive_int, default=16, help="solver steps of each calibration trajectory")
    q.add_argument("--calib-solver", default="heun", help="fixed-step solver of the calibration trajectories")
    q.add_argument("--calib-cfg", type=_non_negative_float, default=1.5, help="guidance scale during calibration")
    q.add_argument("--calib-seed", type=_seed, default=1234, help="noise seed of the calibration trajectories")
    q.add_argument("--seed", type=_seed, help="seed of the random rotations")
    q.set_defaults(func=cmd_quantize)

    p = command(csub, "prune", help="remove transformer blocks of a run, then recover by distillation",
                description="Choose the blocks to keep (tinyfusion: learned Gumbel-softmax gates with LoRA; "
                            "importance: ShortGPT block influence; oracle: the subset of lowest loss before "
                            "recovery; index: --kept), copy them into a shallower DiT, and recover it by "
                            "TinyFusion's masked knowledge distillation from the full model. Writes a run directory "
                            "every sampler loads; a killed recovery resumes with --resume.")
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint directory of the float model")
    p.add_argument("--out", required=True, help="new run directory to write (must not exist or be empty)")
    from ..compress.prune import PRUNE_METHODS

    p.add_argument("--method", default="tinyfusion", choices=list(PRUNE_METHODS),
                   help="how the kept blocks are chosen")
    p.add_argument("--keep", type=_positive_int, help="number of blocks to keep (all methods but index)")
    p.add_argument("--kept", type=_kept_list, help="blocks to keep for --method index, e.g. 0,2,4")
    p.add_argument("--groups", help="TinyFusion's N:M groups, e.g. 1:2 (default: one group KEEP:DEPTH)")
    p.add_argument("--search-steps", type=_positive_int, default=500, help="TinyFusion gate-training steps")
    p.add_argument("--importance-inputs", choices=["clean", "noised"], default="clean",
                   help="what the block-importance score is measured on (clean: TinyFusion's script)")
    p.add_argument("--recover-steps", type=_non_negative_int, default=1000, help="masked-KD recovery steps (0: none)")
    p.add_argument("--lr", type=_positive_float, default=2e-4, help="recovery learning rate (cosine to half)")
    p.add_argument("--ema-decay", type=_non_negative_float, default=0.999, help="EMA of the recovered weights")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="batch of the search and the recovery")
    p.add_argument("--ckpt-every", type=_positive_int, default=250, help="recovery checkpoint interval")
    p.add_argument("--data-root", help="the run's data directory, if it moved")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the data streams and the gate noise")
    p.add_argument("--resume", action="store_true", help="continue the recovery found in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prune)

    a = command(csub, "adapt", help="adapt a run to a new data set with few trained parameters (Diffscaler)",
                description="Train Diffscaler's Affiners (affiner), LoRA (lora) or every weight (full) of a run on "
                            "a new data set with the run's flow-matching loss. Writes a run directory every sampler "
                            "loads (LoRA merged into the weights, Affiners rebuilt from the manifest); a killed run "
                            "resumes with --resume.")
    a.add_argument("--ckpt", required=True, help="run directory or checkpoint directory of the trained model")
    a.add_argument("--out", required=True, help="new run directory to write (must not exist or be empty)")
    from ..compress.adapt import ADAPT_METHODS

    a.add_argument("--method", default="affiner", choices=list(ADAPT_METHODS), help="what is trained")
    a.add_argument("--dataset", required=True, help="the new data set (digits, mnist, folder, shapes)")
    a.add_argument("--data-root", help="its directory (mnist, folder)")
    a.add_argument("--classes", type=_kept_list, help="train only on these labels, e.g. 0,1,2")
    a.add_argument("--rank", type=_positive_int, default=8, help="the Affiner's (or LoRA's) rank")
    a.add_argument("--steps", type=_positive_int, default=1000, help="training steps")
    a.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate (after warm-up)")
    a.add_argument("--warmup-steps", type=_non_negative_int, default=50, help="linear warm-up steps")
    a.add_argument("--ema-decay", type=_non_negative_float, default=0.999, help="EMA of the trained weights")
    a.add_argument("--batch-size", type=_positive_int, default=128, help="training batch")
    a.add_argument("--ckpt-every", type=_positive_int, default=250, help="checkpoint interval")
    a.add_argument("--seed", type=_seed, default=0, help="seed of the data stream")
    a.add_argument("--resume", action="store_true", help="continue the adaptation found in --out")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    a.set_defaults(func=cmd_adapt)
