"""The ``flowdit`` command line: ``train``, ``sample``, ``eval``, ``evaluator train``,
``invert``, ``edit``, ``restore``, ``reflow pairs``, ``bench accel``.

Every command takes ``--help`` (each option with its default). Errors in arguments,
configs, data, checkpoints or output locations are printed as one line naming the
problem (``flowdit: error: ...``), exit status 2, and are found before any training or
sampling starts. ``flowdit train`` takes ``key=value`` overrides anywhere after the
command.
"""

from __future__ import annotations

import argparse
import errno
import math
import sys
from pathlib import Path

from . import __version__
from .errors import ConfigError, FlowditError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, unless the help already says it or
    there is none to show (a flag, or an optional value without one)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and defaults in every ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        # The same prefix as every other error, so that scripts match one pattern.
        self.exit(2, f"flowdit: error: {message} (see {self.prog} --help)\n")


# Option types: a bad value is refused by argparse with the flag's name, before any work.


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    v = _finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return v


def _non_negative_float(text: str) -> float:
    v = _finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _positive_int(text: str) -> int:
    v = _int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return v


def _non_negative_int(text: str) -> int:
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


def _seed(text: str) -> int:
    v = _int(text)
    if not 0 <= v <= 2**63 - 1:
        raise argparse.ArgumentTypeError(f"must be in 0..2**63-1, got {text!r}")
    return v


def _solvers(adaptive: bool = True) -> list[str]:
    from .sampling.sample import ADAPTIVE_METHODS
    from .sampling.solvers import SOLVERS

    return list(SOLVERS) + (list(ADAPTIVE_METHODS) if adaptive else [])


def _check_solver(name: str, adaptive: bool = True) -> None:
    valid = _solvers(adaptive)
    if name.strip().lower().replace("-", "_") not in valid:
        kind = "" if adaptive else " fixed-step"
        raise ConfigError(f"--solver {name!r}: unknown{kind} solver; valid: {', '.join(valid)}")


def _device(args: argparse.Namespace):
    from .utils.device import resolve_device

    return resolve_device(args.device)


def _check_writable(path, flag: str) -> Path:
    from .utils.files import check_writable

    return check_writable(path, flag)


def _parse_classes(text: str | None, num_classes: int, flag: str = "--classes",
                   null_class: int | None = None) -> list[int] | None:
    """Comma-separated class indices in ``0..num_classes-1`` (and the null class
    ``null_class`` where it is allowed)."""
    if text is None:
        return None
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, got {text!r}") from None
    allowed = set(range(num_classes)) | ({null_class} if null_class is not None else set())
    bad = [c for c in classes if c not in allowed]
    if bad or not classes:
        null = f", or {null_class} for the null class (unconditional)" if null_class is not None else ""
        raise ConfigError(f"{flag} {text!r}: each class must be in 0..{num_classes - 1}{null}")
    return classes


