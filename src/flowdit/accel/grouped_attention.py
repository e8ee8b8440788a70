"""GRAT-style grouped attention: each token attends only to a structured subset.

After "GRAT: Grouping First, Attending Smartly" (training-free acceleration of
diffusion transformers by grouped attention): the ``g x g`` token grid is cut into
``group x group`` tiles; a query attends to the keys of its own tile (``mode=local``) or
of every tile in the same tile row or tile column (``mode=criss``, the criss-cross
pattern). ``GroupedAttentionProcessor`` implements it with a boolean mask on the
default attention kernel, which gives the right result everywhere but saves time only
where a block-sparse kernel serves the mask; FLOPs are counted for the sparse pattern.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flowdit.errors import ConfigError
from flowdit.models.attention import merge_heads, qkv_heads

from .base import BlockPolicyBase, _positive_int, block_flops, full_compute

__all__ = ["GroupedAttentionProcessor", "GroupedAttention", "group_mask"]

MODES = ("criss", "local")


def group_mask(grid: int, group: int, mode: str = "criss", device=None) -> torch.Tensor:
    """Boolean ``[N, N]`` mask (``N = grid^2``, row-major tokens): True where query ``i``
    may attend to key ``j``. Tiles are ``group x group`` tokens; where ``group`` does not
    divide ``grid`` the last tile row and column are narrower."""
    if mode not in MODES:
        raise ConfigError(f"grat: mode must be one of {', '.join(MODES)}, got {mode!r}")
    rows = torch.arange(grid, device=device).repeat_interleave(grid) // group
    cols = torch.arange(grid, device=device).repeat(grid) // group
    same_r = rows[:, None] == rows[None, :]
    same_c = cols[:, None] == cols[None, :]
    return (same_r & same_c) if mode == "local" else (same_r | same_c)


class GroupedAttentionProcessor:
    """Attention under ``group_mask``; ``x [B, N, D] -> [B, N, D]``."""

    def __init__(self, group: int, mode: str = "criss"):
        self.group, self.mode = group, mode
        self._mask: torch.Tensor | None = None

    def __call__(self, attn, x: torch.Tensor, ctx=None) -> torch.Tensor:
        q, k, v = qkv_heads(attn, x, ctx)
        n = x.shape[1]
        grid = int(round(n**0.5))
        if self._mask is None or self._mask.shape[0] != n or self._mask.device != x.device:
            self._mask = group_mask(grid, self.group, self.mode, x.device)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask)
        return attn.proj(merge_heads(o))


class GroupedAttention(BlockPolicyBase):
    """Every block runs with grouped attention (processors swapped in for the call).

    Args:
        group: tile side in tokens; ``group`` equal to the grid side is full attention.
        mode: ``"criss"`` (tile row and column) or ``"local"`` (own tile).
        cfg: ``"batched"`` or ``"split"``.
    """

    name = "grat"
    requires = frozenset({"attention_processors"})

    def __init__(self, group: int = 2, mode: str = "criss", cfg: str = "batched"):
        super().__init__(cfg)
        self.group = _positive_int(self.name, "group", group)
        if mode not in MODES:
            raise ConfigError(f"grat: mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self._proc = GroupedAttentionProcessor(self.group, self.mode)

    def params(self) -> dict:
        return {"group": self.group, "mode": self.mode, "cfg": self.cfg_mode}

    def decide_and_run(self, model, tokens, c_act, ctx, st):
        B, N, _ = tokens.shape
        saved = [blk.attn.processor for blk in model.blocks]
        try:
            for blk in model.blocks:
                blk.attn.processor = self._proc
            out = full_compute(model, tokens, c_act, ctx)
        finally:
            for blk, proc in zip(model.blocks, saved):
                blk.attn.processor = proc
        keys = float(self._proc._mask.sum()) / N
        self.stats.block_evals += 1.0
        self.stats.flops += len(model.blocks) * B * block_flops(model, N, keys)
        return out

