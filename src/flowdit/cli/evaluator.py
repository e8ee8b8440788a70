"""``flowdit evaluator train``: train the evaluator and guide networks of a data set."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from .common import (
    _check_writable,
    _data_root,
    _positive_int,
    command,
)


def cmd_evaluator_train(args: argparse.Namespace) -> int:
    import torch

    from ..data import build_dataset
    from ..eval.evaluator import WEIGHTS_DIR, save_classifier, train_classifier
    from ..eval.networks import NETWORKS

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
    epochs = args.epochs or {"mnist": 4, "shapes": 6}.get(args.dataset, 60)
    for kind in kinds:
        net, record = train_classifier(kind, tx, ty, vx, vy, train.num_classes, epochs=epochs,
                                       progress=not args.no_progress)
        path = save_classifier(net, args.dataset, record, out)
        print(f"flowdit: {args.dataset} {kind}: test accuracy {record['test_accuracy']:.4f} "
              f"({record['params']} params, {record['train_seconds']} s) -> {path}")
    if not args.replace_shipped:
        print(f"flowdit: score with these networks: flowdit eval --weights-dir {out} ...")
    return 0


def add_parsers(sub) -> None:
    """Register this module's commands on the ``flowdit`` subparsers ``sub``."""
    ev = command(sub, "evaluator", help="train the evaluator and guide networks of a data set")
    evsub = ev.add_subparsers(dest="evaluator_command", required=True, metavar="ACTION")
    et = command(evsub, "train", help="train and save the evaluator and guide networks",
                 description="Reproducibly train the data set's evaluator (scores samples) and guide "
                             "(for losses and guidance) networks and write their weights and manifest.")
    et.add_argument("--dataset", required=True, choices=["digits", "mnist", "shapes"], help="data set")
    et.add_argument("--data-root", help="directory of the MNIST IDX files")
    et.add_argument("--kinds", default="evaluator,guide", help="comma-separated networks to train")
    et.add_argument("--epochs", type=_positive_int, help="default: 4 for mnist, 6 for shapes, 60 for digits")
    et.add_argument("--out-dir", help="directory of the weights and their manifest.json (default: ./evaluators; "
                                      "use them with flowdit eval --weights-dir)")
    et.add_argument("--replace-shipped", action="store_true",
                    help="write into the installed package's weights directory, replacing the shipped networks")
    et.add_argument("--threads", type=_positive_int, help="CPU threads (default: torch's)")
    et.add_argument("--no-progress", action="store_true", help="no progress bars")
    et.set_defaults(func=cmd_evaluator_train)
