"""SlimFlow (Zhu, Liu & Liu, "SlimFlow: Training Smaller One-Step Diffusion Models with
Rectified Flow", ECCV 2024) as a training objective: its draws and its flow-guided term
around the objective the other settings choose (flow matching / reflow, or one-step
distillation). The formulas are in :mod:`flowdit.distill.slimflow`.

* Annealing reflow (sec. 4.2, ``distill.anneal_steps``): the pair's noise becomes
  ``sqrt(1 - b^2) z_pair + b eps`` with this step's fresh noise ``eps`` and ``b`` annealed
  from 1 to 0 (``distill.anneal_schedule``).
* Joint flips (``distill.flip``): each pair's data and noise flipped left-right together
  with probability 1/2, one coin per sample from the step's noise stream.
* Flow-guided distillation (sec. 4.3, eq. 9; ``distill.teacher``, with ``distill.steps=1``):
  on fresh noise ``z`` (stream :data:`GUIDE_STREAM`) and times ``s ~ U(0.2, 0.8)``, the
  student's one-step sample ``z - v(z, 1)`` regresses the two-step target
  ``x_s - s v_teacher(x_s, s)``, ``x_s = (1 - s) (z - v(z, 1)) + s z``, with the distance
  ``distill.loss``, weight ``distill.teacher_weight``.

Selected when any of ``distill.teacher``, ``distill.anneal_steps``, ``distill.flip`` is set.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ...core.path import interpolate
from ...distill.onestep import distillation_loss
from ...distill.slimflow import anneal_randomness, flow_guided_target, guide_times, joint_flip, mix_noise
from ...errors import FlowditError
from ...utils.precision import autocast
from .base import FIRST_OBJECTIVE_STREAM, Extras, StepDraws, TrainingObjective, Velocity
from .distillation import DistillSection

__all__ = ["SlimFlow", "GUIDE_STREAM"]

# The stream of the flow-guided term's fresh noise and intermediate times.
GUIDE_STREAM = FIRST_OBJECTIVE_STREAM


class SlimFlow(TrainingObjective):
    """SlimFlow's options (module docstring) around ``inner``, the objective that
    ``flow.objective=auto`` chooses without them (:func:`flowdit.train.objectives.select_objective`).

    Extras: ``flip [G]`` (bool, with ``distill.flip``), and with ``distill.teacher`` the fresh
    noise ``fresh [G, C, H, W]`` and times ``s [G]`` of the flow-guided term. ``teacher``: the
    frozen teacher network (``None`` without ``distill.teacher``); ``perceptual``: the inner
    objective's perceptual distance, also the guided term's.
    """

    name = "slimflow"
    sections = {"distill": DistillSection}

    def __init__(self, cfg, dataset, device, amp_dtype):
        super().__init__(cfg, dataset, device, amp_dtype)
        from .registry import select_objective

        self.inner: TrainingObjective = select_objective(cfg, exclude=(type(self),))(cfg, dataset, device, amp_dtype)
        self.perceptual = getattr(self.inner, "perceptual", None)
        self.teacher = self._load_teacher(cfg.distill.teacher, dataset) if cfg.distill.teacher else None

    @classmethod
    def selected_by(cls, cfg) -> bool:
        d = cfg.distill
        return bool(d.teacher or d.anneal_steps or d.flip)

    def _load_teacher(self, path: str, dataset) -> torch.nn.Module:
        from ...inference.loading import load_run_model

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

    def draw(self, draws: StepDraws, generator: torch.Generator) -> Extras:
        """The inner objective's draws, then ``flip [G]`` (one coin per pair, the step's noise
        stream) and, with a teacher, ``fresh [G, C, H, W]`` and ``s = 0.2 + 0.6 u [G]`` from
        :data:`GUIDE_STREAM`."""
        extras = dict(self.inner.draw(draws, generator))
        G = draws.size
        if self.cfg.distill.flip:
            extras["flip"] = torch.rand(G, generator=generator) < 0.5
        if self.teacher is not None:
            g = draws.stream(GUIDE_STREAM)
            extras["fresh"] = torch.randn(G, *draws.eps.shape[1:], generator=g)
            extras["s"] = guide_times(torch.rand(G, generator=g))
        return extras

    def couple(self, step: int, x0: Tensor, eps: Tensor, fresh: Tensor, extras: Extras) -> tuple[Tensor, Tensor]:
        """The pair's noise blended with ``fresh`` (annealing reflow,
        :func:`flowdit.distill.mix_noise`), then ``x0, eps`` flipped together where ``flip``."""
        x0, eps = self.inner.couple(step, x0, eps, fresh, extras)
        d = self.cfg.distill
        if d.anneal_steps:  # annealing reflow: blend in this step's fresh noise
            eps = mix_noise(eps, fresh, anneal_randomness(step, d.anneal_steps, d.anneal_schedule))
        if "flip" in extras:
            x0, eps = joint_flip(x0, eps, extras["flip"])
        return x0, eps

    def loss(self, velocity: Velocity, x0: Tensor, eps: Tensor, t: Tensor, y: Tensor, extras: Extras) -> Tensor:
        """The inner objective's loss; with a teacher, one model call on ``[x_t; fresh]``
        (``[2B, C, H, W]``, times ``[t; 1]``) for the inner velocity loss plus
        ``teacher_weight`` times the flow-guided term (module docstring)."""
        if self.teacher is None:
            return self.inner.loss(velocity, x0, eps, t, y, extras)
        d, fresh, s = self.cfg.distill, extras["fresh"], extras["s"]
        xt = interpolate(x0, eps, t)
        # One forward pass for both terms: DDP expects one forward per backward.
        n = len(x0)
        ones = torch.ones_like(s)
        v_all = velocity(torch.cat([xt, fresh]), torch.cat([t, ones]), torch.cat([y, y]))
        v, v_fresh = v_all[:n], v_all[n:]
        loss = self.inner.velocity_loss(v, xt, x0, eps, t)
        if d.teacher_weight > 0:
            # The student's one-step sample from fresh noise regresses the two-step target.
            target = flow_guided_target(self._teacher_velocity(y), fresh, fresh - v_fresh, s)
            guided, _ = distillation_loss(v_fresh, fresh, target, fresh, ones, kind=d.loss,
                                          perceptual=self.perceptual, huber_c=self.cfg.flow.huber_c)
            loss = loss + d.teacher_weight * guided
        return loss
