"""LRQ-DiT's outlier-aware rotation (its Adaptive Rotation Scheme, second branch).

LRQ-DiT (Yang et al. 2025, "Log-Rotation Post-Training Quantization of Diffusion
Transformers") rotates the input of each linear layer before quantizing it: a
randomised Hadamard where the layer's activation fluctuation ``J = ||X||_F / sqrt(BNC)``
(its eq. 11) is below a threshold (1 in the paper), and where it is not, the DuQuant-style
rotation ``X R1 P R2`` (eq. 12) built here from calibration activations. The selection and
the Hadamard branch are in :func:`flowdit.compress.quantize.quantize_model`; the twin-log
weight quantizer is :func:`flowdit.models.quantized.twin_log_quantize`.
"""

from __future__ import annotations

import torch

from ..models.quantized.rotation import hadamard
from ..utils.seeding import seeded_generator

__all__ = ["greedy_block_rotation", "outlier_aware_rotation", "zigzag_permutation"]


def _swap(r: torch.Tensor, i: int, j: int) -> torch.Tensor:
    # The reference's ``exchange_row_col``: swap rows i, j and columns i, j, i.e. P r P.
    idx = torch.arange(r.shape[0])
    idx[i], idx[j] = j, i
    return r[idx][:, idx]


def _base_rotation(k: int, generator: torch.Generator) -> torch.Tensor:
    """``Rot_k @ diag(1, Q)`` with ``Q`` a random orthogonal ``[k-1, k-1]`` (the reference's
    ``get_rot``). The reference reads ``Rot_k`` from DuQuant's ``Rot.pkl``, which its
    repository does not ship; here it is the normalised Hadamard matrix, whose first row is
    uniform, so the channel swapped to position 0 is spread evenly over the block."""
    q, _ = torch.linalg.qr(torch.randn(k - 1, k - 1, generator=generator))
    full = torch.zeros(k, k)
    full[0, 0] = 1.0
    full[1:, 1:] = q
    return hadamard(k) @ full


def greedy_block_rotation(x: torch.Tensor, block: int, max_steps: int, generator: torch.Generator) -> torch.Tensor:
    """DuQuant's greedy rotation of ``x [M, C]`` by blocks of ``block`` channels, ``[block, block]``.

    Restates ``ViDiTQuantizedLinear.rotation`` (yanglianwei/LRQ-DiT,
    ``quant_utils/qdiff/viditq/viditq_quant_layer.py``): up to ``max_steps`` times, the
    channel holding the largest-magnitude entry of the block view ``x.reshape(-1, block)``
    is swapped to position 0 and the base rotation applied; the rotation kept is the
    prefix of steps after which the range ``max - min`` of the view was smallest.
    One deviation: the reference takes the swapped index from the entry's *row* of the
    view (``divmod(argmax, block)[0]``), a token index; flowdit takes its column, the
    channel that holds the outlier, which is what the swap is for.
    """
    rot = _base_rotation(block, generator)
    w = x.float().reshape(-1, block)
    peaks, ids = [], []
    for _ in range(max_steps + 1):
        hi, lo = int(w.argmax()), int(w.argmin())
        peaks.append(float(w.view(-1)[hi] - w.view(-1)[lo]))
        c_hi, c_lo = hi % block, lo % block
        ids.append(c_hi if w.view(-1)[hi].abs() > w.view(-1)[lo].abs() else c_lo)
        if len(ids) <= max_steps:
            w = w @ _swap(rot, 0, ids[-1])
    keep = int(torch.tensor(peaks).argmin())
    out = torch.eye(block)
    for c in ids[:keep]:
        out = out @ _swap(rot, 0, c)
    return out


def zigzag_permutation(x: torch.Tensor, k: int = 9) -> torch.Tensor:
    """DuQuant's zigzag channel permutation of ``x [M, C]``, ``[C]`` (restates
    ``ViDiTQuantizedLinear.permutation_zigzag``): channels sorted by range ``max - min``,
    cut into consecutive groups of ``k``, then dealt out: first element of every group,
    then the second, ... so large-range channels land far apart."""
    marks = x.amax(0) - x.amin(0)
    order = torch.argsort(marks, descending=True)
    groups = [order[i:i + k] for i in range(0, order.numel(), k)]
    return torch.cat([torch.stack([g[i] for g in groups if i < g.numel()]) for i in range(k)])


def outlier_aware_rotation(x: torch.Tensor, block: int = 128, max_steps: int = 256, k: int = 9,
                           seed: int = 0, index: int = 0) -> dict[str, torch.Tensor]:
    """The factors ``{rot1, perm, rot2}`` of ``x -> ((x R1) P) R2`` calibrated on the smoothed
    activations ``x [M, C]`` (restates ``online_duquant_cali`` with one permutation, the
    reference's default). ``block`` is capped at ``C``, which it must divide."""
    c = x.shape[1]
    block = min(block, c)
    if c % block:
        raise ValueError(f"block size {block} does not divide the {c} input channels")
    g = seeded_generator(seed, 0xD0, index)
    x = x.float()
    rot1 = greedy_block_rotation(x, block, max_steps, g)
    x = (x.reshape(-1, block) @ rot1).reshape(-1, c)
    perm = zigzag_permutation(x, k)
    x = x[:, perm]
    rot2 = greedy_block_rotation(x, block, max_steps, g)
    return {"rot1": rot1, "perm": perm, "rot2": rot2}
