"""Orthogonal input rotations for quantized linear layers.

A linear layer is unchanged by rotating its input and its weight alike,
``x W^T = (x R)(W R)^T`` for an orthogonal ``R [in, in]``; a rotation that spreads each
token's large channels over many channels makes the rotated activation easier to
quantize per token (QuaRot, LRQ-DiT's Adaptive Rotation Scheme).
"""

from __future__ import annotations

import math

import torch

__all__ = ["hadamard", "is_power_of_two", "random_hadamard"]


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def hadamard(n: int) -> torch.Tensor:
    """The normalised Sylvester-Hadamard matrix ``H_n / sqrt(n)``, ``[n, n]`` float32, orthogonal
    and symmetric, for ``n`` a power of two: ``H_1 = [1]``, ``H_2n = [[H, H], [H, -H]]``."""
    if not is_power_of_two(n):
        raise ValueError(f"a Sylvester-Hadamard matrix needs a power-of-two size, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def random_hadamard(n: int, signs: torch.Tensor) -> torch.Tensor:
    """QuaRot's randomised Hadamard rotation ``diag(signs) H_n / sqrt(n)``, ``[n, n]``.

    ``signs [n]`` holds +-1 (stored with the layer, so the rotation is rebuilt exactly).
    Every entry has magnitude ``1 / sqrt(n)``: one channel's outlier is spread evenly over
    all ``n`` rotated channels.
    """
    if signs.shape != (n,):
        raise ValueError(f"signs must have shape ({n},), got {tuple(signs.shape)}")
    return signs.float()[:, None] * hadamard(n)


def block_diag_repeat(r: torch.Tensor, n: int) -> torch.Tensor:
    """``[n, n]`` block-diagonal matrix with the ``[k, k]`` block ``r`` repeated ``n / k`` times
    (what ``x.reshape(-1, k) @ r`` does to each row of ``x [M, n]``)."""
    k = r.shape[0]
    if n % k:
        raise ValueError(f"block size {k} does not divide {n}")
    return torch.block_diag(*([r.float()] * (n // k)))


def outlier_rotation_matrix(rot1: torch.Tensor, perm: torch.Tensor, rot2: torch.Tensor) -> torch.Tensor:
    """The ``[n, n]`` orthogonal map ``x -> ((x R1) P) R2`` of DuQuant / LRQ-DiT's outlier-aware
    rotation: block rotation ``R1`` (``[k, k]``, repeated over the ``n / k`` blocks), the channel
    permutation ``perm [n]`` (column ``j`` of the result is column ``perm[j]``), block
    rotation ``R2``."""
    n = perm.numel()
    p = torch.zeros(n, n)
    p[perm.long(), torch.arange(n)] = 1.0
    return block_diag_repeat(rot1, n) @ p @ block_diag_repeat(rot2, n)
