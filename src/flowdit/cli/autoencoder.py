"""``flowdit autoencoder train | encode``: a latent space of flowdit's own and a data set's
latents cached on disk."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from .common import _check_writable, _positive_int, command


def cmd_autoencoder_train(args: argparse.Namespace) -> int:
    from ..train.autoencoder import AutoencoderRunConfig, AutoencoderTrainer
    from ..utils.config import load_config

    if args.list_keys:
        from .train import _print_keys

        _print_keys(AutoencoderRunConfig)
        return 0
    cfg = load_config(AutoencoderRunConfig, args.config, args.overrides).resolved()
    _check_writable(Path(cfg.out_dir) / cfg.name, "out_dir")
    report = AutoencoderTrainer(cfg, resume=args.resume, progress=not args.no_progress).fit()
    judge = report.get("judge_reconstructions")
    extra = f", judge exact match {judge['exact']:.3f} (originals {report['judge_originals']['exact']:.3f})" if judge else ""
    print(f"flowdit: {Path(cfg.out_dir) / cfg.name}/autoencoder: test PSNR {report['psnr']:.2f} dB, "
          f"SSIM {report['ssim']:.4f}{extra}")
    return 0


def cmd_autoencoder_encode(args: argparse.Namespace) -> int:
    from ..data.latent_cache import INDEX_NAME
    from ..models.autoencoder import LatentSpace
    from ..train.autoencoder import AEDataSection, encode_dataset, load_training_images

    folder = Path(args.autoencoder)
    if (folder / "autoencoder" / "config.json").is_file():  # a run directory
        folder = folder / "autoencoder"
    out = Path(args.out)
    if (out / INDEX_NAME).exists():
        raise ConfigError(f"--out {out}: already holds a latent cache; choose another directory")
    _check_writable(out, "--out")
    data_cfg = AEDataSection(dataset=args.dataset, root=args.data_root, image_size=args.image_size,
                             train_size=args.n or 20000, seed=args.seed)
    try:
        data_cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"--dataset / --image-size: {e}") from None
    if args.dataset == "shapes":
        from ..data.shapes import SPLITS

        if args.split not in SPLITS:
            raise ConfigError(f"--split {args.split!r}: shapes splits are {', '.join(SPLITS)}")
    space = LatentSpace.from_pretrained(str(folder))  # refused before any image is rendered
    if args.image_size % space.factor:
        raise ConfigError(f"--image-size {args.image_size} is not a multiple of the autoencoder's factor {space.factor}")
    data = load_training_images(data_cfg, args.split, n=args.n)
    source = {"autoencoder": str(folder.resolve()), "dataset": args.dataset, "split": args.split,
              "n": len(data), "seed": args.seed, "image_size": args.image_size}
    path = encode_dataset(space, data, out, source=source, progress=not args.no_progress, shard_size=args.shard_size)
    print(f"flowdit: wrote {len(data)} latents {tuple(space.latent_shape(data.shape))} to {path}")
    return 0


def add_parsers(sub) -> None:
    """Register this module's commands on the ``flowdit`` subparsers ``sub``."""
    ae = command(sub, "autoencoder", help="train a KL autoencoder; cache a data set's latents")
    aesub = ae.add_subparsers(dest="autoencoder_command", required=True, metavar="ACTION")
    t = command(aesub, "train", help="train an AutoencoderKL (L1 + guide-network perceptual + KL)",
                description="Train a diffusers AutoencoderKL on a data set, compute its latent shift and scale "
                            "from data, write <out_dir>/<name>/autoencoder and metrics.json (test PSNR, SSIM, "
                            "judge accuracy of reconstructions). Settings: YAML and key=value overrides.")
    t.add_argument("--config", help="YAML recipe (configs/shapes_autoencoder.yaml)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="override one config key")
    t.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    t.add_argument("--list-keys", action="store_true", help="list every config key and exit")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_autoencoder_train)
    e = command(aesub, "encode", help="encode a data set into a sharded, checksummed latent cache",
                description="Encode a data set with an autoencoder (a run directory or a diffusers AutoencoderKL "
                            "folder) and write its latents, labels and captions as checksummed shards.")
    e.add_argument("--autoencoder", required=True, help="run directory of flowdit autoencoder train, or a diffusers "
                                                        "AutoencoderKL folder")
    e.add_argument("--dataset", default="shapes", help="data set (default shapes)")
    e.add_argument("--data-root", help="directory of the data set's files (mnist, folder)")
    e.add_argument("--split", default="train", help="split (shapes: train, val, test, heldout)")
    e.add_argument("--n", type=_positive_int, help="shapes: number of scenes (default: the split's size)")
    e.add_argument("--seed", type=int, default=0, help="shapes: seed of the scenes")
    e.add_argument("--image-size", type=_positive_int, default=64, help="image side (default 64)")
    e.add_argument("--shard-size", type=_positive_int, default=8192, help="latents per shard")
    e.add_argument("--out", required=True, help="directory of the cache")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_autoencoder_encode)
