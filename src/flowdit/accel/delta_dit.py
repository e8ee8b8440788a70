"""Delta-DiT: cache the deltas of the rear blocks early and of the front blocks late.

Chen et al. 2024, "Delta-DiT: A Training-Free Acceleration Method Tailored for Diffusion
Transformers" (arXiv 2406.01125), observe that the front blocks of a DiT shape the
outline and the rear blocks the details; early in sampling (near noise) details matter
little, late the outline is settled. On a cached call they therefore replace a run of
``K`` blocks by the *delta* it produced at the last full call (their eq. 5,
``F_{i..j}(x) ~ x + (y_cached - x_cached)``): the rear ``K`` blocks while
``t >= boundary`` (early), the front ``K`` blocks afterwards. A full call every
``interval`` calls refreshes both deltas.

As a cache: the gate ``ScheduleGate`` with schedule ``since`` (full once ``interval``
calls have passed since the last full one, and during the warm-up) combined with the
reuse ``DeltaReuse`` (the deltas, eq. 5).
"""

from __future__ import annotations

from .base import _in_range, _positive_int
from .cache import Cache
from .gates import ScheduleGate
from .reuses import DeltaReuse

__all__ = ["DeltaDiT"]


class DeltaDiT(Cache):
    """Delta caching of a front or rear run of blocks (Delta-DiT).

    ``ScheduleGate(interval, "since", warmup)`` + ``DeltaReuse(blocks, boundary)``.

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
        super().__init__(cfg=cfg)
        self.interval = _positive_int(self.name, "interval", interval)
        self.blocks = _positive_int(self.name, "blocks", blocks)
        self.boundary = _in_range(self.name, "boundary", boundary, 0.0, 1.0)
        self.warmup = _positive_int(self.name, "warmup", warmup, 0)
        self.combine(ScheduleGate(self.interval, "since", self.warmup),
                     DeltaReuse(self.blocks, self.boundary, owner=self.name))
