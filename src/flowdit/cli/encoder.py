"""``flowdit encoder train``: a self-supervised representation encoder (SimCLR, no labels)
for representation alignment, scored by a linear probe."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path

from ..errors import ConfigError
from .common import _check_writable, _finite_float, _non_negative_int, _positive_int, command

# Per-field argparse types (the rest follow the annotation).
_TYPES = {"seed": _non_negative_int, "warmup_steps": _non_negative_int, "ckpt_every": _non_negative_int,
          "probe_train": _non_negative_int, "probe_test": _non_negative_int}


def _config_class():
    from ..train.ssl_config import SSLTrainConfig

    return SSLTrainConfig


def resolve_config(args: argparse.Namespace):
    """The run's :class:`flowdit.train.ssl_encoder.SSLTrainConfig`: the defaults, laid over
    by the saved ``<out>/config.yaml`` when resuming, then by the flags given; validated,
    and the data set's files checked, before any work (one line naming the flag)."""
    from ..data import MNIST_ENV
    from ..utils.config import from_dict, read_yaml, to_dict

    cls = _config_class()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    data = to_dict(cls())
    saved = Path(given["out"]) / "config.yaml"
    if args.resume and saved.is_file():
        data.update({k: v for k, v in read_yaml(saved).items() if k in data})
    data.update(given)
    cfg = from_dict(cls, data)
    if cfg.dataset == "mnist" and not cfg.root:
        if not os.environ.get(MNIST_ENV):
            raise ConfigError(f"--dataset mnist needs the directory of its IDX files: pass --root DIR "
                              f"(or set {MNIST_ENV})")
        cfg = dataclasses.replace(cfg, root=os.environ[MNIST_ENV])
    if cfg.dataset in ("mnist", "folder"):
        if not cfg.root:
            raise ConfigError(f"--dataset {cfg.dataset} needs --root DIR")
        if not Path(cfg.root).expanduser().is_dir():
            raise ConfigError(f"--root {cfg.root}: no such directory")
    if cfg.device is not None:
        from ..utils.device import resolve_device

        resolve_device(cfg.device)
    _check_writable(cfg.out, "--out")
    return cfg.resolved()


def cmd_encoder_train(args: argparse.Namespace) -> int:
    """``flowdit encoder train``: train, probe, write the encoder; prints both probe accuracies."""
    from ..train.ssl_encoder import SSLEncoderTrainer

    cfg = resolve_config(args)
    m = SSLEncoderTrainer(cfg, resume=args.resume, progress=not args.no_progress).fit()
    p, r = m["linear_probe"], m["linear_probe_random_init"]
    print(f"flowdit: {cfg.out}/encoder.safetensors ({m['params']:,} parameters, feature map "
          f"{'x'.join(map(str, m['feature_map']))}, {m['steps']} steps, {m['train_seconds'] / 60:.1f} min of training)")
    print(f"flowdit: linear probe test accuracy {p['test_accuracy']:.4f} (trained) vs {r['test_accuracy']:.4f} "
          f"(random init, same architecture); {p['test_size']} test images, probe fitted on {p['train_size']}")
    return 0


def add_parsers(sub) -> None:
    """Register ``flowdit encoder train`` on the ``flowdit`` subparsers ``sub``."""
    cls = _config_class()
    enc = command(sub, "encoder", help="train a self-supervised representation encoder (for REPA)")
    esub = enc.add_subparsers(dest="encoder_command", required=True, metavar="ACTION")
    t = command(esub, "train", help="train a small conv encoder with SimCLR (no labels); linear-probe it",
                description="Train a small convolutional encoder without labels (SimCLR: two augmented views "
                            "per image, NT-Xent loss, a projection head used only in training), write "
                            "<out>/encoder.safetensors with manifest.json (SHA-256) and metrics.json (linear-probe "
                            "accuracy of the trained encoder and of its random initialisation). Load it with "
                            "flowdit.models.ssl_encoder.load_ssl_encoder(<out>).")
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        kwargs: dict = {"default": argparse.SUPPRESS}
        if typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = typing.get_args(tp)
        elif f.name in _TYPES:
            kwargs["type"] = _TYPES[f.name]
        else:
            base = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            kwargs["type"] = {int: _positive_int, float: _finite_float,
                              str: str}.get(base[0], str)
        value = getattr(default, f.name)
        text = f.metadata.get("help", "").replace("%", "%%")
        if value is not None and "default" not in text and f.name != "out":
            text += f" (default {value})"
        kwargs["help"] = text
        t.add_argument("--" + f.name.replace("_", "-"), dest=f.name, required=(f.name == "out"), **kwargs)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint "
                                                         "(settings not given are taken from its config.yaml)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_encoder_train)
