"""Reuses of the training-free caches: what a skipped call's stack output is made of.

A cache (``flowdit.accel.cache.Cache``) is one gate (``flowdit.accel.gates``) combined
with one reuse. The reuse protocol (``Reuse``), for the blocks ``start .. L-1`` that the
gate has not run itself (``call.start`` = the gate's ``prefix``, their input
``call.hidden``; ``call.tokens`` is the stack input):

* ``ready(st) -> bool``: whether the state holds what ``supply`` needs.
* ``record(call, st) -> out``: a full call: run ``blocks[start:]`` from ``call.hidden``
  (through the policy's accounted ``run_blocks*``), keep what later calls need, return
  the stack output ``[B, N, D]``.
* ``supply(call, st) -> out``: a skipped call: the stack output ``[B, N, D]`` made from
  the state (and the current call's conditioning where the reuse needs it).
* ``takes_prefix``: ``False`` for a reuse that must see the whole stack (Delta-DiT); a
  cache refuses to combine it with a gate that runs blocks first.

Reuses here: ``ResidualReuse`` (the residual ``out - h`` of the blocks it covers),
``BlockReuse`` (every block's pre-gate attention and MLP outputs, replayed under the
current gates: FORA), ``TaylorReuse`` (a Taylor forecast of the stack output, its
residual, or the per-block branch outputs: TaylorSeer, CG-Taylor) and ``DeltaReuse``
(Delta-DiT's delta of a front or rear block range). State keys: ``residual``,
``branches``, ``forecaster`` (with ``layout``), ``front_delta`` / ``rear_delta`` (``REUSE_KEYS``); a gate
uses other keys.
"""

from __future__ import annotations

from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Any, Callable

import torch

from flowdit.errors import ConfigError

from .base import CACHE_TARGETS, _flag, _in_range, block_flops, modulation_flops, replay_gated
from .forecast import FORMS, build_forecaster
from .gates import FEATURES, Check, _nonneg_int, _one_of, _pos_int

if TYPE_CHECKING:
    from .base import BlockPolicyBase
    from .cache import Call

__all__ = ["Reuse", "ResidualReuse", "BlockReuse", "TaylorReuse", "DeltaReuse", "REUSES", "REUSE_KEYS",
           "run_branches_from", "replay_branches_from", "flatten_branches", "unflatten_branches"]

REUSE_KEYS = ("residual", "branches", "forecaster", "layout", "front_delta", "rear_delta")


class Reuse:
    """Supplies a skipped call's stack output and records what it needs on a full call.

    Subclasses set ``name`` (the ``reuse=`` word of a ``cache:`` spec), ``spec``
    (``{key: (default, check)}``), ``requires`` (model capabilities, see
    ``base.MODEL_CAPABILITIES``) and implement ``ready``, ``record`` and ``supply``.
    """

    name = ""
    takes_prefix = True
    requires: frozenset[str] = frozenset()
    spec: dict[str, tuple[Any, Check]] = {}

    @classmethod
    def from_spec(cls, **values: Any) -> "Reuse":
        """The reuse from validated ``cache:`` spec values (one per key of ``spec``)."""
        return cls(**values)

    def ready(self, st: dict) -> bool:
        """Whether ``st`` holds what ``supply`` needs."""
        raise NotImplementedError

    def record(self, call: "Call", st: dict) -> torch.Tensor:
        """Run the blocks the gate has not run, keep what skipped calls need; the stack output."""
        raise NotImplementedError

    def supply(self, call: "Call", st: dict) -> torch.Tensor:
        """The stack output of a skipped call."""
        raise NotImplementedError


def run_branches_from(policy: "BlockPolicyBase", model: Any, tokens: torch.Tensor, c_act: torch.Tensor, ctx: Any,
                      start: int = 0) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``policy.run_blocks_branches`` for ``blocks[start:]``: the output and each block's
    pre-gate ``(a_i, m_i)`` (``[B, N, D]`` each), accounted as ``L - start`` blocks."""
    if start == 0:
        return policy.run_blocks_branches(model, tokens, c_act, ctx)
    branches = []
    for block in islice(model.blocks, start, None):
        tokens, a, m = block.forward_branches(tokens, c_act, ctx)
        branches.append((a, m))
    depth = len(model.blocks)
    n = depth - start
    policy.stats.block_evals += n / depth
    policy.stats.flops += n * tokens.shape[0] * block_flops(model, tokens.shape[1])
    return tokens, branches


def replay_branches_from(policy: "BlockPolicyBase", model: Any, tokens: torch.Tensor, c_act: torch.Tensor, ctx: Any,
                         branches: list[tuple[torch.Tensor, torch.Tensor]], start: int = 0) -> torch.Tensor:
    """``policy.replay_blocks`` for ``blocks[start:]``: ``x += g_a(c) a_i``, ``x += g_m(c) m_i``
    with the current call's gates, from ``tokens [B, N, D]`` (the output of block ``start - 1``)."""
    if start == 0:
        return policy.replay_blocks(model, tokens, c_act, ctx, branches)
    out = replay_gated(islice(model.blocks, start, None), tokens, c_act, branches)
    policy.stats.flops += modulation_flops(model) * (len(model.blocks) - start) * tokens.shape[0]
    return out


