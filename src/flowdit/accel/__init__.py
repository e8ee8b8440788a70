"""Training-free acceleration of DiT sampling: block policies and attention processors.

A block policy decides, per model call, how the transformer block stack runs (all
blocks, a cached residual, a Taylor forecast, some blocks, some tokens). Build one from
a spec and pass it to ``generate(..., accel=policy)`` or ``flowdit sample --accel SPEC``::

    from flowdit.accel import build_policy
    policy = build_policy("taylorseer:interval=4,order=2")

The caches are a gate (full or skip, per call: ``flowdit.accel.gates``) combined with a
reuse (what a skipped call returns: ``flowdit.accel.reuses``) in ``Cache``
(``flowdit.accel.cache``); FORA, Delta-DiT, TaylorSeer, FBCache, TeaCache and
confidence-gated Taylor are named combinations, and ``cache:gate=...,reuse=...`` builds
any other. ``ddt_share`` reuses a DDT's encoder state between steps (``flowdit.accel.ddt_share``,
docs/ddt.md).

See ``docs/acceleration.md``.
"""

from flowdit.sampling.context import BlockPolicy, StepContext

from .base import BlockPolicyBase, FullCompute, PolicyStats, block_flops
from .cache import Cache, Call
from .ddt_share import DDTShare, dp_schedule, encoder_similarity
from .delta_dit import DeltaDiT
from .first_block_cache import FirstBlockCache, TeaCache, calibrate_teacache
from .forecast import NewtonForecaster, TaylorForecaster, TaylorHistory
from .fora import FORA
from .gated_taylor import GatedTaylor
from .gates import GATES, ConfidenceGate, FirstBlockGate, Gate, ScheduleGate, TeaCacheGate
from .grouped_attention import GroupedAttention, GroupedAttentionProcessor, group_mask
from .ras import RAS, KVCacheProcessor
from .registry import POLICIES, build_policy, parse_spec, policy_keys
from .reuses import REUSES, BlockReuse, DeltaReuse, ResidualReuse, Reuse, TaylorReuse
from .taylorseer import TaylorSeer
from .tome import TokenMerging, ToMe, bipartite_merge

__all__ = [
    "BlockPolicy", "StepContext", "BlockPolicyBase", "FullCompute", "PolicyStats", "block_flops",
    "FORA", "DeltaDiT", "TaylorSeer", "GatedTaylor", "FirstBlockCache", "TeaCache", "calibrate_teacache",
    "RAS", "KVCacheProcessor", "ToMe", "TokenMerging", "bipartite_merge", "GroupedAttention", "GroupedAttentionProcessor",
    "group_mask", "TaylorForecaster", "NewtonForecaster", "TaylorHistory", "POLICIES", "build_policy", "parse_spec",
    "policy_keys", "Cache", "Call", "Gate", "ScheduleGate", "FirstBlockGate", "TeaCacheGate", "ConfidenceGate", "GATES",
    "Reuse", "ResidualReuse", "BlockReuse", "TaylorReuse", "DeltaReuse", "REUSES",
    "DDTShare", "dp_schedule", "encoder_similarity",
]
