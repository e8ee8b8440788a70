"""Classifier-free guidance for velocity models (Ho & Salimans 2022).

``cfg_velocity`` turns a conditional model ``model(x, t, y) -> v`` into a velocity
function ``fn(x, t) -> v`` for the sampling loop:

    v = v_u + scale (v_c - v_u)

with v_c the conditional and v_u the unconditional (null-label) velocity. Both branches
run in one batched forward. Outside an optional guidance interval
``[t_lo, t_hi]`` (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval
improves sample and distribution quality", there in EDM sigma, here in t) or at
``scale == 1`` only the conditional branch runs, at half the cost.

With a step context (``ctx``, see ``flowdit.sampling.context``) the model is called as
``model(x, t, y, ctx=ctx)`` with ``ctx.branch`` set to ``"batched"``, ``"cond"`` or
``"uncond"``; when ``ctx.cfg_mode == "split"`` the two branches run as two calls so
that a block policy keeps separate state for each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from flowdit.core.hooks import StepContext
from flowdit.errors import ConfigError

__all__ = [
    "GuidanceCounter",
    "GuidedVelocity",
    "cfg_combine",
    "cfg_velocity",
    "classifier_free_guidance",
]

Cond = Any  # a Tensor [B, ...] or a dict of such tensors


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Guided velocity ``v_u + scale (v_c - v_u)``; ``scale = 1`` gives ``v_c``.

    Shapes: ``v_cond``, ``v_uncond`` and the result are ``[B, ...]``.
    """
    return v_uncond + scale * (v_cond - v_uncond)


def _cat(a: Cond, b: Cond) -> Cond:
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return torch.cat([a, b])


def _null_like(y: Cond, null_label: Cond) -> Cond:
    """Expand an int / 0-d null label to ``y``'s batch; check a full null's batch size."""
    if isinstance(y, dict):
        if not isinstance(null_label, dict) or set(null_label) != set(y):
            raise ConfigError(
                f"null condition must be a dict with the same keys as y ({sorted(y)}), "
                f"got {type(null_label).__name__}"
            )
        return {k: _null_like(y[k], null_label[k]) for k in y}
    null = torch.as_tensor(null_label, device=y.device)
    if null.dim() == 0:
        return torch.full_like(y, int(null) if not y.is_floating_point() else float(null))
    if null.shape[0] == 1 and y.shape[0] != 1:
        null = null.expand(y.shape[0], *null.shape[1:])
    if null.shape[0] != y.shape[0]:
        raise ConfigError(
            f"null condition batch {null.shape[0]} does not match y batch {y.shape[0]}"
        )
    return null.to(y.dtype)


@dataclass
class GuidanceCounter:
    """Compute spent by a guided velocity function: model calls and batch rows."""

    forwards: int = 0
    rows: int = 0
    guided_calls: int = 0
    cond_only_calls: int = 0

    def reset(self) -> None:
        """Zero every count."""
        self.forwards = self.rows = self.guided_calls = self.cond_only_calls = 0


class GuidedVelocity:
    """Callable ``fn(x [B, ...], t [B]) -> v [B, ...]`` applying CFG; see ``cfg_velocity``.

    ``counter`` (a ``GuidanceCounter``) records forwards and batch rows run.
    """

    def __init__(
        self,
        model: Callable[[Tensor, Tensor, Cond], Tensor],
        y: Cond,
        null: Cond,
        scale: float,
        interval: tuple[float, float] | None,
        ctx: Optional[StepContext] = None,
    ):
        self.model, self.y, self.null = model, y, null
        self.scale, self.interval = scale, interval
        self.ctx = ctx
        self.counter = GuidanceCounter()

    @property
    def forwards(self) -> int:
        """Number of model forwards run so far."""
        return self.counter.forwards

    @property
    def rows(self) -> int:
        """Number of batch rows pushed through the model so far."""
        return self.counter.rows

    def _run(self, x: Tensor, t: Tensor, y: Cond, branch: str = "cond") -> Tensor:
        self.counter.forwards += 1
        self.counter.rows += x.shape[0]
        if self.ctx is None:
            return self.model(x, t, y)
        self.ctx.branch = branch
        return self.model(x, t, y, ctx=self.ctx)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        if self.interval is None:
            inside = torch.ones(b, dtype=torch.bool, device=x.device)
        else:
            lo, hi = self.interval
            inside = (t >= lo) & (t <= hi)
        if self.scale == 1 or not bool(inside.any()):
            self.counter.cond_only_calls += 1
            return self._run(x, t, self.y)
        self.counter.guided_calls += 1
        if self.ctx is not None and self.ctx.cfg_mode == "split":
            v_c = self._run(x, t, self.y, "cond")
            v_u = self._run(x, t, self.null, "uncond")
        else:
            v = self._run(torch.cat([x, x]), torch.cat([t, t]), _cat(self.y, self.null), "batched")
            v_c, v_u = v[:b], v[b:]
        guided = cfg_combine(v_c, v_u, self.scale)
        if bool(inside.all()):
            return guided
        # Rows with different t (rare: the sampling loop uses one t per step) that fall
        # outside the interval get the plain conditional velocity.
        mask = inside.reshape(-1, *([1] * (x.dim() - 1)))
        return torch.where(mask, guided, v_c)


def cfg_velocity(
    model: Callable[[Tensor, Tensor, Cond], Tensor],
    y: Cond,
    null_label: Cond,
    scale: float,
    interval: tuple[float, float] | None = None,
    ctx: Optional[StepContext] = None,
) -> GuidedVelocity:
    """Wrap ``model(x, t, y) -> v`` as a classifier-free-guided velocity ``fn(x, t) -> v``.

    Args:
        model: conditional velocity model, ``model(x [B', ...], t [B'], y [B']) -> v``.
        y: the condition, class indices ``[B]`` (or a dict of ``[B, ...]`` tensors).
        null_label: the null condition: an int (e.g. ``num_classes``) broadcast to
            ``y``'s shape, or a tensor/dict with ``y``'s batch size (or batch 1).
        scale: guidance scale; 1 = no guidance (conditional only), 0 = unconditional.
        interval: optional ``(t_lo, t_hi)`` in [0, 1]; guidance applies only where
            ``t_lo <= t <= t_hi``, elsewhere the conditional branch runs alone.
        ctx: optional step context passed to ``model(..., ctx=ctx)``; with
            ``ctx.cfg_mode == "split"`` the two branches run as separate calls.

    Returns:
        a ``GuidedVelocity``; when guiding it calls ``model`` once on
        ``cat([x, x]), cat([t, t]), cat([y, null])`` and returns
        ``v_u + scale (v_c - v_u)``. ``fn.counter`` counts forwards and rows.
    """
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ConfigError(f"guidance scale must be a finite number, got scale={scale!r}")
    if interval is not None:
        try:
            lo, hi = (float(v) for v in interval)
        except (TypeError, ValueError):
            raise ConfigError(f"guidance interval must be (t_lo, t_hi), got {interval!r}") from None
        if not (0.0 <= lo <= hi <= 1.0):
            raise ConfigError(
                f"guidance interval must satisfy 0 <= t_lo <= t_hi <= 1, got {interval!r}"
            )
        interval = (lo, hi)
    null = _null_like(y, null_label)
    return GuidedVelocity(model, y, null, float(scale), interval, ctx)


# The method under its full name (docs/conventions.md, "Extension points"); same function.
classifier_free_guidance = cfg_velocity