def flatten_branches(branches: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[list[torch.Tensor],
                                                                                        tuple[bool, ...]]:
    """The branch tensors in block order, ``a_0, m_0, a_1, ...`` (``[B, N, D]`` each), with
    the layout ``has_m[i]`` (``False`` where block ``i`` has one branch, ``m_i = None``)."""
    return [f for pair in branches for f in pair if f is not None], tuple(m is not None for _, m in branches)


def unflatten_branches(features: Any, layout: tuple[bool, ...]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Inverse of ``flatten_branches``: ``[(a_i, m_i or None)]`` from the flat sequence."""
    it, out = iter(features), []
    for has_m in layout:
        a = next(it)
        out.append((a, next(it) if has_m else None))
    return out


class ResidualReuse(Reuse):
    """The residual of the covered blocks: full calls store ``r = out - h`` (``h`` =
    ``call.hidden``, ``[B, N, D]``), skipped calls return ``h + r``. With a gate that runs
    no block this is the whole stack's residual (FORA's and TaylorSeer's ``cache=stack``
    with order 0, TeaCache); after FBCache's first block, the residual of blocks
    ``1 .. L-1``. It freezes the adaLN gates of the last full call."""

    name = "residual"

    def ready(self, st):
        return "residual" in st

    def record(self, call, st):
        out = call.policy.run_blocks(call.model, call.hidden, call.c_act, call.ctx, call.start)
        st["residual"] = out - call.hidden
        return out

    def supply(self, call, st):
        return call.hidden + st["residual"]


class BlockReuse(Reuse):
    """FORA's per-block reuse: full calls keep every covered block's attention and MLP
    outputs *before* their adaLN gates (``[(a_i, m_i)]``, ``[B, N, D]`` each); skipped
    calls add them back multiplied by the *current* call's gates
    (``BlockPolicyBase.replay_blocks``: gates ``[B, D]`` or per token ``[B, N, D]``; a
    single-branch block keeps ``m_i = None``), computing only the modulation vectors."""

    name = "blocks"
    requires = frozenset({"block_branches"})

    def ready(self, st):
        return "branches" in st

    def record(self, call, st):
        out, st["branches"] = run_branches_from(call.policy, call.model, call.hidden, call.c_act, call.ctx,
                                                call.start)
        return out

    def supply(self, call, st):
        return replay_branches_from(call.policy, call.model, call.hidden, call.c_act, call.ctx, st["branches"],
                                    call.start)


class TaylorReuse(Reuse):
    """A Taylor forecast about the last full call, abscissa the model-call index.

    ``cache="blocks"``: every covered block's pre-gate attention and MLP outputs, stacked
    into one fp32 tensor ``[F, B, N, D]`` (``a_0, m_0, a_1, ...``; ``F = 2 (L - start)``
    less one per single-branch block, see ``flatten_branches``) so one forecaster serves
    all of them; a skipped call replays the forecast under the current
    gates (TaylorSeer). ``cache="stack"``: one ``[B, N, D]`` feature of the whole stack,
    the output ``h_L`` (``feature="output"``, returned as is) or the residual ``h_L - x``
    against the stack input (``"residual"``, added to the current input). On a skipped
    call after a prefix-running gate the stack forecast replaces the prefix's output (as
    CG-Taylor does); the per-block forecast continues from it.

    Args:
        order: the highest derivative estimated (0 = plain reuse).
        cache: ``"blocks"`` or ``"stack"``.
        feature: the stack feature, ``"residual"`` or ``"output"``.
        forecaster: ``order -> forecaster`` with ``update(s, f)`` / ``predict(s)``
            (``forecast.build_forecaster`` or ``build_history`` with a form bound).
        restart_before: a full call at ``s < restart_before`` starts a fresh forecaster
            (only ``D^0`` kept); so do the first call and every new state.
    """

    name = "taylor"
    spec = {"order": (4, _nonneg_int), "form": ("paper", _one_of(FORMS)), "cache": ("blocks", _one_of(CACHE_TARGETS)),
            "feature": ("residual", _one_of(FEATURES)), "spaced": (False, _flag), "warmup": (2, _nonneg_int)}

    def __init__(self, order: int = 4, cache: str = "blocks", feature: str = "residual",
                 forecaster: Callable[[int], Any] | None = None, restart_before: int = 1):
        self.order, self.cache, self.feature = order, cache, feature
        self.forecaster = forecaster or partial(build_forecaster, "paper")
        self.restart_before = restart_before
        self.requires = frozenset({"block_branches"}) if cache == "blocks" else frozenset()

    @classmethod
    def from_spec(cls, order, form, cache, feature, spaced, warmup):
        """TaylorSeer's forecaster of ``form`` and its restart rule: the warm-up calls before
        the last one restart the estimates (with ``spaced``, the last one too)."""
        return cls(order, cache, feature, partial(build_forecaster, form), warmup if spaced else warmup - 1)

    def ready(self, st):
        return "forecaster" in st

    def record(self, call, st):
        s = call.step
        if self.cache == "stack":
            out = call.policy.run_blocks(call.model, call.hidden, call.c_act, call.ctx, call.start)
            feature = out - call.tokens if self.feature == "residual" else out
        else:
            out, branches = run_branches_from(call.policy, call.model, call.hidden, call.c_act, call.ctx, call.start)
            # Differences are taken in fp32: under bf16 autocast the branch outputs are
            # bf16, whose 8-bit mantissa would swamp the small changes between calls.
            flat, st["layout"] = flatten_branches(branches)
            feature = torch.stack(flat).float()
        fc = st.get("forecaster")
        if fc is None or s < self.restart_before:
            fc = st["forecaster"] = self.forecaster(self.order)
        fc.update(s, feature)
        return out

    def supply(self, call, st):
        fc = st["forecaster"]
        if self.cache == "stack":
            pred = fc.predict(call.step)
            return call.tokens + pred if self.feature == "residual" else pred
        predicted = unflatten_branches(fc.predict(call.step).unbind(0), st["layout"])
        return replay_branches_from(call.policy, call.model, call.hidden, call.c_act, call.ctx, predicted,
                                    call.start)


class DeltaReuse(Reuse):
    """Delta-DiT's reuse: the delta of a run of ``blocks`` blocks (K).

    Full calls keep the front delta ``h_K - x`` and the rear delta ``h_L - h_{L-K}``
    (``[B, N, D]`` each). Skipped calls with ``t >= boundary`` (early, or without a time)
    run blocks ``0 .. L-K-1`` and add the rear delta; later ones add the front delta to
    the input and run blocks ``K .. L-1``. Needs the whole stack (``takes_prefix = False``).
    """

    name = "delta"
    takes_prefix = False
    spec = {"blocks": (1, _pos_int), "boundary": (0.5, lambda o, k, v: _in_range(o, k, v, 0.0, 1.0))}

    def __init__(self, blocks: int = 1, boundary: float = 0.5, owner: str = "delta_dit"):
        self.blocks, self.boundary, self.owner = blocks, boundary, owner

    @classmethod
    def from_spec(cls, blocks, boundary):
        return cls(blocks, boundary, owner="cache")

    def _depth(self, model) -> int:
        depth = len(model.blocks)
        if self.blocks >= depth:
            raise ConfigError(f"{self.owner}: blocks={self.blocks} must be smaller than the model's depth {depth}")
        return depth

    def ready(self, st):
        return "front_delta" in st

    def record(self, call, st):
        depth, k, tokens = self._depth(call.model), self.blocks, call.tokens
        out, kept = call.policy.run_blocks_keep(call.model, tokens, call.c_act, call.ctx, {k, depth - k})
        st["front_delta"], st["rear_delta"] = kept[k] - tokens, out - kept[depth - k]
        return out

    def supply(self, call, st):
        depth, k = self._depth(call.model), self.blocks
        policy, model, tokens, c_act, ctx = call.policy, call.model, call.tokens, call.c_act, call.ctx
        t = getattr(ctx, "t", None)
        if t is None or t >= self.boundary:
            return policy.run_blocks(model, tokens, c_act, ctx, 0, depth - k) + st["rear_delta"]
        return policy.run_blocks(model, tokens + st["front_delta"], c_act, ctx, k, depth)


REUSES: dict[str, type[Reuse]] = {cls.name: cls for cls in (ResidualReuse, BlockReuse, TaylorReuse, DeltaReuse)}
"""The reuses a ``cache:...,reuse=NAME`` spec may name."""