def _parse_interval(text: str | None):
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--guidance-interval must be 'lo,hi' with 0 <= lo < hi <= 1, got {text!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ConfigError(f"--guidance-interval must satisfy 0 <= lo < hi <= 1, got {text!r}")
    return lo, hi


def _run_locator(args: argparse.Namespace) -> Path:
    """The run directory ``out_dir/name`` that a train command names, read from the raw
    recipe and overrides (not validated: on --resume they only complete the saved config)."""
    from .train.config import RunConfig
    from .utils.config import apply_overrides, read_yaml

    data = apply_overrides(read_yaml(args.config), args.overrides)
    defaults = RunConfig()
    return Path(str(data.get("out_dir", defaults.out_dir))) / str(data.get("name", defaults.name))


def _print_keys() -> None:
    from .train.config import RunConfig
    from .utils.config import describe_keys

    rows = describe_keys(RunConfig)
    width = max(len(r["key"]) for r in rows)
    twidth = max(len(r["type"]) for r in rows)
    for r in rows:
        print(f"{r['key']:<{width}}  {r['type']:<{twidth}}  {r['default']!s:<20}  {r['help']}")


def cmd_train(args: argparse.Namespace) -> int:
    import os

    import yaml

    from .train.config import RunConfig
    from .train.outputs import write_run_outputs
    from .train.trainer import Trainer, saved_run_config
    from .utils.config import load_config, to_dict
    from .utils.files import DirLock

    if args.list_keys:
        _print_keys()
        return 0
    # On --resume the run's saved config is the base; the recipe's keys and the overrides are
    # laid over it, and the trainer refuses (or, when allowed, records) what they change.
    base = saved_run_config(_run_locator(args)) if args.resume else None
    cfg = load_config(RunConfig, args.config, args.overrides, base=base).resolved()
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False), end="")
        return 0
    run_dir = Path(cfg.out_dir) / cfg.name
    _device(args)  # an unavailable device is refused before the run directory is touched
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        _check_writable(run_dir, "out_dir")
    # The lock covers the final samples too; the trainer takes it again (counted) from
    # its construction to the end of fit().
    lock = DirLock(run_dir) if main_process else None
    if lock is not None:
        lock.acquire()
    try:
        trainer = Trainer(cfg, resume=args.resume, device=args.device, progress=not args.no_progress,
                          allow_config_change=args.allow_config_change, resume_fallback=args.resume_fallback)
        last = trainer.fit()
        if trainer.dist.is_main and not args.no_outputs:
            metrics = write_run_outputs(
                trainer.run_dir, trainer.ema, trainer.cfg, amp_dtype=trainer.amp_dtype, device=trainer.device,
                extra={"final_loss": last.get("loss"), "train_steps": trainer.step,
                       "params": trainer.model.param_count()},
                progress=not args.no_progress,
            )
            acc = metrics.get("class_accuracy")
            print(f"flowdit: wrote {trainer.run_dir}/samples.png, samples.npz, metrics.json"
                  + (f" (class accuracy {acc:.3f})" if acc is not None else ""))
        from .train.dist import cleanup

        cleanup(trainer.dist)
    finally:
        if lock is not None:
            lock.release()
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from .inference import generate
    from .train.outputs import balanced_labels
    from .train.run import load_run_model
    from .train.trainer import autocast_dtype
    from .utils.images import save_grid_png, save_npz

    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise FlowditError(f"--out must end in .png (a grid) or .npz (ADM layout), got {args.out!r}")
    _check_solver(args.solver)
    interval = _parse_interval(args.guidance_interval)
    _check_writable(out, "--out")
    device = _device(args)
    accel = None
    if args.accel:  # a bad spec fails before the checkpoint is read
        from .accel import build_policy

        try:
            accel = build_policy(args.accel)
        except ConfigError as e:
            raise ConfigError(f"--accel {args.accel!r}: {e}") from None
    torch.manual_seed(args.seed)
    model, meta = load_run_model(args.ckpt, use_ema=not args.no_ema)
    model.to(device)
    data = meta.get("data", {})
    shape = tuple(data.get("shape") or (model.in_channels, model.config.input_size, model.config.input_size))
    K = model.num_classes
    classes = _parse_classes(args.classes, K)
    if classes is None:
        labels = balanced_labels(K, args.num)
    else:
        labels = torch.tensor(classes).repeat_interleave(-(-args.num // len(classes)))[: args.num]
    shift = args.shift
    if shift is None:
        shift = float(meta.get("config", {}).get("flow", {}).get("shift", 1.0))
    if args.cfg is None:
        # The run's own guidance: a student trained on guided pairs (label_dropout 0) never
        # updates its null class, and a fixed default scale would guide through it.
        args.cfg = float(meta.get("config", {}).get("sample", {}).get("cfg", 1.5))
    gen = generate(model, labels, shape, solver=args.solver, steps=args.steps, cfg_scale=args.cfg,
                   guidance_interval=interval, shift=shift, seed=args.seed,
                   batch_size=args.batch_size, amp_dtype=autocast_dtype(args.precision, device),
                   device=device, progress=not args.no_progress, rtol=args.tol, atol=args.tol, accel=accel)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        nrow = args.num // len(classes) if classes and args.num % len(classes) == 0 else None
        save_grid_png(gen.images, out, nrow=nrow)
    else:
        save_npz(out, gen.images, gen.labels)
    note = ""
    if accel is not None:
        st = accel.stats
        note = (f", accel {accel!r}: {st.full_calls}/{st.calls} model calls in full, "
                f"{st.block_evals / max(st.calls, 1):.2f} of the block stack per call")
    print(f"flowdit: wrote {len(labels)} samples to {out} (solver {args.solver}, NFE {gen.nfe}, cfg {args.cfg}{note})")
    return 0


def cmd_reflow_pairs(args: argparse.Namespace) -> int:
    import torch

    from .distill.pairs import model_sampler, write_pairs
    from .train.dist import barrier, cleanup, init_distributed
    from .train.run import load_run_model
    from .train.trainer import autocast_dtype

    _check_solver(args.solver, adaptive=False)
    _check_writable(args.out, "--out")
    dist = init_distributed(args.device)
    model, meta = load_run_model(args.ckpt)
    model.to(dist.device)
    shape = tuple(meta["data"]["shape"])
    amp_dtype = autocast_dtype(args.precision, dist.device)
    fn = model_sampler(model, solver=args.solver, steps=args.steps, cfg_scale=args.cfg, amp_dtype=amp_dtype,
                       device=dist.device)
    settings = {"teacher": str(Path(args.ckpt).resolve()), "solver": args.solver, "steps": args.steps,
                "cfg": args.cfg, "precision": "bf16" if amp_dtype else "fp32"}
    torch.manual_seed(args.seed)
    write_pairs(args.out, args.num, shape, fn, num_classes=model.num_classes, seed=args.seed,
                shard_size=args.shard_size, settings=settings, rank=dist.rank, world_size=dist.world_size,
                batch_size=args.batch_size, progress=not args.no_progress and dist.is_main)
    barrier(dist)
    if dist.is_main:  # the last rank to finish may not be rank 0: close the manifest once all are done
        write_pairs(args.out, args.num, shape, fn, num_classes=model.num_classes, seed=args.seed,
                    shard_size=args.shard_size, settings=settings, progress=False)
        print(f"flowdit: wrote {args.num} pairs to {args.out} (solver {args.solver}, {args.steps} steps, "
              f"cfg {args.cfg})")
    cleanup(dist)
    return 0


def cmd_evaluator_train(args: argparse.Namespace) -> int:
    import torch

    from .data import build_dataset
    from .eval.evaluator import WEIGHTS_DIR, save_classifier, train_classifier
    from .eval.networks import NETWORKS

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in NETWORKS] or ([] if kinds else [args.kinds])
    if bad:
        raise ConfigError(f"--kinds {args.kinds!r}: unknown network kind {bad[0]!r}; valid: {', '.join(NETWORKS)}")
    if args.replace_shipped and args.out_dir:
        raise ConfigError("--replace-shipped writes the package's own weights; it does not take --out-dir")
    # The package's shipped weights are replaced only when asked for by name.
    out = WEIGHTS_DIR if args.replace_shipped else Path(args.out_dir or "evaluators")
    _check_writable(out, "--out-dir")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    train = build_dataset(args.dataset, root=_data_root(args), split="train")
    test = build_dataset(args.dataset, root=_data_root(args), split="test")
    tx, ty = train.batch(torch.arange(len(train)))
    vx, vy = test.batch(torch.arange(len(test)))
    epochs = args.epochs or (4 if args.dataset == "mnist" else 60)
    for kind in kinds:
        net, record = train_classifier(kind, tx, ty, vx, vy, train.num_classes, epochs=epochs,
                                       progress=not args.no_progress)
        path = save_classifier(net, args.dataset, record, out)
        print(f"flowdit: {args.dataset} {kind}: test accuracy {record['test_accuracy']:.4f} "
              f"({record['params']} params, {record['train_seconds']} s) -> {path}")
    if not args.replace_shipped:
        print(f"flowdit: score with these networks: flowdit eval --weights-dir {out} ...")
    return 0


def _data_root(args: argparse.Namespace, root: str | None = None) -> str | None:
    """``--data-root`` (or a run's data.root), refused up front where mnist has none."""
    import os

    from .data import MNIST_ENV

    root = args.data_root or root
    dataset = getattr(args, "dataset", None)
    if dataset == "mnist" and not root and not os.environ.get(MNIST_ENV):
        raise ConfigError(f"--dataset mnist needs the directory of its IDX files: pass --data-root DIR "
                          f"(or set {MNIST_ENV})")
    return root


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .errors import DataError
    from .evaluate import evaluate_samples
    from .train.outputs import write_json
    from .utils.images import load_npz

    src = Path(args.samples)
    meta: dict = {}
    root = None
    if src.is_dir():
        npz = src / "samples.npz"
        if (src / "metrics.json").is_file():
            try:
                meta = json.loads((src / "metrics.json").read_text())
            except (ValueError, OSError) as e:
                raise DataError(f"{src / 'metrics.json'}: unreadable ({e})") from None
        if (src / "config.yaml").is_file() and (args.dataset is None or args.data_root is None):
            import yaml

            try:
                cfg = yaml.safe_load((src / "config.yaml").read_text()) or {}
            except yaml.YAMLError:
                raise DataError(f"{src / 'config.yaml'}: not valid YAML") from None
            args.dataset = args.dataset or cfg.get("data", {}).get("dataset")
            root = cfg.get("data", {}).get("root")
    else:
        npz = src
    if args.dataset is None:
        raise ConfigError("--dataset is required when --samples is an .npz file (digits or mnist)")
    if args.dataset not in ("digits", "mnist"):
        raise ConfigError(f"--dataset {args.dataset!r}: the shipped evaluators score digits or mnist")
    root = _data_root(args, root)
    out = Path(args.out) if args.out else npz.with_suffix(".eval.json")
    _check_writable(out, "--out")
    if args.inception_weights and not Path(args.inception_weights).is_file():
        raise DataError(f"--inception-weights: Inception weights not found at {args.inception_weights}")
    images, labels = load_npz(npz)
    result = evaluate_samples(images, labels, args.dataset, root=root, seed=args.seed,
                              weights_dir=Path(args.weights_dir) if args.weights_dir else None, source=str(npz))
    if args.inception_weights:
        from .evaluate import inception_fid

        result["fid_inception"] = inception_fid(images, args.dataset, root, args.inception_weights)
    for key in ("solver", "steps", "nfe", "cfg", "seed"):
        value = getattr(args, key, None)
        result[key] = value if value is not None else meta.get(key)
    result["samples"] = str(npz)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()
             if k in ("fid", "fid_guide", "precision", "recall", "class_accuracy", "num_samples")}
    print(f"flowdit: {shown} -> {out}")
    return 0


