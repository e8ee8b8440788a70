"""The latent space: a KL autoencoder with diffusers' ``AutoencoderKL`` architecture.

flowdit's latent models diffuse ``z = (E(x) - shift) * scale``, where ``E(x)`` is the
encoder's posterior (its mean, or a sample), and decode ``D(z / scale + shift)``: the
convention of SD3 and FLUX, whose VAEs carry ``scaling_factor`` and ``shift_factor`` in
their configs (SD3: 1.5305, 0.0609; FLUX: 0.3611, 0.1159). The architecture *is* diffusers'
``AutoencoderKL`` (Rombach et al. 2022), so a user's own SD / SD3 / FLUX VAE folder drops in
through ``LatentSpace.from_pretrained``; flowdit trains small ones on its own data
(``flowdit.train.autoencoder``) and computes both factors from data, as those models did
(``latent_statistics``). Needs the ``flowdit[diffusers]`` extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from flowdit.errors import ConfigError

__all__ = ["AutoencoderConfig", "build_autoencoder", "LatentSpace", "latent_statistics"]


@dataclass
class AutoencoderConfig:
    """Architecture of an ``AutoencoderKL``: ``len(block_out_channels) - 1`` downsamplings
    (factor 4 for three blocks: 64 x 64 -> 16 x 16), ``latent_channels`` channels."""

    in_channels: int = field(default=3, metadata={"help": "image channels"})
    latent_channels: int = field(default=4, metadata={"help": "latent channels"})
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128], metadata={
        "help": "channels per resolution level; len - 1 downsamplings by 2"})
    layers_per_block: int = field(default=1, metadata={"help": "ResNet blocks per level (decoder: one more)"})
    norm_num_groups: int = field(default=32, metadata={"help": "GroupNorm groups (divides every channel count)"})

    def validate(self) -> None:
        if not self.block_out_channels or any(c <= 0 for c in self.block_out_channels):
            raise ConfigError(f"model.block_out_channels must be positive, got {self.block_out_channels}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(f"model.block_out_channels {bad} are not divisible by model.norm_num_groups "
                              f"{self.norm_num_groups}")
        for key in ("in_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key} must be positive, got {getattr(self, key)}")

    @property
    def factor(self) -> int:
        """Spatial downsampling factor of the encoder."""
        return 2 ** (len(self.block_out_channels) - 1)


def build_autoencoder(cfg: AutoencoderConfig) -> nn.Module:
    """A fresh ``diffusers.AutoencoderKL`` of the given architecture (encoder and decoder
    with mid-block attention, a diagonal-Gaussian posterior of ``2 latent_channels``)."""
    cfg.validate()
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ConfigError("the autoencoder needs diffusers: pip install 'flowdit[diffusers]'") from None
    n = len(cfg.block_out_channels)
    return AutoencoderKL(in_channels=cfg.in_channels, out_channels=cfg.in_channels,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                         latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups)


@torch.no_grad()
def latent_statistics(vae: nn.Module, batches: Iterable[Tensor], seed: int = 0) -> tuple[float, float]:
    """``(shift, scale)`` that give the latents zero mean and unit variance: ``shift`` the
    mean and ``scale = 1 / std`` of posterior *samples* of every element of ``batches``
    (images ``[B, C, H, W]`` in ``[-1, 1]``), a fixed ``seed`` for the samples."""
    g = torch.Generator().manual_seed(seed)
    total, total_sq, count = 0.0, 0.0, 0
    for x in batches:
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g, dtype=post.mean.dtype)
        z = z.double()
        total += float(z.sum())
        total_sq += float((z * z).sum())
        count += z.numel()
    if count == 0:
        raise ConfigError("latent_statistics needs at least one batch")
    mean = total / count
    var = max(total_sq / count - mean * mean, 1e-12)
    return mean, 1.0 / var**0.5


class LatentSpace(nn.Module):
    """An ``AutoencoderKL`` with its latent normalisation.

    ``encode(x [B, C, H, W] in [-1, 1]) -> z [B, c, H / f, W / f]``, ``z = (mu - shift) * scale``
    (the posterior mean; ``sample=True`` draws from the posterior), and
    ``decode(z) -> x`` (unclamped), the inverse map through the decoder.
    """

    def __init__(self, vae: nn.Module, scaling_factor: float, shift_factor: float = 0.0):
        super().__init__()
        if not (scaling_factor > 0):
            raise ConfigError(f"scaling_factor must be positive, got {scaling_factor!r}")
        self.vae = vae
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def factor(self) -> int:
        """Spatial downsampling factor."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """``(C, H, W)`` of an image -> ``(c, H / f, W / f)`` of its latent."""
        _, h, w = image_shape
        if h % self.factor or w % self.factor:
            raise ConfigError(f"image size {h} x {w} is not a multiple of the autoencoder's factor {self.factor}")
        return self.latent_channels, h // self.factor, w // self.factor

    @torch.no_grad()
    def encode(self, x: Tensor, sample: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
        post = self.vae.encode(x).latent_dist
        z = post.mean
        if sample:
            z = z + post.std * torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z / self.scaling_factor + self.shift_factor).sample

    def save_pretrained(self, path: str) -> None:
        """Write the VAE as a diffusers folder, the two factors in its ``config.json``."""
        self.vae.register_to_config(scaling_factor=self.scaling_factor, shift_factor=self.shift_factor)
        self.vae.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str, subfolder: Optional[str] = None) -> "LatentSpace":
        """Load a diffusers ``AutoencoderKL`` folder offline (flowdit's own, or a pipeline's
        ``vae`` folder: SD, SD3, FLUX), taking ``scaling_factor`` and ``shift_factor``
        (``None`` counts as 0) from its config."""
        import os

        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise ConfigError("the autoencoder needs diffusers: pip install 'flowdit[diffusers]'") from None
        where = path if subfolder is None else os.path.join(path, subfolder)
        if not os.path.isfile(os.path.join(where, "config.json")):
            raise ConfigError(f"autoencoder folder {where} has no config.json (not a diffusers AutoencoderKL folder)")
        try:
            vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, local_files_only=True, low_cpu_mem_usage=False)
        except (OSError, ValueError, EnvironmentError) as err:
            raise ConfigError(f"autoencoder folder {where} could not be loaded: {str(err).splitlines()[0]}") from None
        cfg = vae.config
        return cls(vae.eval().requires_grad_(False), float(cfg.scaling_factor), float(cfg.get("shift_factor") or 0.0))

    def describe(self) -> dict:
        """What a run records of its latent space."""
        cfg = self.vae.config
        return {"latent_channels": self.latent_channels, "factor": self.factor,
                "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "block_out_channels": list(cfg.block_out_channels)}

