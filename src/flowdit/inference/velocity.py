"""The one way a class-conditional model becomes the velocity the sampling loop integrates.

``model_velocity(model, y, cfg_scale, amp_dtype)`` wraps ``model(x, t, y) -> v`` as
``fn(x, t) -> v``: classifier-free guidance (``flowdit.sampling.guidance``, one batched
forward for both branches), the model run under autocast when ``amp_dtype`` is set, and
the velocity returned as float32 so that the ODE state stays float32 whatever the
model's precision. Sampling, inversion, editing, restoration, pair generation and the
benchmarks all go through it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..core.hooks import StepContext
from ..errors import ConfigError
from ..sampling.guidance import GuidedVelocity, cfg_velocity
from ..utils.precision import autocast

__all__ = ["ModelVelocity", "model_velocity"]


class ModelVelocity:
    """Callable ``fn(x [B, ...], t [B]) -> v [B, ...]`` (float32); see :func:`model_velocity`.

    ``guided`` is the classifier-free-guidance wrapper (its ``counter`` counts forwards
    and rows); ``amp_dtype`` the autocast dtype (``None``: fp32).
    """

    def __init__(self, guided: GuidedVelocity, amp_dtype: Optional[torch.dtype]):
        self.guided, self.amp_dtype = guided, amp_dtype

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        fn = self.guided
        # A condition of batch 1 (one label, or the null class for y=None) serves any batch.
        if isinstance(fn.y, Tensor) and fn.y.shape[0] != x.shape[0]:
            fn.y = fn.y.to(x.device).expand(x.shape[0])
            fn.null = fn.null.to(x.device).expand(x.shape[0])
        with autocast(x.device.type, self.amp_dtype):
            return fn(x, t).float()


def model_velocity(model: Callable, y: Any, cfg_scale: float = 1.0, amp_dtype: Optional[torch.dtype] = None,
                   ctx: Optional[StepContext] = None, interval: Optional[tuple[float, float]] = None,
                   null: Any = None) -> ModelVelocity:
    """Velocity function ``fn(x [B, ...], t [B]) -> v`` (float32) of a class-conditional model.

    Args:
        model: ``model(x, t, y) -> v`` (``model(x, t, y, ctx=ctx)`` with a context), with a
            ``null_class`` attribute for guidance and for ``y=None``.
        y: class indices ``[B]`` (or ``[1]``, broadcast to the batch), a dict of ``[B, ...]``
            tensors, or ``None`` for the null class (unconditional).
        cfg_scale: guidance scale; 1 runs the conditional rows only.
        amp_dtype: autocast dtype of the model (``None``: fp32); the result is float32.
        ctx: the ``StepContext`` (``flowdit.core.hooks``) handed to every model call as
            ``ctx=ctx``: its ``branch`` is set per call, and a block policy's
            ``cfg_mode="split"`` runs the two branches as two calls.
        interval: optional ``(t_lo, t_hi)``: guidance only for ``t_lo <= t <= t_hi``.
        null: the unconditional branch's condition (a negative prompt's condition for a
            text-conditioned model); default the model's ``null_class``.
    """
    null_class = getattr(model, "null_class", None)
    if y is None:
        if null_class is None:
            raise ConfigError("y=None needs a model with a null_class attribute")
        y = torch.full((1,), null_class, dtype=torch.long)
    if null is None:
        if null_class is None and cfg_scale != 1:
            raise ConfigError("guidance needs a null condition: pass null= for a model without a null_class")
        # Unguided: the null branch never runs, so any condition of y's form will do.
        null = null_class if null_class is not None else y
    guided = cfg_velocity(model, y, null, cfg_scale, interval=interval, ctx=ctx)
    return ModelVelocity(guided, amp_dtype)