# -- invert / edit / restore ------------------------------------------------------------


def _load_inputs(path: str, model):
    """Images ``[N, C, H, W]`` in [-1, 1] and labels (or None) from a PNG or an ADM-layout .npz,
    checked against the model's input shape (a PNG of another size is resized)."""
    import numpy as np
    import torch

    from .data import to_float
    from .errors import DataError
    from .utils.images import load_npz

    src = Path(path)
    if not src.is_file():
        raise DataError(f"input file {src} does not exist")
    C, S = model.in_channels, model.config.input_size
    if src.suffix == ".npz":
        images, labels = load_npz(src)
    elif src.suffix.lower() == ".png":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(src) as im:
                im = im.convert("L" if C == 1 else "RGB")
                if im.size != (S, S):
                    im = im.resize((S, S), Image.Resampling.LANCZOS)
                arr = np.array(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{src}: not a readable PNG ({exc})") from None
        arr = arr[None, :, :, None] if arr.ndim == 2 else arr[None]
        images, labels = to_float(torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()), None
    else:
        raise DataError(f"--input must be a .png image or an .npz (ADM layout), got {src.name!r}")
    if tuple(images.shape[1:]) != (C, S, S):
        raise DataError(f"{src}: images are {tuple(images.shape[1:])} (C, H, W) but the model takes {(C, S, S)}")
    if len(images) == 0:
        raise DataError(f"{src}: holds no images")
    return images, labels


def _labels_arg(text, n: int, num_classes: int, fallback, flag: str = "--class", allow_null: bool = True):
    """A class flag as one class for all images or a comma list of n classes; else
    ``fallback``. ``allow_null``: the null class ``num_classes`` (unconditional) is valid."""
    import torch

    if text is None:
        return fallback
    classes = _parse_classes(text, num_classes, flag, null_class=num_classes if allow_null else None)
    if len(classes) == 1:
        return torch.full((n,), classes[0], dtype=torch.long)
    if len(classes) != n:
        raise ConfigError(f"{flag} {text!r} has {len(classes)} entries for {n} images; give one or {n}")
    return torch.tensor(classes, dtype=torch.long)


def _setup(args, outputs: tuple = ()):
    """Check the solver, the output locations ``(path, flag)`` and the device, then load
    the model: ``(model, device, shift, autocast dtype)``."""
    import torch

    from .train.run import load_run_model
    from .train.trainer import autocast_dtype

    if getattr(args, "solver", None) is not None:
        _check_solver(args.solver, adaptive=False)
    for path, flag in outputs:
        if path is not None:
            _check_writable(path, flag)
    device = _device(args)
    torch.manual_seed(args.seed)
    model, meta = load_run_model(args.ckpt, use_ema=not args.no_ema)
    model.to(device)
    shift = args.shift
    if shift is None:
        shift = float(meta.get("config", {}).get("flow", {}).get("shift", 1.0))
    return model, device, shift, autocast_dtype(args.precision, device)


def _save_images(out: Path, images, labels) -> None:
    from .utils.images import save_grid_png, save_npz

    if out.suffix == ".png":
        save_grid_png(images.clamp(-1, 1), out)
    else:
        save_npz(out, images.clamp(-1, 1), labels)


def _check_out(path: str, suffixes: tuple[str, ...], flag: str = "--out") -> Path:
    out = Path(path)
    if out.suffix not in suffixes:
        raise FlowditError(f"{flag} must end in {' or '.join(suffixes)}, got {path!r}")
    return out


def cmd_invert(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .edit.inversion import invert_images, regenerate_images
    from .eval.pixel import psnr

    out = _check_out(args.out, (".npz", ".safetensors"))
    recon_out = _check_out(args.recon, (".png", ".npz"), "--recon") if args.recon else None
    model, device, shift, amp = _setup(args, ((out, "--out"), (recon_out, "--recon")))
    images, labels = _load_inputs(args.input, model)
    null = torch.full((len(images),), model.null_class, dtype=torch.long)
    labels = _labels_arg(args.classes, len(images), model.num_classes, labels if labels is not None else null)
    noise, nfe = invert_images(model, images, labels, args.solver, args.steps, shift, amp, args.batch_size, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"solver": args.solver, "steps": str(args.steps), "shift": str(shift), "input": str(args.input)}
    if out.suffix == ".npz":
        np.savez(out, noise=noise.numpy(), labels=labels.numpy(), **{k: np.array(v) for k, v in info.items()})
    else:
        from safetensors.torch import save_file

        save_file({"noise": noise.contiguous(), "labels": labels.contiguous()}, str(out), metadata=info)
    msg = f"flowdit: wrote {len(noise)} latents to {out} (solver {args.solver}, {args.steps} steps, NFE {nfe})"
    if recon_out is not None:
        recon, nfe_r = regenerate_images(model, noise, labels, args.solver, args.steps, shift, 1.0, amp,
                                         args.batch_size, device)
        _save_images(recon_out, recon, labels)
        msg += f"; regenerated to {recon_out} (NFE {nfe_r}, PSNR {psnr(recon.clamp(-1, 1), images).mean():.2f} dB)"
    print(msg)
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    import torch

    from .edit.rf_edit import rf_edit
    from .edit.rf_inversion import rf_inversion

    out = _check_out(args.out, (".png", ".npz"))
    if args.method == "rf-inversion":
        eta_steps = _eta_steps(args.eta_steps)
    model, device, shift, amp = _setup(args, ((out, "--out"),))
    images, labels = _load_inputs(args.input, model)
    n = len(images)
    null = torch.full((n,), model.null_class, dtype=torch.long)
    source = _labels_arg(args.source, n, model.num_classes, labels if labels is not None else null, "--source")
    # The target is a class to edit into: the null class is no target.
    target = _labels_arg(args.target, n, model.num_classes, None, "--target", allow_null=False)
    if args.method == "rf-edit":
        blocks = None
        if args.blocks:
            try:
                blocks = [int(b) for b in args.blocks.split(",")]
            except ValueError:
                raise FlowditError(f"--blocks must be comma-separated block indices, got {args.blocks!r}") from None
        res = rf_edit(model, images, source, target, args.inject, args.solver, args.steps, shift, blocks,
                      args.cfg, amp, args.batch_size, device)
        detail = f"inject {args.inject}"
    else:
        res = rf_inversion(model, images, source, target, args.gamma, args.eta, eta_steps, args.solver, args.steps,
                           shift, args.cfg, args.seed, None, amp, args.batch_size, device)
        detail = f"gamma {args.gamma}, eta {args.eta} on steps {args.eta_steps}"
    _save_images(out, res.images, target)
    print(f"flowdit: wrote {n} edited images to {out} ({args.method}, {detail}, NFE {res.nfe_invert} + {res.nfe_edit})")
    return 0


def _eta_steps(text: str) -> tuple[int, int]:
    try:
        start, stop = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--eta-steps must be 'start,stop' (two integers), got {text!r}") from None
    if not 0 <= start <= stop:
        raise ConfigError(f"--eta-steps must satisfy 0 <= start <= stop, got {text!r}")
    return start, stop


def cmd_restore(args: argparse.Namespace) -> int:
    import time

    import torch

    from .edit.flowchef import restore_images
    from .edit.operators import Inpaint, build_operator, measure
    from .eval.pixel import psnr, ssim
    from .inference import indexed_noise

    out = _check_out(args.out, (".png", ".npz"))
    degraded_out = _check_out(args.degraded, (".png", ".npz"), "--degraded") if args.degraded else None
    model, device, shift, amp = _setup(args, ((out, "--out"), (degraded_out, "--degraded")))
    images, labels = _load_inputs(args.input, model)
    n, shape = len(images), tuple(images.shape[1:])
    op = build_operator(args.task, shape, n, box=args.box, p=args.drop, seed=args.seed)
    y = measure(op, images, args.noise_std, seed=args.seed)
    cond = _labels_arg(args.classes, n, model.num_classes, None, "--class", allow_null=False)
    noise = indexed_noise(range(n), shape, args.seed)
    t0 = time.perf_counter()
    restored, nfe = restore_images(model, y, op, noise, cond, args.method, args.steps, shift, args.step_size, amp,
                                   args.batch_size, device)
    secs = time.perf_counter() - t0
    restored = restored.clamp(-1, 1)
    _save_images(out, restored, labels)
    if degraded_out is not None:
        # What a viewer should see of y: missing pixels black, low-resolution blown back up.
        view = torch.where(op.mask.bool().expand_as(y), y, -1.0) if isinstance(op, Inpaint) else (
            op.pinv(y) if op.pinv is not None else y)
        _save_images(degraded_out, view.clamp(-1, 1), labels)
    print(f"flowdit: wrote {n} restored images to {out} ({args.task}, {args.method}, NFE {nfe}, "
          f"{secs / n:.4f} s/image): PSNR {psnr(restored, images).mean():.2f} dB, SSIM {ssim(restored, images).mean():.3f}")
    return 0


def _edit_common(p: argparse.ArgumentParser, solver: str | None = "rf2", steps: int = 10) -> None:
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    p.add_argument("--input", required=True, help="a .png image or an .npz (ADM layout: arr_0 uint8 [N,H,W,C], "
                                                  "arr_1 labels)")
    if solver is not None:
        p.add_argument("--solver", default=solver, help="fixed-step solver: " + ", ".join(_solvers(adaptive=False)))
    p.add_argument("--steps", type=_positive_int, default=steps, help="solver steps")
    p.add_argument("--shift", type=_positive_float, help="time shift of the grid (default: the run's flow.shift)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of every random draw")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="images per model call")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the hardware runs it natively")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-ema", action="store_true", help="use the raw training weights")


