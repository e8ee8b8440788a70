"""A small convolutional image encoder trained without labels (``flowdit encoder train``),
as the frozen target of representation alignment (REPA, Yu et al. 2024: a DiT's block-k
tokens are projected and aligned to a pretrained encoder's patch features of the clean
image).

The encoder maps images ``[B, C, H, W]`` in ``[-1, 1]`` to a spatial feature map
``[B, F, H / s, W / s]`` (``feature_map``) at stride ``s`` (4 for 28x28 MNIST: a 7x7 grid,
the token grid of ``DiT-mnist``, whose patch size is 4; 2 for the 8x8 digits: the 4x4 grid
of ``DiT-digits``), and to a pooled vector ``[B, F]`` (``features``, the map's global
average). It is a stem convolution at full resolution followed by ``log2(s)`` stages, each a
stride-2 convolution and a residual pair of 3x3 convolutions; GroupNorm, not BatchNorm, so a
feature never depends on the other images of its batch.

A trained encoder is stored as ``encoder.safetensors`` plus ``manifest.json`` (architecture,
SHA-256 of the weights file, how it was trained, its linear-probe accuracy);
:func:`load_ssl_encoder` verifies the checksum and returns the encoder frozen, in eval mode.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError
from ..utils.files import sha256_file

__all__ = ["SSLEncoder", "SSLEncoderArch", "ENCODER_FILE", "MANIFEST_FILE", "MANIFEST_FORMAT",
           "default_stride", "load_ssl_encoder", "read_encoder_manifest"]

ENCODER_FILE = "encoder.safetensors"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "flowdit-ssl-encoder"


def default_stride(image_size: int) -> int:
    """The stride used when none is given: 4 for images of side >= 16 (28x28 -> 7x7, the
    patch-4 token grid of DiT-mnist), 2 below (8x8 digits -> 4x4, DiT-digits' patch 2)."""
    return 4 if image_size >= 16 else 2


@dataclass
class SSLEncoderArch:
    """The architecture of an :class:`SSLEncoder` (stored in its manifest).

    ``widths``: channels of the stem and of each stage; ``len(widths) - 1`` stride-2 stages,
    so the stride is ``2 ** (len(widths) - 1)`` and the feature dimension ``F = widths[-1]``.
    ``groups``: GroupNorm groups (each width must be a multiple).
    """

    in_channels: int = 1
    widths: tuple[int, ...] = (32, 64, 128)
    groups: int = 8

    @property
    def stride(self) -> int:
        """Side of the image area one feature-map cell covers (``2 ** stages``)."""
        return 2 ** (len(self.widths) - 1)

    @property
    def feature_dim(self) -> int:
        """``F``, the channels of the feature map and the length of the pooled vector."""
        return int(self.widths[-1])

    @classmethod
    def for_stride(cls, in_channels: int, stride: int, width: int = 32, groups: int = 8) -> "SSLEncoderArch":
        """The architecture of stride ``stride`` (a power of two >= 1): widths ``width``,
        ``2 width``, ``4 width``, ... one doubling per stride-2 stage."""
        stages = int(round(math.log2(stride)))
        if stride < 1 or 2 ** stages != stride:
            raise ValueError(f"stride must be a power of two >= 1, got {stride}")
        return cls(in_channels, tuple(width * 2 ** i for i in range(stages + 1)), groups)

    def to_dict(self) -> dict:
        """JSON form (``widths`` as a list)."""
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SSLEncoderArch":
        """Inverse of :meth:`to_dict`."""
        return cls(int(d["in_channels"]), tuple(int(w) for w in d["widths"]), int(d.get("groups", 8)))


def _norm(groups: int, ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, ch), ch)


class _Residual(nn.Module):
    """``x + GN(conv(relu(GN(conv(x)))))`` then ReLU, shape-preserving ``[B, c, h, w]``."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.norm1 = _norm(groups, ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.norm2 = _norm(groups, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, c, h, w] -> [B, c, h, w]``."""
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(x + self.norm2(self.conv2(h)))


