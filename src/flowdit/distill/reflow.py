"""Reflow (Liu, Gong & Liu, "Flow Straight and Fast", ICLR 2023, Algorithm 1, eq. (1)).

Given a coupling ``(z_1, z_0)`` that a flow induces (noise and the sample its ODE reaches,
:mod:`flowdit.distill.pairs`), the next rectified flow regresses the velocity of the
straight line between them:

    min_v  E_{t, (z_1, z_0)} || (z_1 - z_0) - v((1 - t) z_0 + t z_1, t) ||^2

which is flowdit's flow-matching loss with the paired ``z_1`` in place of fresh noise. A
flow whose trajectories do not cross is a fixed point; each round straightens the paths,
so fewer Euler steps are needed.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from ..core.losses import flow_matching_loss
from ..core.path import interpolate, velocity_target

__all__ = ["reflow_loss"]


def reflow_loss(model: Callable[..., Tensor], z0: Tensor, z1: Tensor, t: Tensor, cond: Any = None,
                kind: str = "mse", weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reflow regression loss on paired data ``z0 [B, ...]`` and noise ``z1 [B, ...]`` at
    times ``t [B]``; ``model(x_t, t, cond) -> v``. Returns ``(loss, per_sample [B])`` as
    :func:`flowdit.core.losses.flow_matching_loss` does (``kind="huber"`` for 2-RF++)."""
    xt = interpolate(z0, z1, t)
    return flow_matching_loss(model(xt, t, cond), velocity_target(z0, z1), kind=kind, weight=weight)
