"""Inversion: integrate the flow ODE from data (t = 0) to noise (t = 1), and back.

With ``x_t = (1 - t) x0 + t eps`` and ``dx/dt = v(x, t)``, inversion runs the sampling
loop over the *increasing* mirror of the sampling grid, so that inverting and then
regenerating with the same solver visits the same times in opposite order; the
round trip's error then falls at the solver's order (RF-Solver-2 and FireFlow: order 2,
Euler: order 1). Inversion uses no classifier-free guidance (scale 1): a guided field
amplifies the per-step errors along the inverted path (the observation behind
null-text inversion, Mokady et al. 2023).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from flowdit.errors import ConfigError
from flowdit.inference.velocity import model_velocity  # noqa: F401  (re-exported: flowdit.edit.model_velocity)
from flowdit.sampling.sample import SampleResult, sample
from flowdit.sampling.schedules import shifted
from flowdit.sampling.solvers import ModelFn

__all__ = ["sampling_grid", "inversion_grid", "invert", "regenerate", "model_velocity", "invert_images",
           "regenerate_images"]


def sampling_grid(steps: int, shift: float = 1.0) -> Tensor:
    """Decreasing float64 grid ``1 = t_0 > ... > t_N = 0`` (uniform through the SD3 shift), ``[N + 1]``."""
    if int(steps) != steps or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    return shifted(int(steps), shift, dtype=torch.float64)


def inversion_grid(steps: int, shift: float = 1.0) -> Tensor:
    """Increasing float64 grid ``0 = s_0 < ... < s_N = 1``: the sampling grid reversed, ``[N + 1]``."""
    return sampling_grid(steps, shift).flip(0)


def invert(model_fn: ModelFn, x0: Tensor, solver: Any = "rf2", steps: int = 10, shift: float = 1.0,
           return_trajectory: bool = False, grad: bool = False) -> SampleResult:
    """Map data ``x0 [B, ...]`` to its latent noise by integrating ``dx/dt = v`` from t = 0 to 1.

    Args:
        model_fn: velocity ``(x [B, ...], t [B]) -> v``; unguided (CFG scale 1) for faithful inversion.
        solver: any fixed-step solver of ``flowdit.sampling`` (``euler``, ``rf2`` = RF-Solver-2,
            ``fireflow``, ...) or a solver object.
        steps, shift: the grid, the mirror of ``sampling_grid(steps, shift)``.

    Returns:
        ``SampleResult`` whose ``x`` is the noise ``[B, ...]`` at t = 1 and ``nfe`` the evaluations run.
    """
    return sample(model_fn, x0, solver=solver, schedule=inversion_grid(steps, shift),
                  return_trajectory=return_trajectory, grad=grad)


def regenerate(model_fn: ModelFn, noise: Tensor, solver: Any = "rf2", steps: int = 10, shift: float = 1.0,
               return_trajectory: bool = False, grad: bool = False) -> SampleResult:
    """Integrate from t = 1 (``noise [B, ...]``) to t = 0 over ``sampling_grid(steps, shift)``;
    the inverse of :func:`invert` up to the solver's discretisation error."""
    return sample(model_fn, noise, solver=solver, schedule=sampling_grid(steps, shift),
                  return_trajectory=return_trajectory, grad=grad)


def _check_batch(images: Tensor, labels: Optional[Tensor]) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ConfigError(f"images must be a float tensor [N, C, H, W], got {getattr(images, 'shape', images)}")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != images.shape[0]):
        raise ConfigError(f"labels must be [N] = [{images.shape[0]}], got shape {tuple(labels.shape)}")


def _batched(model, images, labels, batch_size, device, run):
    device = torch.device(device)
    outs, nfe = [], 0
    for lo in range(0, len(images), batch_size):
        x = images[lo:lo + batch_size].to(device).float()
        y = None if labels is None else labels[lo:lo + batch_size].to(device)
        res = run(x, y)
        outs.append(res.x.float().cpu())
        nfe = max(nfe, res.nfe)
    return torch.cat(outs), nfe


@torch.no_grad()
def invert_images(model, images: Tensor, labels: Optional[Tensor] = None, solver: Any = "rf2", steps: int = 10,
                  shift: float = 1.0, amp_dtype: Optional[torch.dtype] = None, batch_size: int = 256,
                  device: Any = "cpu") -> tuple[Tensor, int]:
    """Invert images ``[N, C, H, W]`` in [-1, 1] under their labels ``[N]`` (None: null class),
    unguided, in batches. Returns ``(noise [N, C, H, W] float32 on CPU, NFE per image)``."""
    _check_batch(images, labels)
    model.eval()
    return _batched(model, images, labels, batch_size, device,
                    lambda x, y: invert(model_velocity(model, y, 1.0, amp_dtype), x, solver, steps, shift))


@torch.no_grad()
def regenerate_images(model, noise: Tensor, labels: Optional[Tensor] = None, solver: Any = "rf2", steps: int = 10,
                      shift: float = 1.0, cfg_scale: float = 1.0, amp_dtype: Optional[torch.dtype] = None,
                      batch_size: int = 256, device: Any = "cpu") -> tuple[Tensor, int]:
    """Regenerate images from inverted ``noise [N, C, H, W]`` under ``labels [N]``.
    Returns ``(images [N, C, H, W] float32 on CPU, unclamped, NFE per image)``."""
    _check_batch(noise, labels)
    model.eval()
    return _batched(model, noise, labels, batch_size, device,
                    lambda x, y: regenerate(model_velocity(model, y, cfg_scale, amp_dtype), x, solver, steps, shift))
