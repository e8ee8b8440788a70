"""k-step distillation of a flow on its coupling pairs (Liu, Gong & Liu, "Flow Straight and
Fast", ICLR 2023, sec. 2.3; SlimFlow's public code): the reflow regression restricted to the
student's Euler grid,

    L = E_{i, pair} d(v(x_t, t, y), eps - x0),      t = 1 - i / k,  i ~ U{0, ..., k - 1},

so that ``k`` Euler steps from the pair's noise ``eps`` land on the teacher's endpoint
``x0`` (:mod:`flowdit.distill.onestep`). ``d``: ``distill.loss`` ``mse`` / ``huber`` on the
velocity, or ``perceptual`` (``flow.perceptual``) on the data estimate ``x_t - t v``.
Selected by ``distill.steps = k >= 1``; trains on ``data.pairs``.

Also home of the ``distill`` config section, which SlimFlow's options share
(:mod:`flowdit.train.objectives.slimflow`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from ...distill.onestep import distill_times, distillation_loss
from ...errors import ConfigError
from ..sections import absolute_path, key
from .base import Extras, StepDraws, TrainingObjective, build_perceptual

__all__ = ["DistillSection", "Distillation"]


@dataclass
class DistillSection:
    """Distillation on ``data.pairs`` (all off by default, which is plain reflow).

    ``steps``: ``k >= 1`` trains a k-step student: t only on the grid ``1, (k-1)/k, ..., 1/k``
    (1: one-step), ``loss`` the distance (``mse``, ``huber`` or ``perceptual``); 0: off.
    ``teacher``: a run directory; adds SlimFlow's flow-guided term (two-step target from
    that teacher on fresh noise, weight ``teacher_weight``); needs ``steps=1``.
    ``anneal_steps``: SlimFlow's annealing reflow, the pair noise blended with fresh noise,
    ``sqrt(1 - b^2) z + b eps``, ``b`` from 1 to 0 over that many steps by
    ``anneal_schedule`` (``linear``, ``cos``, ``exp``); 0: off. ``flip``: flip each pair's
    data and noise left-right together with probability 1/2.
    """

    steps: int = key(0, "k-step distillation on data.pairs (t on 1, (k-1)/k, ..., 1/k); 0: off")
    loss: Literal["mse", "huber", "perceptual"] = key("mse", "distance of the distillation loss")
    teacher: Optional[str] = key(None, "run directory of the SlimFlow flow-guided teacher (needs distill.steps=1)")
    teacher_weight: float = key(1.0, "weight of the flow-guided term")
    anneal_steps: int = key(0, "SlimFlow annealing reflow over this many steps; 0: off")
    anneal_schedule: Literal["linear", "cos", "exp"] = key("linear", "schedule of the annealing randomness")
    flip: bool = key(False, "flip each pair's data and noise left-right together with probability 1/2")

    @property
    def active(self) -> bool:
        """Whether any distillation or SlimFlow option is on."""
        return bool(self.steps or self.teacher or self.anneal_steps or self.flip)

    def validate(self) -> None:
        if self.steps < 0 or self.anneal_steps < 0:
            raise ConfigError(f"distill.steps and distill.anneal_steps must be >= 0, got {self.steps}, "
                              f"{self.anneal_steps}")
        if self.teacher and self.steps != 1:
            raise ConfigError(f"distill.teacher (flow-guided distillation) is a one-step method: set distill.steps=1, "
                              f"got distill.steps={self.steps}")
        if self.teacher_weight < 0:
            raise ConfigError(f"distill.teacher_weight must be >= 0, got {self.teacher_weight}")

    def resolved(self) -> "DistillSection":
        """A copy with ``teacher`` made absolute against the working directory."""
        return dataclasses.replace(self, teacher=absolute_path(self.teacher))


class Distillation(TrainingObjective):
    """k-step distillation (module docstring): :meth:`draw` puts ``t [G]`` on the grid
    ``1, (k-1)/k, ..., 1/k`` (:func:`flowdit.distill.distill_times`, one uniform per sample
    from the step's noise stream, after the trainer's draws); the loss is
    :func:`flowdit.distill.distillation_loss` of ``v, xt, x0, eps [B, C, H, W]`` at ``t [B]``.
    ``perceptual``: the frozen perceptual distance with ``distill.loss=perceptual``, else ``None``."""

    name = "distillation"
    sections = {"distill": DistillSection}

    def __init__(self, cfg, dataset, device, amp_dtype):
        super().__init__(cfg, dataset, device, amp_dtype)
        d = cfg.distill
        self.perceptual = build_perceptual(cfg.flow.perceptual, dataset.name, device) if d.loss == "perceptual" \
            else None

    @classmethod
    def selected_by(cls, cfg) -> bool:
        return cfg.distill.steps > 0

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.distill.active and not cfg.data.pairs:
            raise ConfigError("distill.* options train on coupling pairs: set data.pairs (flowdit reflow pairs)")

    def draw(self, draws: StepDraws, generator) -> Extras:
        """Replace ``draws.t`` by the grid times, one uniform per sample from ``generator``."""
        draws.t = distill_times(self.cfg.distill.steps, torch.rand(draws.size, generator=generator))
        return {}

    def velocity_loss(self, v: Tensor, xt: Tensor, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        loss, _ = distillation_loss(v, xt, x0, eps, t, kind=self.cfg.distill.loss, perceptual=self.perceptual,
                                    huber_c=self.cfg.flow.huber_c)
        return loss
