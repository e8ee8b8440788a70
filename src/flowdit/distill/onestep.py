"""k-step and one-step distillation of a flow on its coupling pairs.

Given pairs ``(z_1, z_0)`` with ``z_0`` the teacher's ODE endpoint from the noise ``z_1``
(:mod:`flowdit.distill.pairs`), a student that takes ``k`` Euler steps on the uniform grid
``1, (k-1)/k, ..., 1/k, 0`` reproduces ``z_0`` exactly when, at each grid time, it predicts
the chord velocity ``z_1 - z_0`` at the chord's point ``x_t = (1 - t) z_0 + t z_1``. So
k-step distillation is the reflow regression restricted to those ``k`` times, and one-step
distillation (k = 1) regresses ``z_1 - z_0`` at ``x_1 = z_1``, i.e. the student's one-step
sample ``z_1 - v(z_1, 1)`` regresses the teacher's endpoint. This is the distillation step
of Liu, Gong & Liu ("Flow Straight and Fast", ICLR 2023) and of SlimFlow's public code
(github.com/yuanzhi-zhu/SlimFlow, ``reflow/reflow.py``: ``flow_t_schedule`` ``t0`` for
k = 1 and an integer ``k`` for k steps, in their convention where t = 0 is noise; here
``t_flowdit = 1 - t_theirs``). Their grid starts ``1e-3`` inside the noise end; here the
grid times are exact.

The distance is pixel MSE or pseudo-Huber on the velocity (at t = 1 the same as on the
endpoint, since ``x0_hat - z_0 = -t (v_hat - (z_1 - z_0))``), or a perceptual distance on
the data estimate ``x0_hat = x_t - t v_hat`` (SlimFlow distils with LPIPS).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.losses import flow_matching_loss
from ..core.path import x0_from_velocity
from ..errors import ConfigError
from .perceptual import PerceptualFn

__all__ = ["DISTILL_LOSSES", "distill_times", "distillation_loss"]

DISTILL_LOSSES = ("mse", "huber", "perceptual")


def distill_times(k: int, u: Tensor) -> Tensor:
    """The grid times ``t in {1, (k-1)/k, ..., 1/k}`` of k-step distillation, one per
    uniform draw ``u [B]`` in ``[0, 1)`` (each time with probability ``1/k``); float32 ``[B]``."""
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"distillation steps k must be a positive int, got {k!r}")
    i = (u.double() * k).floor().clamp(0, k - 1)
    return (1.0 - i / k).float()


def distillation_loss(
    v_hat: Tensor,
    x_t: Tensor,
    x0: Tensor,
    eps: Tensor,
    t: Tensor,
    kind: str = "mse",
    perceptual: Optional[PerceptualFn] = None,
    huber_c: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """Distillation loss of the student velocity ``v_hat`` at ``(x_t, t)`` toward the chord
    of the pair ``(eps, x0)`` (see the module docstring).

    Args:
        v_hat: student velocity ``[B, ...]`` at ``x_t = (1 - t) x0 + t eps``.
        x0: the teacher's endpoint (t = 0) and ``eps`` its noise (t = 1), ``[B, ...]``.
        t: grid times ``[B]`` (all ones for one-step distillation).
        kind: ``mse`` / ``huber`` on the velocity (:func:`flowdit.core.losses.flow_matching_loss`)
            or ``perceptual``: ``perceptual(x_t - t v_hat, x0)``.
        perceptual: ``(a, b) -> [B]``, required for ``kind="perceptual"``.

    Returns:
        ``(loss, per_sample [B])`` in float32.
    """
    if kind in ("mse", "huber"):
        return flow_matching_loss(v_hat, eps - x0, kind=kind, huber_c=huber_c)
    if kind != "perceptual":
        raise ConfigError(f"unknown distillation loss {kind!r}; valid: {', '.join(DISTILL_LOSSES)}")
    if perceptual is None:
        raise ConfigError("distillation loss 'perceptual' needs a perceptual distance")
    per_sample = perceptual(x0_from_velocity(x_t, v_hat.float(), t), x0).float()
    return per_sample.mean(), per_sample
