"""Block-importance depth pruning (ShortGPT: Men et al. 2024, eq. 1), TinyFusion's baseline.

The Block Influence of block ``i`` is ``BI_i = 1 - E cos(h_i, h_{i+1})``, the expected
cosine similarity of its input and output token states; the blocks that change their input
least are removed. TinyFusion's ``prune_by_score.py`` (VainF/TinyFusion) is followed: the
score kept is the mean cosine similarity itself (so the *largest* are removed), averaged
over tokens and samples of 128 training images fed at a random time, and the last block is
never removed. Its DiT is fed the *clean* latents with a random timestep (no noise is
added); ``inputs="noised"`` feeds the states ``x_t`` the model is trained on instead.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models import DiT
from .depth import FlowBatch

__all__ = ["block_similarity", "importance_keep"]


@torch.no_grad()
def block_similarity(model: DiT, batches: Sequence[FlowBatch],
                     inputs: Literal["clean", "noised"] = "clean") -> list[float]:
    """Mean cosine similarity ``E cos(h_in, h_out)`` over tokens and samples of every block
    (a list of ``depth`` floats, the reference's ``BI_score``) on ``batches``: their clean
    data ``x0`` at their times (reference) or their states ``xt`` (``inputs="noised"``)."""
    if inputs not in ("clean", "noised"):
        raise ConfigError(f"block importance inputs must be 'clean' or 'noised', got {inputs!r}")
    per_block = [[] for _ in model.blocks]
    for b in batches:
        tokens, c = model.embed(b.x0 if inputs == "clean" else b.xt, b.t, b.y)
        for i, block in enumerate(model.blocks):
            out = block(tokens, c)
            per_block[i].append(float(F.cosine_similarity(out.float(), tokens.float(), dim=-1).mean()))
            tokens = out
    return [sum(s) / len(s) for s in per_block]


def importance_keep(scores: Sequence[float], keep: int) -> list[int]:
    """The blocks kept when the ``depth - keep`` most input-preserving ones (largest
    similarity) are removed, the last block excepted (``torch.topk(scores[:-1])`` in the
    reference)."""
    depth = len(scores)
    if not 1 <= keep <= depth:
        raise ConfigError(f"keep must be in [1, {depth}], got {keep}")
    n_pruned = depth - keep
    removed = torch.topk(torch.tensor(scores[:-1]), n_pruned, largest=True).indices.tolist() if n_pruned else []
    return [i for i in range(depth) if i not in removed]