def cmd_bench_accel(args: argparse.Namespace) -> int:
    from .bench.accel import check, run

    check(args)
    run(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .accel.registry import POLICIES

    p = _Parser(prog="flowdit", description="Rectified-flow diffusion transformers.")
    p.add_argument("--version", action="version", version=f"flowdit {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent, name: str, **kwargs) -> argparse.ArgumentParser:
        c = parent.add_parser(name, **kwargs)
        c.set_defaults(_parser=c)
        return c

    t = command(sub, "train", help="train a class-conditional DiT",
                description="Train a DiT with the rectified-flow objective. Settings come from a YAML "
                            "recipe and key=value overrides (e.g. train.steps=500 optim.lr=3e-4), which may "
                            "appear anywhere after 'train'. --list-keys lists every key.")
    t.add_argument("--config", help="YAML recipe (configs/digits.yaml); omitted: the built-in defaults "
                                    "(on --resume: the run's saved config)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="override one config key")
    t.add_argument("--resume", action="store_true",
                   help="continue from the run's newest checkpoint, with the run's saved config")
    t.add_argument("--allow-config-change", action="store_true",
                   help="on --resume, allow overrides that change the training trajectory (optimizer, batch, "
                        "data, model, flow, ...); the change is recorded in config.resume-N.yaml")
    t.add_argument("--resume-fallback", action="store_true",
                   help="on --resume, when the newest checkpoint is damaged, continue from the newest intact one "
                        "(the damaged one is kept as checkpoints/corrupt-step_N)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    t.add_argument("--list-keys", action="store_true", help="list every config key with its type, default and "
                                                           "help, and exit")
    t.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--no-outputs", action="store_true", help="skip the final samples and metrics.json")
    t.set_defaults(func=cmd_train)

    s = command(sub, "sample", help="sample images from a trained run",
                description="Sample from a run's EMA weights to a PNG grid or an .npz (ADM layout: "
                            "arr_0 uint8 [N,H,W,C], arr_1 int64 labels).")
    s.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    # -n as well: under torchrun, "--num" is refused as an abbreviation of its --numa-binding.
    s.add_argument("-n", "--num", type=_positive_int, default=100, help="number of samples (-n under torchrun)")
    s.add_argument("--classes", help="comma-separated class indices (default: all classes, balanced)")
    s.add_argument("--solver", default="heun", help="fixed-step: " + ", ".join(_solvers(adaptive=False))
                   + "; adaptive: " + ", ".join(_solvers()[len(_solvers(adaptive=False)):]))
    s.add_argument("--steps", type=_positive_int, default=16, help="solver steps (ignored by adaptive solvers)")
    s.add_argument("--cfg", type=_non_negative_float,
                   help="classifier-free guidance scale (1 = none; default: the run's sample.cfg)")
    s.add_argument("--guidance-interval", help="apply guidance only for t in [lo,hi], e.g. 0.1,0.9")
    s.add_argument("--shift", type=_positive_float, help="time shift of the schedule (default: the run's flow.shift)")
    s.add_argument("--tol", type=_positive_float, default=1e-4, help="rtol = atol of adaptive solvers")
    s.add_argument("--seed", type=_seed, default=0, help="seed of the noise (sample i always gets the same noise)")
    s.add_argument("--batch-size", type=_positive_int, default=256, help="samples per model call")
    s.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the hardware runs it natively")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--no-ema", action="store_true", help="use the raw training weights")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--out", required=True, help="output .png grid or .npz")
    s.add_argument("--accel", help="training-free acceleration, e.g. taylorseer:interval=4,order=2 "
                   "(docs/acceleration.md; policies: " + ", ".join(POLICIES) + ")")
    s.set_defaults(func=cmd_sample)

    e = command(sub, "eval", help="score samples: FID, precision/recall, class accuracy",
                description="Score an .npz of samples (ADM layout) or a run directory (its samples.npz) "
                            "with the data set's evaluator network; writes a JSON of all metrics.")
    e.add_argument("--samples", required=True, help="an .npz of samples or a run directory")
    e.add_argument("--dataset", help="digits or mnist (default: the run's data set)")
    e.add_argument("--data-root", help="directory of the data set's files (mnist; default: the run's data.root)")
    e.add_argument("--weights-dir", help="evaluator / guide networks written by flowdit evaluator train "
                                         "(default: the shipped ones)")
    e.add_argument("--out", help="output JSON (default: next to the .npz, *.eval.json)")
    e.add_argument("--inception-weights", help="local Inception-v3 weights file (torch-fidelity's): adds the "
                   "standard Inception FID, computed by torch-fidelity")
    e.add_argument("--seed", type=_seed, default=0, help="seed of the real-image subset for precision / recall")
    e.add_argument("--solver", help="solver the samples were drawn with (recorded)")
    e.add_argument("--steps", type=_positive_int, help="solver steps (recorded)")
    e.add_argument("--nfe", type=_positive_int, help="velocity evaluations per sample (recorded)")
    e.add_argument("--cfg", type=_non_negative_float, help="guidance scale (recorded)")
    e.set_defaults(func=cmd_eval)

    rf = command(sub, "reflow", help="reflow: coupling data from a trained model")
    rfsub = rf.add_subparsers(dest="reflow_command", required=True, metavar="ACTION")
    rp = command(rfsub, "pairs", help="generate (noise, sample, label) pairs from a run",
                 description="Integrate a run's ODE from seeded noise and write the pairs as verified "
                             "shards with a manifest. Deterministic per seed; run it again to resume; "
                             "under torchrun each process writes its own shards.")
    rp.add_argument("--ckpt", required=True, help="run directory or checkpoint directory of the teacher")
    rp.add_argument("-n", "--num", type=_positive_int, required=True, help="number of pairs (-n under torchrun)")
    rp.add_argument("--out", required=True, help="output directory")
    rp.add_argument("--solver", default="rf2", help="fixed-step solver: " + ", ".join(_solvers(adaptive=False)))
    rp.add_argument("--steps", type=_positive_int, default=8, help="solver steps")
    rp.add_argument("--cfg", type=_non_negative_float, default=1.5, help="guidance folded into the pairs (1 = none)")
    rp.add_argument("--seed", type=_seed, default=0, help="seed of the noise")
    rp.add_argument("--shard-size", type=_positive_int, default=5000, help="pairs per shard file")
    rp.add_argument("--batch-size", type=_positive_int, default=500, help="pairs per model call")
    rp.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 autocast where the hardware runs it natively")
    rp.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    rp.add_argument("--no-progress", action="store_true", help="no progress bar")
    rp.set_defaults(func=cmd_reflow_pairs)

    ev = command(sub, "evaluator", help="train the evaluator and guide networks of a data set")
    evsub = ev.add_subparsers(dest="evaluator_command", required=True, metavar="ACTION")
    et = command(evsub, "train", help="train and save the evaluator and guide networks",
                 description="Reproducibly train the data set's evaluator (scores samples) and guide "
                             "(for losses and guidance) networks and write their weights and manifest.")
    et.add_argument("--dataset", required=True, choices=["digits", "mnist"], help="data set")
    et.add_argument("--data-root", help="directory of the MNIST IDX files")
    et.add_argument("--kinds", default="evaluator,guide", help="comma-separated networks to train")
    et.add_argument("--epochs", type=_positive_int, help="default: 4 for mnist, 60 for digits")
    et.add_argument("--out-dir", help="directory of the weights and their manifest.json (default: ./evaluators; "
                                      "use them with flowdit eval --weights-dir)")
    et.add_argument("--replace-shipped", action="store_true",
                    help="write into the installed package's weights directory, replacing the shipped networks")
    et.add_argument("--threads", type=_positive_int, help="CPU threads (default: torch's)")
    et.add_argument("--no-progress", action="store_true", help="no progress bars")
    et.set_defaults(func=cmd_evaluator_train)

    iv = command(sub, "invert", help="invert images to their latent noise (t = 0 -> 1)",
                 description="Integrate the flow ODE from the images (t = 0) to noise (t = 1), unguided, "
                             "under each image's class (the .npz labels, --class, or the null class).")
    _edit_common(iv)
    iv.add_argument("--class", dest="classes", help="class for all images, or a comma list of one per image")
    iv.add_argument("--out", required=True, help="output .npz (noise, labels) or .safetensors")
    iv.add_argument("--recon", help="also regenerate from the latents to this .png grid or .npz")
    iv.set_defaults(func=cmd_invert)

    ed = command(sub, "edit", help="edit images to another class (RF-Edit or RF-Inversion)",
                 description="Invert under the source class and regenerate under the target class, "
                             "keeping the source's style: RF-Edit injects the attention values recorded "
                             "during inversion for the first --inject steps; RF-Inversion uses the "
                             "controlled forward / reverse ODEs (--gamma, --eta).")
    _edit_common(ed)
    ed.add_argument("--method", choices=["rf-edit", "rf-inversion"], default="rf-edit", help="editing method")
    ed.add_argument("--target", required=True, help="target class for all images, or a comma list")
    ed.add_argument("--source", help="source class(es) (default: the .npz labels, else the null class)")
    ed.add_argument("--inject", type=_non_negative_int, default=2,
                    help="RF-Edit: steps that inject the recorded values")
    ed.add_argument("--blocks", help="RF-Edit: comma-separated blocks (default: the second half)")
    ed.add_argument("--gamma", type=_non_negative_float, default=0.5, help="RF-Inversion: forward controller strength")
    ed.add_argument("--eta", type=_non_negative_float, default=0.9, help="RF-Inversion: reverse controller strength")
    ed.add_argument("--eta-steps", default="0,3", help="RF-Inversion: 'start,stop' regeneration steps under eta")
    ed.add_argument("--cfg", type=_non_negative_float, default=1.0, help="guidance scale of the regeneration")
    ed.add_argument("--out", required=True, help="output .png grid or .npz")
    ed.set_defaults(func=cmd_edit)

    rs = command(sub, "restore", help="degrade images with a known operator and restore them (FlowChef)",
                 description="Simulate y = A x (+ noise) on the input images and solve for x by steered "
                             "sampling (Euler steps): FlowChef (gradient-free, 1 NFE per step), the replacement "
                             "baseline, or unguided sampling; prints PSNR / SSIM against the inputs.")
    _edit_common(rs, solver=None, steps=20)
    rs.add_argument("--task", required=True, choices=["inpaint", "inpaint_random", "sr2", "sr4", "deblur"],
                    help="degradation operator")
    rs.add_argument("--method", choices=["flowchef", "baseline", "unguided"], default="flowchef",
                    help="restoration method")
    rs.add_argument("--step-size", type=_positive_float, default=1.0,
                    help="FlowChef step, in units of 1 / ||A||^2")
    rs.add_argument("--noise-std", type=_non_negative_float, default=0.0,
                    help="measurement noise std (images in [-1, 1])")
    rs.add_argument("--box", type=_positive_float, default=0.5, help="inpaint: side of the missing box, fraction of H")
    rs.add_argument("--drop", type=_non_negative_float, default=0.7,
                    help="inpaint_random: fraction of missing pixels")
    rs.add_argument("--class", dest="classes", help="condition on this class (default: unconditional)")
    rs.add_argument("--degraded", help="also write the measurement (viewable) to this .png or .npz")
    rs.add_argument("--out", required=True, help="output .png grid or .npz")
    rs.set_defaults(func=cmd_restore)

    from .bench.accel_args import add_arguments as bench_accel_arguments

    b = command(sub, "bench", help="side-by-side measurements")
    bsub = b.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    ba = command(bsub, "accel", help="training-free acceleration against the uncached sampler and fewer steps",
                 description="Run every block policy on one model, seeds and classes; write "
                             "JSON, a Markdown table and a Pareto plot (docs/acceleration.md).")
    bench_accel_arguments(ba)
    ba.set_defaults(func=cmd_bench_accel)
    return p


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return "; ".join(lines) if lines else "(no message)"


def _os_error(exc: OSError) -> str:
    """A failed read or write as one line naming the file (disk full, read-only, ...)."""
    where = exc.filename or "a file"
    if exc.filename2:
        where = f"{exc.filename} -> {exc.filename2}"
    reason = exc.strerror or str(exc)
    hint = {errno.ENOSPC: " (disk full: free space, then --resume)",
            errno.EROFS: " (read-only file system)",
            errno.EACCES: " (no permission)"}.get(exc.errno, "")
    return f"cannot write or read {where}: {reason}{hint}"


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (0, 2 for any one-line error, 130 when
    interrupted). ``--help`` and ``--version`` return 0 instead of exiting."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            sub = getattr(args, "_parser", parser)
            if args.command == "train":  # overrides may come anywhere after the command
                bad = [a for a in extra if not _is_override(a)]
                if not bad:
                    args.overrides = list(args.overrides) + extra
                    extra = []
                else:
                    extra = bad
            if extra:
                sub.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # argparse's --help, --version and one-line usage errors
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except FlowditError as exc:
        print(f"flowdit: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"flowdit: error: {_one_line(_os_error(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowdit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
