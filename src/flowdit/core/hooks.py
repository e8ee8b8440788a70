"""The step context and its ordered hook list: how methods act on a model call.

A sampling, inversion or editing call owns one ``StepContext``. The loop updates it
before every velocity evaluation, the velocity function hands it to the model as
``model(x, t, y, ctx=ctx)``, and the model calls the context's hooks at fixed points.
Methods that change how a model runs without being part of it (caches, region-adaptive
sampling, RF-Edit's value sharing, ...) are *hooks*, registered by name on the context;
several can be active at once.

Hook points, in the order they fire within one velocity evaluation:

1. ``begin_evaluation(ctx)``: the loop, once per velocity evaluation, before the model
   runs (once for both classifier-free-guidance branches).
2. ``run(model, tokens [B, N, D], c_act [B, D], ctx) -> tokens``: *around the block stack*.
   At most one hook owns the stack (a block policy: it decides which blocks run on which
   tokens); registering a second one is refused.
3. ``block(block, x [B, N, D], c_act [B, D], ctx, run) -> x``: *around each block*, where
   ``run(x)`` computes the block; it fires on every call of a whole block (the model's
   loop, a policy running blocks), not on per-block caches that replay a block's branches.
   Several block hooks nest, the first registered outermost.
4. ``attention(attn, q, k, v, ctx) -> (q, k, v)``: *around attention*, inside every
   attention layer after the projections (``[B, H, N, Dh]`` each), before the kernel.
5. ``after_output(model, v [B, C, H, W], ctx) -> v``: after the model's output layer, per
   model call (per branch when the guidance branches run as separate calls).
6. ``after_velocity(v, ctx)``: the loop, with the velocity the solver will use (guidance
   applied); returns nothing.

Hooks at the same point run in registration order, each seeing the previous one's
result. A hook implements only the points it uses (a method of that name); ``reset()``
is called on every hook at the start of every sampling call and drops per-call state.
Data a method carries from one call to the next on purpose (RF-Edit's values recorded
while inverting and injected while regenerating) is that method's to clear.

Steps are counted **per model call**: ``ctx.step`` is the index of the velocity
evaluation within the sampling call (0, 1, 2, ...), so a two-evaluation solver (Heun,
midpoint) advances it twice per solver step, and a policy's ``interval=4`` means "every
fourth model call" whatever the solver. ``ctx.solver_step`` holds the solver step and
``ctx.eval_in_step`` the evaluation's index within it. Under classifier-free guidance both
branches of one evaluation share ``ctx.step``; ``ctx.branch`` tells them apart
(``"cond"``, ``"uncond"``, or ``"batched"`` when the two run as one batch of ``2B`` rows).
Hooks keep their own state per branch where the branches run separately.

The context lives in ``core`` because the models (which call the hooks) and the
sampling loop (which drives them) both depend on it; the hooks themselves live with
their methods (``flowdit.accel``, ``flowdit.edit``).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional, Protocol, runtime_checkable

import torch

from flowdit.errors import ConfigError

__all__ = ["Hook", "BlockPolicy", "HookList", "StepContext", "CFG_MODES", "HOOK_POINTS", "attention_hooks",
           "block_hooks", "output_hooks"]

CFG_MODES = ("batched", "split")
HOOK_POINTS = ("begin_evaluation", "run", "block", "attention", "after_output", "after_velocity")


class Hook:
    """Base class of a step hook: a ``name``, ``reset()``, and any of the methods named in
    ``HOOK_POINTS`` (see the module docstring). Subclassing is optional: any object with
    a ``name``, a ``reset`` and some of those methods is accepted by ``HookList``."""

    name = "hook"

    def reset(self) -> None:
        """Drop per-call state (called at the start of every sampling call)."""


@runtime_checkable
class BlockPolicy(Protocol):
    """A hook that owns the block stack: it decides, per model call, how the stack runs.

    ``run(model, tokens [B, N, D], c_act [B, D], ctx) -> tokens [B, N, D]`` replaces the
    plain loop over ``model.blocks``; ``reset()`` drops cached state. ``cfg_mode``
    (``"batched"`` or ``"split"``) tells a guided velocity function whether to run the
    conditional and unconditional rows as one batch or as two calls with separate state.
    """

    cfg_mode: str

    def reset(self) -> None: ...

    def run(self, model, tokens: torch.Tensor, c_act: torch.Tensor, ctx: "StepContext") -> torch.Tensor: ...


class HookList:
    """An ordered, named list of hooks, with each point's callables precomputed so the hot
    path iterates over a tuple (empty for a point no hook uses)."""

    def __init__(self, hooks: Iterable[object] = ()):
        self._hooks: dict[str, object] = {}
        self._index()
        for hook in hooks:
            self.add(hook)

    def add(self, hook: object, name: Optional[str] = None) -> object:
        """Append ``hook`` under ``name`` (default ``hook.name``) and return it.

        Refused (``ConfigError``): a name already taken, an object with no hook point,
        or a second hook that owns the block stack.
        """
        name = name or getattr(hook, "name", None) or type(hook).__name__
        if name in self._hooks:
            raise ConfigError(f"a hook named {name!r} is already registered; give the second one another name")
        if not any(callable(getattr(hook, p, None)) for p in HOOK_POINTS):
            raise ConfigError(f"hook {name!r} ({type(hook).__name__}) implements none of {', '.join(HOOK_POINTS)}")
        if callable(getattr(hook, "run", None)) and self.stack is not None:
            raise ConfigError(f"hook {name!r} would be a second block-stack policy next to {self._stack_name!r}; "
                              "one policy decides how the blocks run")
        self._hooks[name] = hook
        self._index()
        return hook

    def remove(self, name: str) -> object:
        """Remove and return the hook registered as ``name``."""
        if name not in self._hooks:
            raise KeyError(name)
        hook = self._hooks.pop(name)
        self._index()
        return hook

    def get(self, name: str) -> Optional[object]:
        """The hook registered as ``name``, or ``None``."""
        return self._hooks.get(name)

    def names(self) -> list[str]:
        """Registered names, in order."""
        return list(self._hooks)

    def __iter__(self) -> Iterator[object]:
        return iter(self._hooks.values())

    def __len__(self) -> int:
        return len(self._hooks)

    def _index(self) -> None:
        def point(p: str) -> tuple:
            return tuple(getattr(h, p) for h in self._hooks.values() if callable(getattr(h, p, None)))

        self.begin_evaluation = point("begin_evaluation")
        self.attention = point("attention")
        self.block = point("block")
        self.after_output = point("after_output")
        self.after_velocity = point("after_velocity")
        owners = [(n, h) for n, h in self._hooks.items() if callable(getattr(h, "run", None))]
        self._stack_name, self.stack = owners[0] if owners else (None, None)

    def reset(self) -> None:
        """``reset()`` every hook, in order."""
        for hook in self._hooks.values():
            reset = getattr(hook, "reset", None)
            if callable(reset):
                reset()


class StepContext:
    """Per-call information the loop hands to the model, and the hooks that act on it.

    Attributes:
        hooks: the ``HookList`` (``add``, ``remove``, ``get``); ``block_policy`` is its
            stack-owning hook (or ``None``: every block runs).
        step: index of the current model call within the sampling call.
        num_steps: model calls the sampling call is expected to make (solver steps times
            evaluations per step); ``None`` for adaptive solvers.
        solver_step: index of the current solver step.
        num_solver_steps: solver steps of the grid (``None`` for adaptive solvers).
        eval_in_step: index of the current evaluation within its solver step.
        t: the time of the current call (``t = 1`` noise, ``t = 0`` data).
        t_step, t_next: start and end time of the current solver step (``None`` for
            adaptive solvers); an Euler step moves ``x`` by ``(t_next - t_step) v``.
        branch: ``"cond"``, ``"uncond"`` or ``"batched"`` (both CFG rows in one batch).
    """

    def __init__(self, block_policy: Optional[BlockPolicy] = None, hooks: Iterable[object] = (),
                 num_steps: Optional[int] = None):
        self.hooks = HookList()
        if block_policy is not None:
            self.hooks.add(block_policy)
        for hook in hooks:
            self.hooks.add(hook)
        self.step: int = 0
        self.num_steps: Optional[int] = num_steps
        self.solver_step: int = 0
        self.num_solver_steps: Optional[int] = None
        self.eval_in_step: int = 0
        self.t: Optional[float] = None
        self.t_step: Optional[float] = None
        self.t_next: Optional[float] = None
        self.branch: str = "cond"

    @property
    def block_policy(self) -> Optional[BlockPolicy]:
        """The hook that owns the block stack, or ``None``."""
        return self.hooks.stack

    @property
    def cfg_mode(self) -> str:
        """How guided evaluations run: the block policy's ``cfg_mode``, ``"batched"`` without one."""
        mode = getattr(self.hooks.stack, "cfg_mode", "batched")
        return mode if mode in CFG_MODES else "batched"

    def begin(self, num_steps: Optional[int], num_solver_steps: Optional[int]) -> None:
        """Start a sampling call: zero the counters and reset every hook."""
        self.step = 0
        self.solver_step = 0
        self.eval_in_step = 0
        self.num_steps = num_steps
        self.num_solver_steps = num_solver_steps
        self.t = None
        self.t_step = None
        self.t_next = None
        self.branch = "cond"
        self.hooks.reset()

    def __repr__(self) -> str:
        return (f"StepContext(hooks={self.hooks.names()}, step={self.step}, solver_step={self.solver_step}, "
                f"t={self.t}, branch={self.branch!r})")


def attention_hooks(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    ctx: Optional[StepContext]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass ``q, k, v [B, H, N, Dh]`` of attention layer ``attn`` through the context's
    attention hooks in order (unchanged without a context or such hooks)."""
    if ctx is None:
        return q, k, v
    for hook in ctx.hooks.attention:
        q, k, v = hook(attn, q, k, v, ctx)
    return q, k, v


def block_hooks(block, x: torch.Tensor, c_act: torch.Tensor, ctx: StepContext,
                run) -> torch.Tensor:
    """Run ``run(x) -> x`` (one block on ``x [B, N, D]``) inside the context's ``block``
    hooks, the first registered outermost."""
    for hook in reversed(ctx.hooks.block):
        run = (lambda h, inner: lambda xx: h(block, xx, c_act, ctx, inner))(hook, run)
    return run(x)


def output_hooks(model, v: torch.Tensor, ctx: Optional[StepContext]) -> torch.Tensor:
    """Pass the model's output ``v`` through the context's ``after_output`` hooks in order."""
    if ctx is None:
        return v
    for hook in ctx.hooks.after_output:
        v = hook(model, v, ctx)
    return v
