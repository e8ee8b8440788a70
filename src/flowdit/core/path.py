"""The rectified-flow probability path and conversions between predictions.

Convention (docs/conventions.md): t = 0 is data, t = 1 is
noise, ``x_t = (1 - t) x0 + t eps`` and the velocity is ``v = dx_t/dt = eps - x0``
(Liu et al. 2022, "Flow straight and fast", with time reversed as in SD3 / FLUX).

Because the path is linear in (x0, eps), any one of the three predictions
(x0, eps, v) together with x_t and t determines the other two. The converters below
solve that 2x2 linear system; each is singular at one end of the path, where x_t no
longer carries information about one of the two endpoints.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowdit.errors import ConfigError

__all__ = [
    "expand_t",
    "interpolate",
    "velocity_target",
    "x0_from_velocity",
    "eps_from_velocity",
    "velocity_from_x0",
    "velocity_from_eps",
    "x0_from_eps",
    "eps_from_x0",
]

DEFAULT_EPS = 1e-5


def expand_t(t: Tensor | float, x: Tensor) -> Tensor:
    """Reshape a time ``t`` so that it broadcasts against ``x``.

    Args:
        t: a Python float, a 0-d tensor, or a tensor of shape ``[B]``.
        x: a tensor of shape ``[B, ...]``.

    Returns:
        ``t`` as a tensor of shape ``[B, 1, ..., 1]`` (``x.dim()`` dims) or ``[]``
        for scalar input, on ``x``'s device and with ``x``'s dtype.
    """
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    if t.dim() == 0:
        return t
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ConfigError(
            f"time t must be a scalar or have shape [B] = [{x.shape[0]}] to match x of "
            f"shape {tuple(x.shape)}; got t of shape {tuple(t.shape)}"
        )
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def interpolate(x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """Point on the rectified path: ``x_t = (1 - t) x0 + t eps``.

    Args:
        x0: data, ``[B, ...]``.
        eps: noise, same shape as ``x0``.
        t: scalar or ``[B]`` in ``[0, 1]``.

    Returns:
        ``x_t`` with the shape of ``x0``; ``x_0 = x0`` and ``x_1 = eps`` exactly.
    """
    tt = expand_t(t, x0)
    return (1 - tt) * x0 + tt * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """Conditional velocity of the path, ``d x_t / dt = eps - x0`` (the training target)."""
    return eps - x0


def _safe(den: Tensor, eps: float) -> Tensor:
    # Keep the sign of the denominator so the inverse direction (t > 1 during
    # extrapolation, say) is not silently flipped; only its magnitude is clamped.
    sign = torch.where(den < 0, -torch.ones_like(den), torch.ones_like(den))
    return sign * den.abs().clamp_min(eps)


def x0_from_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """Data estimate from a velocity: ``x0 = x_t - t v``. Regular for all t.

    Shapes: ``x_t, v: [B, ...]``, ``t``: scalar or ``[B]``.
    """
    return x_t - expand_t(t, x_t) * v


def eps_from_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """Noise estimate from a velocity: ``eps = x_t + (1 - t) v``. Regular for all t.

    Shapes: ``x_t, v: [B, ...]``, ``t``: scalar or ``[B]``.
    """
    return x_t + (1 - expand_t(t, x_t)) * v


def velocity_from_x0(
    x_t: Tensor, x0: Tensor, t: Tensor | float, eps: float = DEFAULT_EPS
) -> Tensor:
    """Velocity from a data estimate: ``v = (x_t - x0) / t``.

    Singular at t = 0 (there ``x_t = x0`` and the velocity is not determined);
    ``|t|`` is clamped below by ``eps``. Shapes: ``[B, ...]``; ``t`` scalar or ``[B]``.
    """
    return (x_t - x0) / _safe(expand_t(t, x_t), eps)


def velocity_from_eps(
    x_t: Tensor, eps_pred: Tensor, t: Tensor | float, eps: float = DEFAULT_EPS
) -> Tensor:
    """Velocity from a noise estimate: ``v = (eps - x_t) / (1 - t)``.

    Singular at t = 1 (there ``x_t = eps``); ``|1 - t|`` is clamped below by ``eps``.
    Shapes: ``[B, ...]``; ``t`` scalar or ``[B]``.
    """
    return (eps_pred - x_t) / _safe(1 - expand_t(t, x_t), eps)


def x0_from_eps(
    x_t: Tensor, eps_pred: Tensor, t: Tensor | float, eps: float = DEFAULT_EPS
) -> Tensor:
    """Data estimate from a noise estimate: ``x0 = (x_t - t eps) / (1 - t)``.

    Singular at t = 1; ``|1 - t|`` is clamped below by ``eps``.
    """
    tt = expand_t(t, x_t)
    return (x_t - tt * eps_pred) / _safe(1 - tt, eps)


def eps_from_x0(
    x_t: Tensor, x0: Tensor, t: Tensor | float, eps: float = DEFAULT_EPS
) -> Tensor:
    """Noise estimate from a data estimate: ``eps = (x_t - (1 - t) x0) / t``.

    Singular at t = 0; ``|t|`` is clamped below by ``eps``.
    """
    tt = expand_t(t, x_t)
    return (x_t - (1 - tt) * x0) / _safe(tt, eps)
