"""``flowdit eval``: score samples with the data set's evaluator network."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from .common import (
    _check_writable,
    _data_root,
    _non_negative_float,
    _positive_int,
    _seed,
    command,
)


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from ..errors import DataError
    from ..evaluate import evaluate_samples
    from ..utils.files import write_json
    from ..utils.images import load_npz

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
        from ..evaluate import inception_fid

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


def add_parsers(sub) -> None:
    """Register this module's commands on the ``flowdit`` subparsers ``sub``."""
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
