"""RAS: region-adaptive sampling, updating only the patches that change most.

Liu et al. 2025, "Region-Adaptive Sampling for Diffusion Transformers" (arXiv
2502.10389). At each model call after a warm-up, patches are ranked by the spread of the
model's last output over the patch (the per-patch standard deviation of the velocity,
normalised by its mean over the patches of the image) plus a starvation term
``starvation * age`` for patches not updated for ``age`` calls; the top ``ratio`` of the
tokens run through the blocks, the others keep their last velocity. In attention the
active queries attend to every token: the keys and values of the inactive ones come
from a per-layer cache refreshed whenever a token is updated (an attention processor
installed only while this policy runs). A full call every ``full_every`` calls limits
the drift.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flowdit.models.attention import merge_heads, qkv_heads

from .base import BlockPolicyBase, _in_range, _positive_int, block_flops, step_of

__all__ = ["RAS", "KVCacheProcessor", "patchify"]


def patchify(v: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, N, p * p * C]`` in the DiT token order (inverse of ``unpatchify``)."""
    B, C, H, W = v.shape
    g = H // p
    x = v.reshape(B, C, g, p, g, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, g * g, p * p * C)


class KVCacheProcessor:
    """Attention for a subset of query tokens against all keys, from a key/value cache.

    ``idx`` (``[B, M]`` token indices, or ``None`` for all tokens) selects the tokens in
    the input ``x [B, M, D]``; their fresh keys and values overwrite the cache entries
    ``store[layer] = (k, v)`` (``[B, H, N, Dh]``) before attention over all ``N`` keys.
    """

    def __init__(self, store: dict, layer: int, idx: torch.Tensor | None):
        self.store, self.layer, self.idx = store, layer, idx

    def __call__(self, attn, x: torch.Tensor, ctx=None) -> torch.Tensor:
        q, k, v = qkv_heads(attn, x)
        if self.idx is not None:
            k_all, v_all = self.store[self.layer]
            B, H, M, Dh = k.shape
            index = self.idx[:, None, :, None].expand(B, H, M, Dh)
            k = k_all.scatter(2, index, k)
            v = v_all.scatter(2, index, v)
        self.store[self.layer] = (k, v)
        return attn.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class RAS(BlockPolicyBase):
    """Region-adaptive sampling as a block policy (see module docstring).

    Args:
        ratio: fraction of tokens updated on a partial call, in (0, 1].
        full_every: a full call every this many calls (the paper's periodic reset).
        warmup: the first calls that always run in full.
        starvation: weight of the age term in the patch score (0 = none).
        cfg: ``"batched"`` or ``"split"``.

    While active, the policy installs ``KVCacheProcessor`` on every attention layer and
    restores the previous processors afterwards, so custom processors (editing, sparse
    attention) do not run under RAS.
    """

    name = "ras"

    def __init__(self, ratio: float = 0.5, full_every: int = 4, warmup: int = 2, starvation: float = 0.1,
                 cfg: str = "batched"):
        super().__init__(cfg)
        self.ratio = _in_range(self.name, "ratio", ratio, 1e-9, 1.0)
        self.full_every = _positive_int(self.name, "full_every", full_every)
        self.warmup = _positive_int(self.name, "warmup", warmup, 0)
        self.starvation = _in_range(self.name, "starvation", starvation, 0.0, float("inf"))
        self._current: dict | None = None

    def _select(self, st: dict, p: int, n: int) -> torch.Tensor:
        spread = patchify(st["v"], p).float().std(dim=-1)
        score = spread / spread.mean(dim=1, keepdim=True).clamp_min(1e-12) + self.starvation * st["age"]
        m = max(1, int(round(self.ratio * n)))
        return score.topk(m, dim=1).indices.sort(dim=1).values

    def decide_and_run(self, model, tokens, c_act, ctx, st):
        s = step_of(ctx)
        B, N, D = tokens.shape
        self._current = st
        full = "v" not in st or s < self.warmup or s - st["last_full"] >= self.full_every
        idx = None if full else self._select(st, model.patch_size, N)
        x = tokens if idx is None else tokens.gather(1, idx[..., None].expand(-1, -1, D))
        store = st.setdefault("kv", {})
        saved = [blk.attn.processor for blk in model.blocks]
        try:
            for i, blk in enumerate(model.blocks):
                blk.attn.processor = KVCacheProcessor(store, i, idx)
            for blk in model.blocks:
                x = blk(x, c_act, ctx)
        finally:
            for blk, proc in zip(model.blocks, saved):
                blk.attn.processor = proc
        m = x.shape[1]
        depth = len(model.blocks)
        self.stats.block_evals += m / N
        self.stats.flops += depth * B * block_flops(model, m, N)
        st["idx"] = idx
        if idx is None:
            st["last_full"] = s
            st["age"] = torch.zeros(B, N, device=tokens.device)
            self.stats.full_calls += 1
            st["tokens"] = x
            return x
        out = st["tokens"].scatter(1, idx[..., None].expand(-1, -1, D), x)
        st["tokens"] = out
        st["age"] = (st["age"] + 1).scatter(1, idx, 0.0)
        return out

    def after_output(self, model, v: torch.Tensor, ctx) -> torch.Tensor:
        """Keep the last velocity of the patches not updated in this call.

        ``v [B, C, H, W]`` is the model output; returns it with inactive patches replaced
        by their previous values, and stores the result for the next ranking.
        """
        st = self._current
        if st is None:
            return v
        idx = st.get("idx")
        if idx is not None:
            p = model.patch_size
            prev = patchify(st["v"], p)
            new = patchify(v, p)
            merged = prev.scatter(1, idx[..., None].expand(-1, -1, prev.shape[-1]),
                                  new.gather(1, idx[..., None].expand(-1, -1, new.shape[-1])))
            v = model.unpatchify(merged).to(v.dtype)
        st["v"] = v
        self._current = None
        return v
