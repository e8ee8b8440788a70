"""Reading a DiT's block outputs inside the forward pass that is being trained.

Representation-alignment objectives (REPA, SRA) compare the tokens after block ``k`` with
a target. They read them through a block hook (:mod:`flowdit.core.hooks`) on a step
context handed to the model, so that the tokens are those of the very forward pass whose
velocity is regressed (one forward per step, gradients flowing into blocks ``1..k``), with
no change to the model. Block numbers here count from 1, as the papers' code does
("the output of block 8" is ``blocks[7]``).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from ...core.hooks import Hook, StepContext
from ...errors import ConfigError

__all__ = ["BlockTap", "check_blocks", "scaled_block", "inner_velocity_objective", "tapped_velocity", "block_outputs"]


class _Enough(Exception):
    """Raised by a stopping tap once it holds every block it was asked for."""


class BlockTap(Hook):
    """A ``block`` hook that keeps the outputs ``[B, N, D]`` of chosen blocks (1-based
    numbers into ``model.blocks``) of the model call it is active in, in ``outputs``.

    ``stop``: end the forward pass (by an exception :func:`block_outputs` catches) right
    after the last chosen block, for frozen networks whose later blocks are not needed."""

    name = "block_tap"

    def __init__(self, model: torch.nn.Module, blocks: Iterable[int], stop: bool = False):
        self.numbers = {id(b): i + 1 for i, b in enumerate(model.blocks)}
        self.wanted = sorted(set(blocks))
        self.stop = stop
        self.outputs: dict[int, Tensor] = {}

    def reset(self) -> None:
        self.outputs = {}

    def block(self, block, x: Tensor, c_act: Tensor, ctx: StepContext, run) -> Tensor:
        out = run(x)
        n = self.numbers.get(id(block))
        if n in self.wanted:
            self.outputs[n] = out
            if self.stop and n == self.wanted[-1]:
                raise _Enough
        return out


def check_blocks(model: torch.nn.Module, blocks: dict[str, int]) -> None:
    """Refuse a model without a ``blocks`` list or a block number outside ``1..depth``,
    naming the config key (``{key: number}``)."""
    stack = getattr(model, "blocks", None)
    if not isinstance(stack, torch.nn.ModuleList):
        raise ConfigError(f"{', '.join(blocks)}: {type(model).__name__} has no block list to align")
    for key, n in blocks.items():
        if not 1 <= n <= len(stack):
            raise ConfigError(f"{key} must be between 1 and the model's depth {len(stack)}, got {n}")


def scaled_block(block: int, reference_depth: int, depth: int) -> int:
    """A paper's block number ``block`` of ``reference_depth`` moved to a model of ``depth``
    blocks: ``max(1, round(block * depth / reference_depth))`` (REPA's 8 of 28 is 2 of 6)."""
    return max(1, round(block * depth / reference_depth))


def inner_velocity_objective(outer, cfg, dataset, device, amp_dtype):
    """The objective an alignment objective ``outer`` wraps: the one the other settings
    choose without it (:func:`flowdit.train.objectives.select_objective`), refused unless it
    is a plain velocity loss (one model call, :meth:`TrainingObjective.velocity_loss`)."""
    from .base import TrainingObjective
    from .registry import select_objective

    inner = select_objective(cfg, exclude=(type(outer),))(cfg, dataset, device, amp_dtype)
    if type(inner).loss is not TrainingObjective.loss:
        raise ConfigError(f"flow.objective={outer.name}: the other settings choose {inner.name}, which makes its own "
                          f"model calls; {outer.name} wraps flow matching only")
    return inner


def tapped_velocity(velocity, model: torch.nn.Module, x: Tensor, t: Tensor, y: Tensor,
                    blocks: Iterable[int]) -> tuple[Tensor, dict[int, Tensor]]:
    """One training forward ``velocity(x, t, y, ctx=...)`` (the trainer's, through DDP and
    autocast) returning ``(v [B, C, H, W], {block: tokens [B, N, D]})``."""
    tap = BlockTap(model, blocks)
    v = velocity(x, t, y, ctx=StepContext(hooks=[tap]))
    return v, tap.outputs


@torch.no_grad()
def block_outputs(model: torch.nn.Module, x: Tensor, t: Tensor, y: Tensor, blocks: Iterable[int]) -> dict[int, Tensor]:
    """``{block: tokens [B, N, D]}`` of a frozen ``model`` at ``(x, t, y)``, stopping after
    the last block asked for (no gradient; the caller sets autocast)."""
    tap = BlockTap(model, blocks, stop=True)
    try:
        model(x, t, y, ctx=StepContext(hooks=[tap]))
    except _Enough:
        pass
    return tap.outputs
