"""Delta-DiT: cache the deltas of the rear blocks early and of the front blocks late.

Chen et al. 2024, "Delta-DiT: A Training-Free Acceleration Method Tailored for Diffusion
Transformers" (arXiv 2406.01125), observe that the front blocks of a DiT shape the
outline and the rear blocks the details; early in sampling (near noise) details matter
little, late the outline is settled. On a cached call they therefore replace a run of
``K`` blocks by the *delta* it produced at the last full call (their eq. 5,
``F_{i..j}(x) ~ x + (y_cached - x_cached)``): the rear ``K`` blocks while
``t >= boundary`` (early), the front ``K`` blocks afterwards. A full call every
``interval`` calls refreshes both deltas.
"""

from __future__ import annotations

from flowdit.errors import ConfigError

from .base import BlockPolicyBase, _in_range, _positive_int, step_of


class DeltaDiT(BlockPolicyBase):
    """Delta caching of a front or rear run of blocks (Delta-DiT).

    Args:
        interval: calls between full computations (1 = always full); the paper's N.
        blocks: K, the number of blocks whose delta is reused on a cached call.
        boundary: the time b in [0, 1]: calls with ``t >= b`` reuse the rear delta, the
            others the front delta (the paper's step boundary, expressed in t).
        warmup: the first calls that always run in full.
        cfg: ``"batched"`` or ``"split"``.
    """

    name = "delta_dit"

    def __init__(self, interval: int = 2, blocks: int = 1, boundary: float = 0.5, warmup: int = 1,
                 cfg: str = "batched"):
        super().__init__(cfg)
        self.interval = _positive_int(self.name, "interval", interval)
        self.blocks = _positive_int(self.name, "blocks", blocks)
        self.boundary = _in_range(self.name, "boundary", boundary, 0.0, 1.0)
        self.warmup = _positive_int(self.name, "warmup", warmup, 0)

    def decide_and_run(self, model, tokens, c_act, ctx, st):
        depth = len(model.blocks)
        k = self.blocks
        if k >= depth:
            raise ConfigError(f"delta_dit: blocks={k} must be smaller than the model's depth {depth}")
        s = step_of(ctx)
        last = st.get("last_full")
        if last is None or s < self.warmup or s - last >= self.interval:
            out, kept = self.run_blocks_keep(model, tokens, c_act, ctx, {k, depth - k})
            st["front_delta"], st["rear_delta"], st["last_full"] = kept[k] - tokens, out - kept[depth - k], s
            self.stats.full_calls += 1
            return out
        t = getattr(ctx, "t", None)
        early = t is None or t >= self.boundary
        if early:
            return self.run_blocks(model, tokens, c_act, ctx, 0, depth - k) + st["rear_delta"]
        return self.run_blocks(model, tokens + st["front_delta"], c_act, ctx, k, depth)
