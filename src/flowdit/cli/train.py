"""``flowdit train``: train a DiT from a recipe and key=value overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    _check_writable,
    _device,
    command,
)


def _run_locator(args: argparse.Namespace) -> Path:
    """The run directory ``out_dir/name`` that a train command names, read from the raw
    recipe and overrides (not validated: on --resume they only complete the saved config)."""
    from ..train.config import RunConfig
    from ..utils.config import apply_overrides, read_yaml

    data = apply_overrides(read_yaml(args.config), args.overrides)
    defaults = RunConfig()
    return Path(str(data.get("out_dir", defaults.out_dir))) / str(data.get("name", defaults.name))


def _print_keys(cls=None) -> None:
    """Every key of a run config class (default :class:`RunConfig`) with its type, default and help."""
    from ..utils.config import describe_keys

    if cls is None:
        from ..train.config import RunConfig

        cls = RunConfig
    rows = describe_keys(cls)
    width = max(len(r["key"]) for r in rows)
    twidth = max(len(r["type"]) for r in rows)
    for r in rows:
        print(f"{r['key']:<{width}}  {r['type']:<{twidth}}  {r['default']!s:<20}  {r['help']}")


def cmd_train(args: argparse.Namespace) -> int:
    import os

    import yaml

    from ..train.config import RunConfig
    from ..train.outputs import write_run_outputs
    from ..train.trainer import Trainer, saved_run_config
    from ..utils.config import load_config, to_dict
    from ..utils.files import DirLock

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
        if trainer.dist.is_main and not args.no_outputs and trainer.conditioning.kind == "text":
            from ..train.text_outputs import write_text_run_outputs

            metrics = write_text_run_outputs(trainer, extra={"final_loss": last.get("loss"), "train_steps": trainer.step,
                                                             "params": trainer.model.param_count()},
                                             progress=not args.no_progress)
            print(f"flowdit: wrote {trainer.run_dir}/samples.png, samples.npz, metrics.json (judge exact match "
                  f"{metrics['judge_test']['exact']:.3f} test, {metrics['judge_heldout']['exact']:.3f} held-out)")
        elif trainer.dist.is_main and not args.no_outputs:
            metrics = write_run_outputs(
                trainer.run_dir, trainer.ema, trainer.cfg, amp_dtype=trainer.amp_dtype, device=trainer.device,
                extra={"final_loss": last.get("loss"), "train_steps": trainer.step,
                       "params": trainer.model.param_count()},
                progress=not args.no_progress,
            )
            acc = metrics.get("class_accuracy")
            print(f"flowdit: wrote {trainer.run_dir}/samples.png, samples.npz, metrics.json"
                  + (f" (class accuracy {acc:.3f})" if acc is not None else ""))
        from ..train.dist import cleanup

        cleanup(trainer.dist)
    finally:
        if lock is not None:
            lock.release()
    return 0


def add_parsers(sub) -> None:
    """Register this module's commands on the ``flowdit`` subparsers ``sub``."""
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
