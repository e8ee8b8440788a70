"""RF-Inversion (Rout et al. 2024, "Semantic Image Inversion and Editing using Rectified
Stochastic Differential Equations", arXiv 2410.10792): controlled inversion and
regeneration, written in flowdit's convention (t = 0 data, t = 1 noise).

The paper runs its controlled forward ODE with time s from 0 (image) to 1
(noise), velocity ``u_s(Y) = -v_paper(Y, 1 - s)`` where ``v_paper`` is the generative
velocity of a model whose time runs from noise (0) to data (1); and its controlled
reverse ODE with time s from 0 (noise) to 1 (image). Since
``v_paper(x, 1 - t) = -v(x, t)`` for flowdit's velocity ``v`` (the same path traversed
in the opposite direction), the two become:

* controlled forward (data -> noise, t: 0 -> 1), steering towards one fixed noise
  sample ``y1`` with the straight-line velocity that reaches it at t = 1,

      dY/dt = v(Y, t) + gamma * ((y1 - Y) / (1 - t) - v(Y, t));

* controlled reverse (noise -> data, t: 1 -> 0), steering towards the source image
  ``y0`` with the velocity of the straight line from ``y0`` through ``X``,

      dX/dt = v(X, t) + eta(t) * ((X - y0) / t - v(X, t)),

  ``eta(t) = eta`` on the chosen step interval, 0 elsewhere.

``gamma = 0`` (``eta = 0``) gives plain inversion (regeneration). ``paper_forward_field``
and ``paper_reverse_field`` write the paper's fields in its own time, for the test that
checks the conversion. The conditional fields are singular at t = 1 (forward) and t = 0
(reverse): solvers that evaluate a step's end (Heun, RF-Solver-3) are refused there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from flowdit.errors import ConfigError
from flowdit.inference.velocity import model_velocity
from flowdit.sampling.sample import sample
from flowdit.sampling.solvers import ModelFn

from .conditions import Cond, check_condition, decreasing_grid, take_rows

__all__ = ["controlled_forward_field", "controlled_reverse_field", "paper_forward_field", "paper_reverse_field",
           "rf_inversion", "RFInversionResult"]


def _tcol(t: Tensor, x: Tensor) -> Tensor:
    return t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def controlled_forward_field(model_fn: ModelFn, y1: Tensor, gamma: float) -> ModelFn:
    """Velocity of the controlled forward ODE (RF-Inversion, flowdit time):
    ``v + gamma ((y1 - x) / (1 - t) - v)``; ``y1 [B, ...]`` is the target noise sample."""
    if not 0.0 <= gamma <= 1.0:
        raise ConfigError(f"RF-Inversion gamma must be in [0, 1], got {gamma}")

    def field(x: Tensor, t: Tensor) -> Tensor:
        v = model_fn(x, t)
        if gamma == 0.0:
            return v
        if bool((t >= 1).any()):
            raise ConfigError("RF-Inversion: the controlled forward field is singular at t = 1; use a solver that "
                              "does not evaluate a step's end (euler, midpoint, rf2, fireflow)")
        return v + gamma * ((y1 - x) / (1 - _tcol(t, x)) - v)

    return field


def controlled_reverse_field(model_fn: ModelFn, y0: Tensor, eta: float,
                             window: tuple[float, float] = (0.0, 1.0)) -> ModelFn:
    """Velocity of the controlled reverse ODE (RF-Inversion, flowdit time):
    ``v + eta ((x - y0) / t - v)`` for ``t`` in ``(window[0], window[1]]``, ``v`` elsewhere;
    ``y0 [B, ...]`` is the source image."""
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"RF-Inversion eta must be in [0, 1], got {eta}")
    lo, hi = window

    def field(x: Tensor, t: Tensor) -> Tensor:
        v = model_fn(x, t)
        tt = float(t.reshape(-1)[0])
        if eta == 0.0 or not lo < tt <= hi:
            return v
        if tt <= 0:
            raise ConfigError("RF-Inversion: the controlled reverse field is singular at t = 0; use a solver that "
                              "does not evaluate a step's end (euler, midpoint, rf2, fireflow)")
        return v + eta * ((x - y0) / _tcol(t, x) - v)

    return field


def paper_forward_field(v_paper: ModelFn, y1: Tensor, gamma: float) -> ModelFn:
    """The paper's controlled forward velocity in its own time ``s`` (0 image -> 1 noise):
    ``u + gamma ((y1 - Y) / (1 - s) - u)``, ``u = -v_paper(Y, 1 - s)``, where ``v_paper(x, tau)``
    is the generative velocity with tau = 0 noise. For tests of the conversion."""

    def field(x: Tensor, s: Tensor) -> Tensor:
        u = -v_paper(x, 1 - s)
        return u + gamma * ((y1 - x) / (1 - _tcol(s, x)) - u)

    return field


def paper_reverse_field(v_paper: ModelFn, y0: Tensor, eta: float) -> ModelFn:
    """The paper's controlled reverse velocity in its own time ``s`` (0 noise -> 1 image):
    ``v + eta ((y0 - X) / (1 - s) - v)``, ``v = v_paper(X, s)``. For tests of the conversion."""

    def field(x: Tensor, s: Tensor) -> Tensor:
        v = v_paper(x, s)
        return v + eta * ((y0 - x) / (1 - _tcol(s, x)) - v)

    return field


@dataclass
class RFInversionResult:
    """``images [N, C, H, W]`` (float32, CPU, unclamped), the controlled-inverted ``noise``, NFE of each pass."""

    images: Tensor
    noise: Tensor
    nfe_invert: int
    nfe_edit: int


@torch.no_grad()
def rf_inversion(model, images: Tensor, source: Optional[Cond], target: Optional[Cond], gamma: float = 0.5,
                 eta: float = 0.9, eta_steps: tuple[int, int] = (0, 3), solver: Any = "euler", steps: int = 10,
                 shift: float = 1.0, cfg_scale: float = 1.0, seed: int = 0, y1: Optional[Tensor] = None,
                 amp_dtype: Optional[torch.dtype] = None, batch_size: int = 256, device: Any = "cpu",
                 negative: Optional[Cond] = None, grid: Optional[Tensor] = None) -> RFInversionResult:
    """Invert ``images [N, C, H, W]`` with the controlled forward ODE under ``source`` and
    regenerate under ``target`` with the controlled reverse ODE.

    ``source``, ``target``: class indices ``[N]`` (``None``: the null class) or text
    conditions (dicts of ``[N, ...]`` tensors); ``negative``: the null condition of a guided
    regeneration (default: the model's ``null_class``). ``y1`` (default: standard normal
    noise from ``seed``) is the fixed noise sample the controlled forward ODE steers to;
    ``eta`` acts on regeneration steps ``eta_steps = (start, stop)`` (0-based, stop
    exclusive), i.e. for ``t`` in ``(t_stop, t_start]`` of the sampling grid, as the paper's
    start/stop times. ``grid``: the sampling grid (a pipeline's own; default
    ``sampling_grid(steps, shift)``), run backwards to invert.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ConfigError(f"images must be a tensor [N, C, H, W], got {getattr(images, 'shape', images)}")
    for name, cond in (("source", source), ("target", target), ("negative", negative)):
        check_condition(name, cond, images.shape[0])
    start, stop = (int(v) for v in eta_steps)
    if not 0 <= start <= stop <= steps:
        raise ConfigError(f"eta_steps must satisfy 0 <= start <= stop <= steps={steps}, got {eta_steps}")
    grid = decreasing_grid(grid, steps, shift)
    window = (float(grid[stop]), float(grid[start]))
    if y1 is None:
        y1 = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    if y1.shape != images.shape:
        raise ConfigError(f"y1 must have the images' shape {tuple(images.shape)}, got {tuple(y1.shape)}")
    device = torch.device(device)
    model.eval()
    outs, noises, nfe_inv, nfe_edit = [], [], 0, 0
    for lo in range(0, len(images), batch_size):
        hi = lo + batch_size
        x = images[lo:hi].to(device).float()
        ys, yt, yn = (take_rows(c, lo, hi, device) for c in (source, target, negative))
        fwd = controlled_forward_field(model_velocity(model, ys, 1.0, amp_dtype), y1[lo:hi].to(device), gamma)
        z = sample(fwd, x, solver, schedule=grid.flip(0))
        rev = controlled_reverse_field(model_velocity(model, yt, cfg_scale, amp_dtype, null=yn), x, eta, window)
        out = sample(rev, z.x, solver, schedule=grid)
        outs.append(out.x.float().cpu())
        noises.append(z.x.float().cpu())
        nfe_inv, nfe_edit = max(nfe_inv, z.nfe), max(nfe_edit, out.nfe)
    return RFInversionResult(torch.cat(outs), torch.cat(noises), nfe_inv, nfe_edit)