class SSLEncoder(nn.Module):
    """Images ``[B, C, H, W]`` in ``[-1, 1]`` -> feature map ``[B, F, H / s, W / s]``.

    ``H`` and ``W`` must be multiples of the stride ``s = arch.stride``. Parameters: about
    0.29M for the default widths (32, 64, 128).
    """

    def __init__(self, arch: SSLEncoderArch | None = None):
        super().__init__()
        self.arch = arch = arch or SSLEncoderArch()
        w = arch.widths
        self.stem = nn.Sequential(nn.Conv2d(arch.in_channels, w[0], 3, padding=1, bias=False),
                                  _norm(arch.groups, w[0]), nn.ReLU())
        stages = []
        for cin, cout in zip(w[:-1], w[1:]):
            stages.append(nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                                        _norm(arch.groups, cout), nn.ReLU(), _Residual(cout, arch.groups)))
        self.stages = nn.Sequential(*stages)

    @property
    def stride(self) -> int:
        """Downsampling factor between the image and the feature map."""
        return self.arch.stride

    @property
    def feature_dim(self) -> int:
        """``F``: channels of the feature map, length of the pooled features."""
        return self.arch.feature_dim

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` in [-1, 1] -> ``[B, F, H / s, W / s]`` (for 28x28 and
        s = 4: ``[B, F, 7, 7]``, one cell per DiT-mnist token, row-major like the tokens)."""
        if x.dim() != 4 or x.shape[1] != self.arch.in_channels:
            raise ValueError(f"expected images [B, {self.arch.in_channels}, H, W], got shape {tuple(x.shape)}")
        if x.shape[-1] % self.stride or x.shape[-2] % self.stride:
            raise ValueError(f"image side {tuple(x.shape[-2:])} is not a multiple of the stride {self.stride}")
        return self.stages(self.stem(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` -> ``[B, F]``: the global average of :meth:`feature_map`."""
        return self.feature_map(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`feature_map`: ``[B, C, H, W] -> [B, F, H / s, W / s]``."""
        return self.feature_map(x)


def read_encoder_manifest(path: str | Path) -> tuple[dict, Path]:
    """The manifest of a stored encoder and the path of its weights file.

    ``path``: a directory holding ``manifest.json`` and ``encoder.safetensors`` (the run
    directory of ``flowdit encoder train``), or the ``.safetensors`` file itself (its
    manifest beside it). A missing or unreadable manifest raises :class:`CheckpointError`
    naming the file.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    mpath = folder / MANIFEST_FILE
    if not mpath.is_file():
        what = path if (path.is_dir() or path.exists()) else f"{path} (no such file or directory)"
        raise CheckpointError(f"{mpath}: no encoder manifest; {what} is not a stored SSL encoder "
                              "(flowdit encoder train writes one)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{mpath}: unreadable encoder manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{mpath}: not an SSL encoder manifest (format {MANIFEST_FORMAT!r} expected)")
    weights = folder / manifest.get("file", ENCODER_FILE)
    if not path.is_dir() and path.resolve() != weights.resolve():
        raise CheckpointError(f"{path}: the manifest beside it lists {weights.name}, not this file")
    return manifest, weights


def load_ssl_encoder(path: str | Path, map_location: str | torch.device = "cpu") -> SSLEncoder:
    """Load a stored encoder, frozen (``requires_grad=False``) and in eval mode.

    ``path``: the run directory of ``flowdit encoder train`` or its ``encoder.safetensors``.
    The weights file's SHA-256 must match the manifest's; a missing, truncated, edited or
    unreadable file raises :class:`CheckpointError` (a :class:`flowdit.errors.FlowditError`)
    with one line naming the file.

    Returns the :class:`SSLEncoder`: ``enc.feature_map(x [B, C, H, W]) -> [B, F, H/s, W/s]``.
    """
    from safetensors.torch import load_file

    manifest, weights = read_encoder_manifest(path)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: encoder weights listed in {weights.parent / MANIFEST_FILE} but missing")
    digest = sha256_file(weights)
    if digest != manifest.get("sha256"):
        raise CheckpointError(f"{weights}: SHA-256 {digest[:12]}... does not match the manifest "
                              f"({str(manifest.get('sha256'))[:12]}...): the file is damaged or was changed")
    try:
        arch = SSLEncoderArch.from_dict(manifest["arch"])
        state = load_file(str(weights), device=str(map_location))
        enc = SSLEncoder(arch)
        enc.load_state_dict(state)
    except CheckpointError:
        raise
    except Exception as exc:  # a manifest whose arch does not fit the tensors, a bad file
        raise CheckpointError(f"{weights}: cannot load the encoder ({str(exc).splitlines()[0]})") from None
    enc.to(map_location).requires_grad_(False)
    return enc.eval()


def encoder_manifest(enc: SSLEncoder, sha256: str, **info: Any) -> dict:
    """The manifest written beside ``encoder.safetensors``: format, file, SHA-256,
    architecture, parameter count and ``info`` (how it was trained, its probe accuracy)."""
    return {"format": MANIFEST_FORMAT, "format_version": 1, "file": ENCODER_FILE, "sha256": sha256,
            "arch": enc.arch.to_dict(), "stride": enc.stride, "feature_dim": enc.feature_dim,
            "params": sum(p.numel() for p in enc.parameters()), **info}
