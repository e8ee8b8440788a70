"""Token merging inside every block (ToMe for diffusion).

Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion" (after Bolya et al.
2023, "Token Merging: Your ViT but Faster"): before a block, tokens are split into two
alternating sets A and B; each A token is matched to its most similar B token (cosine
similarity of the features), and the ``r = ratio * N`` best-matched A tokens are averaged
into their partners (bipartite soft matching). The block runs on the ``N - r`` remaining
tokens; its update is copied back to every token of a merge ("unmerge"). The update,
not the output, is copied, so merged tokens keep their own residual stream.

Two forms: the block policy ``ToMe`` (``--accel tome:ratio=...``) owns the stack and merges
in every block; the step hook ``TokenMerging`` does the same at the ``block`` hook point,
so it composes with a block policy that runs whole blocks (a stack-level cache merges in
the blocks of its full calls).
"""

from __future__ import annotations

from typing import Callable

import torch

from .base import BlockPolicyBase, _in_range, block_flops

__all__ = ["ToMe", "TokenMerging", "bipartite_merge", "merged_update"]


def bipartite_merge(x: torch.Tensor, r: int) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Merge ``r`` tokens of ``x [B, N, D]``; return ``(merged [B, N - r, D], unmerge)``.

    ``unmerge(y [B, N - r, D]) -> [B, N, D]`` gives every original token the row of the
    merged token it went into.
    """
    B, N, D = x.shape
    a_idx = torch.arange(0, N, 2, device=x.device)
    b_idx = torch.arange(1, N, 2, device=x.device)
    r = min(r, len(a_idx))
    a, b = x[:, a_idx], x[:, b_idx]
    an = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    bn = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    best, partner = (an @ bn.transpose(1, 2)).max(dim=-1)  # [B, Na]
    order = best.argsort(dim=-1, descending=True)
    src, keep = order[:, :r], order[:, r:]  # indices into A
    dst = partner.gather(1, src)  # indices into B
    b_sum = b.scatter_add(1, dst[..., None].expand(-1, -1, D), a.gather(1, src[..., None].expand(-1, -1, D)))
    count = torch.ones(B, b.shape[1], 1, device=x.device, dtype=x.dtype).scatter_add(
        1, dst[..., None], torch.ones(B, r, 1, device=x.device, dtype=x.dtype))
    merged = torch.cat([a.gather(1, keep[..., None].expand(-1, -1, D)), b_sum / count], dim=1)
    n_keep = keep.shape[1]

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        out = torch.empty(B, N, y.shape[-1], device=y.device, dtype=y.dtype)
        y_keep, y_b = y[:, :n_keep], y[:, n_keep:]
        a_out = torch.empty(B, len(a_idx), y.shape[-1], device=y.device, dtype=y.dtype)
        a_out.scatter_(1, keep[..., None].expand(-1, -1, y.shape[-1]), y_keep)
        a_out.scatter_(1, src[..., None].expand(-1, -1, y.shape[-1]), y_b.gather(1, dst[..., None].expand(-1, -1, y.shape[-1])))
        out[:, a_idx] = a_out
        out[:, b_idx] = y_b
        return out

    return merged, unmerge


def merged_update(x: torch.Tensor, r: int, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One block on merged tokens: ``x + unmerge(run(x_m) - x_m)`` with ``x_m`` the ``N - r``
    tokens of ``bipartite_merge(x [B, N, D], r)``."""
    xm, unmerge = bipartite_merge(x, r)
    return x + unmerge(run(xm) - xm)


class TokenMerging:
    """ToMe as a ``block`` step hook (``flowdit.core.hooks``): each whole-block call runs on
    ``N - int(ratio N)`` merged tokens. ``ratio`` in [0, 0.5]; 0 leaves every block as it is.
    Register it with ``StepContext(block_policy=..., hooks=[TokenMerging(0.3)])``."""

    name = "tome"

    def __init__(self, ratio: float = 0.3):
        self.ratio = _in_range(self.name, "ratio", ratio, 0.0, 0.5)

    def reset(self) -> None:
        """Nothing is kept between calls."""

    def block(self, block, x: torch.Tensor, c_act: torch.Tensor, ctx, run) -> torch.Tensor:
        """``x [B, N, D]`` through ``run`` on merged tokens."""
        r = int(self.ratio * x.shape[1])
        return run(x) if r == 0 else merged_update(x, r, run)


class ToMe(BlockPolicyBase):
    """Run every block on ``(1 - ratio) N`` merged tokens.

    Args:
        ratio: fraction of the tokens merged away in each block, in [0, 0.5] (at most
            the A set); 0 = exact.
        cfg: ``"batched"`` or ``"split"``.
    """

    name = "tome"
    requires = frozenset({"token_layout"})

    def __init__(self, ratio: float = 0.3, cfg: str = "batched"):
        super().__init__(cfg)
        self.ratio = _in_range(self.name, "ratio", ratio, 0.0, 0.5)

    def decide_and_run(self, model, tokens, c_act, ctx, st):
        B, N, _ = tokens.shape
        r = int(self.ratio * N)
        if r == 0:
            self.stats.full_calls += 1
            return self.run_blocks(model, tokens, c_act, ctx)
        x = tokens
        for block in model.blocks:
            x = merged_update(x, r, lambda xm: block(xm, c_act, ctx))
        m = N - min(r, (N + 1) // 2)
        self.stats.block_evals += m / N
        self.stats.flops += len(model.blocks) * B * block_flops(model, m)
        return x
