"""Building blocks of a DiT: embedders, positional encodings, the MLP, modulation.

Names of submodules follow the public DiT / SiT checkpoints (Peebles & Xie 2023,
facebookresearch/DiT) so that their weights map onto ours key by key.
"""

from __future__ import annotations

import math

import numpy as np
from typing import Optional

import torch
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``.

    Args:
        x: tokens ``[B, N, D]``.
        shift, scale: per-sample ``[B, D]``, broadcast over tokens.
    """
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a (scaled) time, as in "Attention is all you need" / DiT.

    Args:
        t: ``[B]`` float times (already multiplied by the model's ``time_scale``).
        dim: embedding width (even).
    Returns:
        ``[B, dim]`` float32: ``[cos(t w_i), sin(t w_i)]`` with ``w_i = max_period^(-i / (dim/2))``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def batch_conditions(x: torch.Tensor, t, y: Optional[torch.Tensor], null_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A model call's times and labels as ``[B]`` tensors on ``x``'s device: a scalar ``t``
    broadcast to the batch of ``x [B, ...]``, ``t`` in float32, and ``y = None`` replaced by
    the null class (unconditional)."""
    B = x.shape[0]
    t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
    if t.ndim == 0:
        t = t.expand(B)
    if y is None:
        y = torch.full((B,), null_class, device=x.device, dtype=torch.long)
    return t, y


class TimestepEmbedder(nn.Module):
    """``t [B] -> [B, D]``: sinusoidal features followed by a two-layer SiLU MLP (DiT, sec. 3.2).

    ``time_scale`` maps flowdit's ``t in [0, 1]`` onto the range the sinusoid was designed
    for (1000 as in DDPM-indexed DiT and SD3); it is a property of the embedding, not a
    change of the time convention.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, time_scale: float = 1000.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.time_scale = time_scale

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t * self.time_scale, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class index ``[B] -> [B, D]``; index ``num_classes`` is the learned null class used by
    classifier-free guidance. Label dropout is drawn by the trainer (deterministically per
    sample), not here, so the model stays a pure function of its inputs."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches -> tokens: ``[B, C, H, W] -> [B, (H/p)(W/p), D]``."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The transpose is a strided view; element-wise ops downstream keep its layout,
        # so without the copy every LayerNorm and linear of every block would make the
        # residual stream contiguous again, forward and backward.
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class Mlp(nn.Module):
    """Transformer MLP ``fc2(GELU_tanh(fc1(x)))`` (the tanh GELU of DiT)."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """Gated feed-forward ``w2(SiLU(w1 x) * w3 x)`` without biases (Shazeer 2020, "GLU
    Variants Improve Transformer"; LLaMA's ``FeedForward``): ``[..., D] -> [..., D]``
    through ``hidden`` gated units. Parameter names ``w1``, ``w2``, ``w3`` as in LLaMA and
    DDT (``flowdit.models.ddt``), which picks ``hidden = int(2 * mlp_ratio * D / 3)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        # Construction order w1, w3, w2 (the reference's): same seed, same initial weights.
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned gain (used for QK-norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding (MAE / DiT), ``[grid_size**2, embed_dim]``.

    Half of the channels encode the row, half the column, each with 1D sin-cos features
    of frequencies ``10000^(-2i/d)``; tokens are in row-major order, matching ``PatchEmbed``.
    """
    if embed_dim % 4:
        raise ValueError(f"hidden size {embed_dim} must be divisible by 4 for 2D sin-cos positions")

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.arange(grid_size, dtype=np.float64)
    gw, gh = np.meshgrid(coords, coords)  # gw varies along columns: row-major tokens
    emb = np.concatenate([one_d(embed_dim // 2, gw), one_d(embed_dim // 2, gh)], axis=1)
    return torch.tensor(emb, dtype=torch.float32)


def xavier_linears_and_patches(model: nn.Module, patch_proj: nn.Module) -> None:
    """DiT's base initialisation: Xavier-uniform weights and zero biases for every linear
    layer of ``model``, then the patch-embedding convolution ``patch_proj`` Xavier-uniform
    over its flattened ``[D, C p p]`` weight with a zero bias."""

    def basic(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    model.apply(basic)
    w = patch_proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(patch_proj.bias)
