"""The 2-rectified flow++ loss (Lee, Lin & Fanti, "Improving the Training of Rectified
Flows", NeurIPS 2024, sec. 4.2 and their public code, github.com/sangyun884/rfpp,
``train.py``, ``--loss_type lpips-huber --lpips_divt``).

Reflow on fixed pairs ``(z_1, z_0)`` with two changes to the squared velocity error:

    L = (1 - t) * H(v_hat, z_1 - z_0) / D  +  w_p * P(x0_hat, z_0) / t,
    x0_hat = x_t - t v_hat,      H(a, b) = sqrt(||a - b||^2 + c^2) - c,   c = 0.00054 D,

with ``D`` the number of elements of one sample and ``P`` a perceptual distance (LPIPS in
the paper; see :mod:`flowdit.distill.perceptual`). The pseudo-Huber term is weighted down
toward the noise end and the perceptual term, on the data estimate, toward the data end.
The time distribution is the U-shaped one (:class:`flowdit.core.timesteps.UShaped`, their
``--a 4``), so that both ends are trained often.

Conventions. Their code writes ``z_t = (1 - t) x + t z`` with ``x`` data, ``z`` noise and
the target ``z - x``: t = 1 is noise, the same as flowdit, so ``t``, ``v`` and the
weights carry over unchanged (``tests/test_distill.py`` checks this against their formula
written in their variables). Two details follow their code rather than the usual
pseudo-Huber of Song & Dhariwal 2023: ``c = 0.00054 D`` (not ``0.00054 sqrt(D)``) and the
division by ``D``. Their times are drawn in ``[1e-5, 1 - 1e-5]``; here ``1 / t`` uses
``max(t, 1e-5)`` for the same bound.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.losses import flow_matching_loss
from ..core.path import x0_from_velocity
from ..errors import ConfigError
from .perceptual import PerceptualFn

__all__ = ["rfpp_huber_c", "rfpp_loss", "RFPP_HUBER_C_PER_DIM", "RFPP_T_MIN"]

RFPP_HUBER_C_PER_DIM = 0.00054  # their code: huber_c = 0.00054 * data_dim
RFPP_T_MIN = 1e-5  # their sample_t maps t into [1e-5, 1 - 1e-5]


def rfpp_huber_c(num_elements: int) -> float:
    """The pseudo-Huber constant of the 2-RF++ code, ``c = 0.00054 D`` for ``D`` elements
    per sample (``train.py``, ``loss_func_huber``)."""
    return RFPP_HUBER_C_PER_DIM * num_elements


def rfpp_loss(
    v_hat: Tensor,
    x_t: Tensor,
    x0: Tensor,
    eps: Tensor,
    t: Tensor,
    perceptual: Optional[PerceptualFn] = None,
    perceptual_weight: float = 1.0,
    huber: bool = True,
    huber_c: Optional[float] = None,
    time_weight: bool = True,
) -> tuple[Tensor, Tensor]:
    """The 2-RF++ loss ``(1 - t) H(v_hat, eps - x0) / D + w_p P(x_t - t v_hat, x0) / t``
    (Lee et al. 2024, sec. 4.2; constants from their code, see the module docstring).

    Args:
        v_hat: model velocity at ``(x_t, t)``, ``[B, C, H, W]``.
        x_t: ``(1 - t) x0 + t eps``, ``[B, C, H, W]``.
        x0, eps: the pair's data end (t = 0) and noise end (t = 1), ``[B, C, H, W]``.
        t: times ``[B]`` in ``[0, 1]``.
        perceptual: ``(a, b) -> [B]`` distance on images (``None``: no perceptual term).
        perceptual_weight: ``w_p`` (1 in the paper).
        huber: pseudo-Huber on the velocity (``False``: per-sample mean squared error,
            which with ``time_weight=False`` and no perceptual term is plain reflow MSE).
        huber_c: the pseudo-Huber ``c`` (default ``0.00054 D``).
        time_weight: multiply the velocity term by ``1 - t`` and the perceptual term by
            ``1 / max(t, 1e-5)``.

    Returns:
        ``(loss, per_sample [B])``, float32, ``loss = per_sample.mean()``.
    """
    if perceptual_weight < 0:
        raise ConfigError(f"perceptual weight must be >= 0, got {perceptual_weight}")
    t = t.float()
    D = v_hat[0].numel()
    w_v = (1 - t) if time_weight else torch.ones_like(t)
    if huber:
        c = rfpp_huber_c(D) if huber_c is None else huber_c
        # flow_matching_loss(kind="huber") is sqrt(||d||^2 + c^2) - c per sample; /D as in their code.
        _, per_sample = flow_matching_loss(v_hat, eps - x0, kind="huber", huber_c=c, weight=w_v / D)
    else:
        _, per_sample = flow_matching_loss(v_hat, eps - x0, kind="mse", weight=w_v)
    if perceptual is not None and perceptual_weight > 0:
        x0_hat = x0_from_velocity(x_t, v_hat.float(), t)
        w_p = perceptual_weight / t.clamp_min(RFPP_T_MIN) if time_weight else torch.full_like(t, perceptual_weight)
        per_sample = per_sample + w_p * perceptual(x0_hat, x0).float()
    return per_sample.mean(), per_sample
