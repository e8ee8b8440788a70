"""FORA: reuse every block's attention and MLP outputs between full calls.

Selvaraju et al. 2024, "FORA: Fast-Forward Caching in Diffusion Transformer
Acceleration" (arXiv 2407.01425), "static caching" with interval N. The authors' code
(prathebaselva/FORA, ``src/models.py``, ``DiTBlock.forward``, ``boost_infer_static``)
stores, on a full call, each block's attention output and MLP output *before* the adaLN
gate, and on a cached call adds them back multiplied by the *current* call's gates
(``x + gate_msa * attn_cached``, then ``x + gate_mlp * mlp_cached``); shift and scale sit
inside the skipped branches, and the final layer always runs. A call is full when its
reverse step index ``i`` (counting down from ``numstep - 1`` to 0) satisfies
``i == numstep - 1 or i % N == 0``: the first call, then every N-th counted from the
*last* call, which is therefore always full.

``cache="stack"`` is flowdit's cheaper variant: one ``[B, N, D]`` tensor, the residual
``out - in`` of the whole stack, is stored and added to the current input tokens. It
freezes the gates of the last full call, which the per-block form does not (DiT's gates
depend on ``t``). ``schedule="start"`` counts the interval from the first call instead.

As a cache, FORA is the gate ``ScheduleGate`` (schedule ``fora`` or ``start``, with a
warm-up) combined with the reuse ``BlockReuse`` (``cache="blocks"``) or ``ResidualReuse``
(``cache="stack"``); the schedule itself is ``fora_full_call``.
"""

from __future__ import annotations

from .base import CACHE_TARGETS, _choice, _positive_int
from .cache import Cache
from .gates import ScheduleGate, fora_full_call
from .reuses import BlockReuse, ResidualReuse

__all__ = ["FORA", "fora_full_call", "SCHEDULES"]

SCHEDULES = ("fora", "start")


class FORA(Cache):
    """Full stack on FORA's schedule, every block's cached branch outputs in between.

    ``ScheduleGate(interval, schedule, warmup)`` + ``BlockReuse()`` (or ``ResidualReuse()``
    with ``cache="stack"``).

    Args:
        interval: N, the caching interval (1 = always full).
        cache: ``"blocks"`` (default, the reference: per-block pre-gate outputs times the
            current gates) or ``"stack"`` (the residual of the whole stack).
        schedule: ``"fora"`` (default: the reference's count-down rule, see
            ``fora_full_call``) or ``"start"`` (every N-th call from the first).
        warmup: the first ``warmup`` calls always run in full (0 in the reference).
        cfg: ``"batched"`` (default, as the reference: one cache for the doubled batch)
            or ``"split"`` (see ``BlockPolicyBase``).
    """

    name = "fora"

    def __init__(self, interval: int = 3, cache: str = "blocks", schedule: str = "fora", warmup: int = 0,
                 cfg: str = "batched"):
        super().__init__(cfg=cfg)
        self.interval = _positive_int(self.name, "interval", interval)
        self.cache = _choice(self.name, "cache", cache, CACHE_TARGETS)
        self.schedule = _choice(self.name, "schedule", schedule, SCHEDULES)
        self.warmup = _positive_int(self.name, "warmup", warmup, 0)
        self.combine(ScheduleGate(self.interval, self.schedule, self.warmup),
                     BlockReuse() if self.cache == "blocks" else ResidualReuse())
