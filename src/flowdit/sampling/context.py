"""The step context: what the sampling loop tells the model about the current call.

The loop owns one ``StepContext`` per sampling call and updates it before every velocity
evaluation; the velocity function passes it to the model as ``model(x, t, y, ctx=ctx)``;
``DiT.run_blocks`` hands the block stack to ``ctx.block_policy`` when one is set.

Steps are counted **per model call**: ``ctx.step`` is the index of the velocity
evaluation within the sampling call (0, 1, 2, ...), so a two-evaluation solver (Heun,
midpoint) advances it twice per solver step and a policy's ``interval=4`` means "every
fourth model call" whatever the solver. ``ctx.solver_step`` holds the solver step for
policies that prefer it. Under classifier-free guidance both branches of one evaluation
share ``ctx.step``; ``ctx.branch`` tells them apart (``"cond"``, ``"uncond"``, or
``"batched"`` when the two run as one batch of ``2B`` rows).

This module defines only the protocol; the policies live in ``flowdit.accel``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

import torch

__all__ = ["BlockPolicy", "StepContext", "CFG_MODES"]

CFG_MODES = ("batched", "split")


@runtime_checkable
class BlockPolicy(Protocol):
    """Decides, per model call, how the transformer block stack runs.

    ``run(model, tokens [B, N, D], c_act [B, D], ctx) -> tokens [B, N, D]`` replaces the
    plain loop over ``model.blocks``; ``reset()`` drops all cached state (called by the
    sampling loop at the start of every sampling call). ``cfg_mode`` (``"batched"`` or
    ``"split"``) tells a guided velocity function whether to run the conditional and
    unconditional rows as one batch or as two calls with separate policy state.

    Optional hooks: ``after_output(model, v, ctx) -> v`` is called by the model on its
    velocity ``[B, C, H, W]``; ``after_velocity(v, ctx)`` is called by the sampling loop
    with the velocity the solver will use (guidance applied), and returns nothing.
    """

    cfg_mode: str

    def reset(self) -> None: ...

    def run(self, model: Any, tokens: torch.Tensor, c_act: torch.Tensor, ctx: "StepContext") -> torch.Tensor: ...


@dataclass
class StepContext:
    """Mutable per-call information handed to the model.

    Attributes:
        block_policy: the active block policy, or ``None`` (every block runs).
        step: index of the current model call within the sampling call.
        num_steps: model calls the sampling call is expected to make (solver steps times
            evaluations per step); ``None`` for adaptive solvers.
        solver_step: index of the current solver step.
        num_solver_steps: solver steps of the grid (``None`` for adaptive solvers).
        t: the time of the current call (a float; ``t = 1`` noise, ``t = 0`` data).
        t_step, t_next: start and end time of the current solver step (``None`` for
            adaptive solvers); an Euler step moves ``x`` by ``(t_next - t_step) v``.
        branch: ``"cond"``, ``"uncond"`` or ``"batched"`` (both CFG rows in one batch).
        extras: free-form slots for other users of the context.
    """

    block_policy: Optional[BlockPolicy] = None
    step: int = 0
    num_steps: Optional[int] = None
    solver_step: int = 0
    num_solver_steps: Optional[int] = None
    t: Optional[float] = None
    t_step: Optional[float] = None
    t_next: Optional[float] = None
    branch: str = "cond"
    extras: dict = field(default_factory=dict)

    @property
    def cfg_mode(self) -> str:
        """How guided evaluations run: the policy's ``cfg_mode``, ``"batched"`` without one."""
        mode = getattr(self.block_policy, "cfg_mode", "batched")
        return mode if mode in CFG_MODES else "batched"

    def begin(self, num_steps: Optional[int], num_solver_steps: Optional[int]) -> None:
        """Start a sampling call: zero the counters and reset the policy's state."""
        self.step = 0
        self.solver_step = 0
        self.num_steps = num_steps
        self.num_solver_steps = num_solver_steps
        self.t = None
        self.t_step = None
        self.t_next = None
        self.branch = "cond"
        if self.block_policy is not None:
            self.block_policy.reset()
