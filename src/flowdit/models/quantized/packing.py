"""Bit packing of integer codes, so a b-bit weight takes b bits on disk."""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "packed_nbytes", "unpack_bits"]

_BYTE = torch.arange(8, dtype=torch.uint8)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes :func:`pack_bits` uses for ``numel`` codes of ``bits`` bits."""
    return (numel * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[...]`` (each ``< 2^bits``, ``1 <= bits <= 8``) into a flat uint8
    stream of ``ceil(numel * bits / 8)`` bytes, little-endian within each byte: code ``i``
    occupies stream bits ``i*bits .. i*bits + bits - 1``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes outside [0, {2 ** bits - 1}] cannot be packed in {bits} bits")
    stream = ((flat[:, None] >> torch.arange(bits, dtype=torch.int32)) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    return (stream.view(-1, 8).to(torch.uint8) << _BYTE).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 codes of the given ``shape``."""
    numel = 1
    for s in shape:
        numel *= int(s)
    if packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"{packed.numel()} packed bytes do not hold {numel} codes of {bits} bits")
    stream = ((packed.to(torch.int32)[:, None] >> _BYTE.to(torch.int32)) & 1).reshape(-1)[: numel * bits]
    codes = (stream.view(numel, bits) << torch.arange(bits, dtype=torch.int32)).sum(1)
    return codes.to(torch.uint8).view(*shape)
