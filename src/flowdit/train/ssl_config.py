"""The settings of ``flowdit encoder train`` (:mod:`flowdit.train.ssl_encoder`), kept free
of torch so that building the command-line parser stays light."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Optional

from ..errors import ConfigError
from .sections import absolute_path, key

__all__ = ["SSLTrainConfig", "DATASETS", "RESUME_FREE_KEYS"]

DATASETS = ("digits", "mnist", "folder")
# Keys a resumed run may change: they do not touch the weights of the steps already taken.
RESUME_FREE_KEYS = ("steps", "log_every", "ckpt_every", "keep_ckpts", "device", "probe_train", "probe_test",
                    "probe_l2", "root", "out")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class SSLTrainConfig:
    """The settings of ``flowdit encoder train`` (one flag per field, ``--field-name``)."""

    dataset: str = key("digits", "data set: digits (embedded 8x8), mnist (IDX files in --root) or folder")
    root: Optional[str] = key(None, "directory of the data set's files (mnist, folder)")
    image_size: Optional[int] = key(None, "folder: image side to resize to")
    out: str = key("runs/ssl-encoder", "run directory (config, checkpoints, encoder, metrics)")
    stride: Optional[int] = key(None, "feature-map stride, a power of two (default: 4 for sides >= 16, else 2)")
    width: int = key(32, "channels of the stem; doubled at each stride-2 stage before the last")
    feature_dim: int = key(96, "F: channels of the feature map (the last stage)")
    proj_hidden: int = key(256, "hidden width of the projection head (training only)")
    proj_dim: int = key(64, "output width of the projection head")
    temperature: float = key(0.2, "NT-Xent temperature tau")
    crop_min: float = key(0.45, "smallest crop area, as a fraction of the image")
    crop_max: float = key(1.25, "largest crop area (above 1 zooms out)")
    aspect: float = key(4 / 3, "largest change of the crop's aspect ratio, log-uniform in [1/a, a] (1: none)")
    rotate: float = key(15.0, "largest rotation, degrees")
    translate: float = key(0.1, "largest shift, as a fraction of the image side")
    erase_p: float = key(0.5, "probability of erasing a random rectangle (2-20% of the area)")
    noise: float = key(0.1, "largest std of added Gaussian noise (images in [-1, 1])")
    steps: int = key(1000, "optimizer steps")
    batch_size: int = key(256, "images per step (two views each)")
    lr: float = key(2e-3, "peak AdamW learning rate (linear warm-up, cosine decay to 0)")
    weight_decay: float = key(1e-4, "AdamW decoupled weight decay")
    warmup_steps: int = key(50, "linear warm-up steps")
    precision: Literal["auto", "bf16", "fp32"] = key("auto", "auto: bf16 autocast where the hardware runs it natively")
    seed: int = key(0, "seed of the weights, the batches and the views")
    device: Optional[str] = key(None, "cpu or cuda (default: cuda when available)")
    log_every: int = key(50, "append to metrics.jsonl every this many steps")
    ckpt_every: int = key(200, "checkpoint every this many steps (0: only at the end)")
    keep_ckpts: int = key(2, "checkpoints kept")
    probe_train: int = key(0, "linear probe: train images used (0: the whole train split)")
    probe_test: int = key(0, "linear probe: test images scored (0: the whole test split)")
    probe_l2: float = key(1e-4, "linear probe: L2 penalty on the weights")

    def validate(self) -> None:
        """Refuse a bad value with one line naming its flag."""
        if self.dataset not in DATASETS:
            raise ConfigError(f"--dataset {self.dataset!r}: unknown data set; valid: {', '.join(DATASETS)}")
        if self.dataset == "folder" and self.image_size is None:
            raise ConfigError("--dataset folder needs --image-size")
        if self.dataset != "folder" and self.image_size is not None:
            raise ConfigError(f"--image-size is only for --dataset folder ({self.dataset} has a fixed size)")
        for k in ("width", "feature_dim", "proj_hidden", "proj_dim", "steps", "batch_size", "log_every",
                  "keep_ckpts", "temperature", "lr", "crop_min", "crop_max", "image_size", "stride"):
            v = getattr(self, k)
            if v is not None and not v > 0:
                raise ConfigError(f"{_flag(k)} must be positive, got {v}")
        for k in ("weight_decay", "warmup_steps", "ckpt_every", "probe_train", "probe_test", "probe_l2", "seed",
                  "rotate", "translate", "noise"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{_flag(k)} must be >= 0, got {getattr(self, k)}")
        if self.stride is not None and self.stride & (self.stride - 1):
            raise ConfigError(f"--stride must be a power of two, got {self.stride}")
        if self.crop_min > self.crop_max:
            raise ConfigError(f"--crop-min {self.crop_min} is above --crop-max {self.crop_max}")
        if self.aspect < 1:
            raise ConfigError(f"--aspect must be >= 1, got {self.aspect}")
        if not 0 <= self.erase_p <= 1:
            raise ConfigError(f"--erase-p must be in [0, 1], got {self.erase_p}")
        if self.batch_size < 2:
            raise ConfigError(f"--batch-size must be >= 2 (the other images are the negatives), got {self.batch_size}")
        if not self.out:
            raise ConfigError("--out must name a directory")

    def resolved(self) -> "SSLTrainConfig":
        """Paths made absolute (the saved config then works from any directory)."""
        return dataclasses.replace(self, root=absolute_path(self.root), out=absolute_path(self.out))

    def arch(self, in_channels: int, image_size: int):
        """The :class:`flowdit.models.ssl_encoder.SSLEncoderArch` for images with
        ``in_channels`` channels and side ``image_size``."""
        from ..models.ssl_encoder import SSLEncoderArch, default_stride

        stride = self.stride or default_stride(image_size)
        stages = int(round(math.log2(stride)))
        widths = tuple(self.width * 2 ** i for i in range(stages)) + (self.feature_dim,)
        return SSLEncoderArch(in_channels, widths)

    def command(self) -> str:
        """The ``flowdit encoder train`` command line that gives this config (non-default flags)."""
        default = SSLTrainConfig()
        parts = ["flowdit encoder train"]
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != getattr(default, f.name) or f.name in ("dataset", "out", "steps"):
                parts.append(f"{_flag(f.name)} {v}")
        return " ".join(parts)
