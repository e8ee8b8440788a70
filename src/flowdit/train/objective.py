"""The loss of one micro-batch, as the run's configuration chooses it.

* ``flow.loss`` ``mse`` / ``huber``: flow matching (or reflow, on ``data.pairs``);
* ``flow.loss=rfpp``: the 2-rectified flow++ loss (:func:`flowdit.distill.rfpp_loss`);
* ``distill.steps=k``: k-step distillation (:func:`flowdit.distill.distillation_loss`), the
  times already restricted to the grid by the trainer's draw;
* ``distill.teacher``: plus SlimFlow's flow-guided term on fresh noise
  (:func:`flowdit.distill.flow_guided_target`).

The perceptual network (the data set's shipped *guide* network, or LPIPS) and the
teacher are loaded once here, frozen, so the trainer only calls the objective.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..core.losses import flow_matching_loss
from ..core.path import interpolate
from ..distill.onestep import distillation_loss
from ..distill.perceptual import FeatureDistance, LPIPSDistance, PerceptualFn
from ..distill.rfpp import rfpp_loss
from ..distill.slimflow import flow_guided_target
from ..errors import FlowditError
from ..utils.precision import autocast
from .config import RunConfig

Velocity = Callable[[Tensor, Tensor, Tensor], Tensor]


def build_perceptual(name: str, dataset: str, device: torch.device) -> PerceptualFn:
    """The perceptual distance ``flow.perceptual`` names, on ``device``: ``guide`` (the
    data set's shipped guide network, :class:`flowdit.distill.FeatureDistance`) or
    ``lpips``. The evaluator network is never used: it scores the results."""
    if name == "guide":
        from ..eval.evaluator import load_classifier

        net, _ = load_classifier(dataset, "guide")
        return FeatureDistance(net).to(device)
    if name == "lpips":
        return LPIPSDistance().to(device)
    raise FlowditError(f"unknown perceptual network {name!r}; valid: guide, lpips (never the evaluator)")


class Objective:
    """``objective(velocity, x0, eps, t, y, fresh, s) -> loss`` for one micro-batch.

    ``velocity(x, t, y) -> v`` is the model being trained (float32 output); ``x0, eps``
    ``[B, C, H, W]`` the data and noise ends (a pair on ``data.pairs``), ``t, y`` ``[B]``;
    ``fresh [B, C, H, W]`` and ``s [B]`` the fresh noise and intermediate times of the
    flow-guided term (only with ``distill.teacher``).
    """

    def __init__(self, cfg: RunConfig, dataset, device: torch.device, amp_dtype: Optional[torch.dtype]):
        self.flow, self.distill = cfg.flow, cfg.distill
        self.amp_dtype, self.device = amp_dtype, device
        needs_perceptual = (cfg.flow.loss == "rfpp" and cfg.flow.perceptual_weight > 0) or \
            (cfg.distill.steps > 0 and cfg.distill.loss == "perceptual")
        self.perceptual = build_perceptual(cfg.flow.perceptual, dataset.name, device) if needs_perceptual else None
        self.teacher = self._load_teacher(cfg.distill.teacher, dataset) if cfg.distill.teacher else None

    def _load_teacher(self, path: str, dataset) -> torch.nn.Module:
        from .run import load_run_model

        teacher, meta = load_run_model(path)
        shape = tuple(meta.get("data", {}).get("shape", ()))
        if shape != tuple(dataset.shape) or teacher.num_classes != dataset.num_classes:
            raise FlowditError(f"distill.teacher {path}: a model of {shape} images and {teacher.num_classes} classes "
                               f"cannot teach on {dataset.name} ({tuple(dataset.shape)}, {dataset.num_classes} classes)")
        return teacher.to(self.device).requires_grad_(False).eval()

    def _teacher_velocity(self, y: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        def fn(x: Tensor, t: Tensor) -> Tensor:
            with torch.no_grad(), autocast(self.device.type, self.amp_dtype):
                return self.teacher(x, t, y).float()
        return fn

    def __call__(self, velocity: Velocity, x0: Tensor, eps: Tensor, t: Tensor, y: Tensor,
                 fresh: Optional[Tensor] = None, s: Optional[Tensor] = None) -> Tensor:
        fl, d = self.flow, self.distill
        xt = interpolate(x0, eps, t)
        if self.teacher is not None:
            # One forward pass for both terms: DDP expects one forward per backward.
            n = len(x0)
            ones = torch.ones_like(s)
            v_all = velocity(torch.cat([xt, fresh]), torch.cat([t, ones]), torch.cat([y, y]))
            v, v_fresh = v_all[:n], v_all[n:]
        else:
            v = velocity(xt, t, y)

        if d.steps:
            loss, _ = distillation_loss(v, xt, x0, eps, t, kind=d.loss, perceptual=self.perceptual, huber_c=fl.huber_c)
        elif fl.loss == "rfpp":
            loss, _ = rfpp_loss(v, xt, x0, eps, t, perceptual=self.perceptual, perceptual_weight=fl.perceptual_weight,
                                huber_c=fl.huber_c)
        else:
            loss, _ = flow_matching_loss(v, eps - x0, kind=fl.loss, huber_c=fl.huber_c)

        if self.teacher is not None and d.teacher_weight > 0:
            # The student's one-step sample from fresh noise regresses the two-step target.
            target = flow_guided_target(self._teacher_velocity(y), fresh, fresh - v_fresh, s)
            guided, _ = distillation_loss(v_fresh, fresh, target, fresh, ones, kind=d.loss,
                                          perceptual=self.perceptual, huber_c=fl.huber_c)
            loss = loss + d.teacher_weight * guided
        return loss
