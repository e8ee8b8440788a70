"""Flow-matching regression losses on the velocity.

Both losses reduce each sample to one number first, so a per-sample time weighting
(``weight [B]``) and per-time loss logging are straightforward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowdit.errors import ConfigError

__all__ = ["flow_matching_loss", "default_huber_c"]

HUBER_C_PER_SQRT_DIM = 0.00054


def default_huber_c(num_elements: int) -> float:
    """Default pseudo-Huber constant ``c = 0.00054 sqrt(D)`` for D elements per sample.

    From Song & Dhariwal 2023, "Improved techniques for training consistency models",
    section 3.3, where it is tuned for CIFAR-10 (D = 3 * 32 * 32 gives c = 0.03).
    The public code of 2-rectified flow++ (Lee, Lin & Fanti 2024) uses ``0.00054 D``
    instead, divided by D; that variant is :func:`flowdit.distill.rfpp_loss`.
    """
    return HUBER_C_PER_SQRT_DIM * math.sqrt(num_elements)


def flow_matching_loss(
    v_pred: Tensor,
    v_target: Tensor,
    kind: str = "mse",
    huber_c: float | None = None,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Velocity regression loss (conditional flow matching, Lipman et al. 2023).

    Args:
        v_pred: model output, ``[B, ...]``.
        v_target: ``eps - x0``, same shape.
        kind: ``"mse"``: per-sample mean of squared differences over all non-batch
            dims; ``"huber"``: pseudo-Huber per sample, ``sqrt(||d||^2 + c^2) - c``
            with ``||d||^2`` the per-sample squared L2 norm (Song & Dhariwal 2023).
        huber_c: the pseudo-Huber ``c``; default ``0.00054 sqrt(D)``, D the number of
            elements per sample.
        weight: optional per-sample weights ``[B]`` (e.g. a function of t), multiplied
            into the per-sample losses.

    Returns:
        ``(loss, per_sample)``: ``per_sample`` is the (weighted) float32 loss of each
        sample, shape ``[B]``, and ``loss = per_sample.mean()``.

    Computed in float32 even when the inputs are bf16/fp16 (autocast), since squared
    norms over many elements lose most of their precision in half types.
    """
    if v_pred.shape != v_target.shape:
        raise ConfigError(
            f"v_pred shape {tuple(v_pred.shape)} does not match v_target shape "
            f"{tuple(v_target.shape)}"
        )
    if v_pred.dim() < 1 or v_pred.shape[0] == 0:
        raise ConfigError(f"loss needs a non-empty batch dim, got shape {tuple(v_pred.shape)}")
    diff = (v_pred.float() - v_target.float()).flatten(1)
    if kind == "mse":
        per_sample = diff.pow(2).mean(dim=1)
    elif kind == "huber":
        c = default_huber_c(diff.shape[1]) if huber_c is None else float(huber_c)
        if not (math.isfinite(c) and c > 0):
            raise ConfigError(f"pseudo-Huber constant must be positive, got huber_c={huber_c!r}")
        sq_norm = diff.pow(2).sum(dim=1)
        # sqrt(n + c^2) - c rewritten as n / (sqrt(n + c^2) + c): same value, but
        # without cancellation when ||d|| << c (the subtraction loses every digit).
        per_sample = sq_norm / (torch.sqrt(sq_norm + c * c) + c)
    else:
        raise ConfigError(f"unknown loss kind {kind!r}; valid: mse, huber")
    if weight is not None:
        weight = torch.as_tensor(weight, device=per_sample.device).float()
        if weight.shape != per_sample.shape:
            raise ConfigError(
                f"loss weight must have shape [B] = [{per_sample.shape[0]}], "
                f"got {tuple(weight.shape)}"
            )
        per_sample = per_sample * weight
    return per_sample.mean(), per_sample
