"""FORA: reuse the residual of the whole block stack between full calls.

Selvaraju et al. 2024, "FORA: Fast-Forward Caching in Diffusion Transformer
Acceleration" (arXiv 2407.01425), cache the attention and MLP outputs of every layer at
one step and reuse them for the next ``N - 1`` steps (their "static caching" with
interval N). In a residual stack, reusing every branch output is the same as adding the
cached stack residual ``out - in`` to the current input tokens, which is what is stored
here (one ``[B, N, D]`` tensor instead of ``2 x depth``); the adaLN gates are part of the
cached residual, as in FORA.
"""

from __future__ import annotations

from .base import BlockPolicyBase, _positive_int, step_of


class FORA(BlockPolicyBase):
    """Full stack every ``interval`` model calls, cached residual in between.

    Args:
        interval: N, calls between full computations (1 = always full).
        warmup: the first ``warmup`` calls always run in full.
        cfg: ``"batched"`` or ``"split"`` (see ``BlockPolicyBase``).
    """

    name = "fora"

    def __init__(self, interval: int = 3, warmup: int = 0, cfg: str = "batched"):
        super().__init__(cfg)
        self.interval = _positive_int(self.name, "interval", interval)
        self.warmup = _positive_int(self.name, "warmup", warmup, 0)

    def decide_and_run(self, model, tokens, c_act, ctx, st):
        s = step_of(ctx)
        last = st.get("last_full")
        if last is None or s < self.warmup or s - last >= self.interval:
            out = self.run_blocks(model, tokens, c_act, ctx)
            st["residual"], st["last_full"] = out - tokens, s
            self.stats.full_calls += 1
            return out
        return tokens + st["residual"]
