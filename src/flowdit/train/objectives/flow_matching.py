"""Flow matching (Lipman et al., "Flow Matching for Generative Modeling", ICLR 2023; Liu,
Gong & Liu, "Flow Straight and Fast", ICLR 2023): regress the velocity of the straight path,

    L = E_{t, x0, eps} d(v(x_t, t, y), eps - x0),      x_t = (1 - t) x0 + t eps,

with ``d`` the per-sample mean squared error or the pseudo-Huber distance
``sqrt(||a - b||^2 + c^2) - c`` (Song & Dhariwal 2023), ``flow.loss`` ``mse`` / ``huber``.
On ``data.pairs`` (fixed couplings ``(eps, x0)`` of a teacher) the same loss is reflow.

Also home of the ``flow`` config section, which every objective shares: how t is drawn
(the trainer's draw), the loss keys, label dropout and the objective's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from torch import Tensor

from ...core.losses import flow_matching_loss
from ...errors import ConfigError
from ..sections import key
from .base import TrainingObjective

__all__ = ["FlowSection", "FlowMatching"]


@dataclass
class FlowSection:
    """The rectified-flow objective: how t is drawn, the loss, and label dropout for CFG.

    ``loss``: ``mse``, ``huber`` (pseudo-Huber, ``huber_c``) or ``rfpp``, the 2-rectified
    flow++ loss on pairs: ``(1 - t)`` pseudo-Huber plus ``perceptual_weight / t`` times the
    ``perceptual`` distance of the data estimate (:func:`flowdit.distill.rfpp_loss`).
    ``perceptual``: ``guide`` (LPIPS-style distance on the data set's shipped guide network)
    or ``lpips`` (the ``lpips`` package, where installed with its weights); also used by
    ``distill.loss=perceptual``. ``objective``: ``auto`` chooses the training objective from
    ``flow.loss`` and ``distill.*`` (:func:`flowdit.train.objectives.select_objective`);
    otherwise the name of a registered one.
    """

    time_sampler: str = key("logit_normal:m=0,s=1", "how t is drawn: uniform, logit_normal:m=,s=, mode:scale=, "
                                                    "cosmap, u_shaped:a=")
    shift: float = key(1.0, "resolution shift t' = a t / (1 + (a - 1) t), the same at train and sample time")
    loss: Literal["mse", "huber", "rfpp"] = key("mse", "mse, huber (pseudo-Huber) or rfpp (2-rectified flow++ on "
                                                       "data.pairs)")
    huber_c: Optional[float] = key(None, "pseudo-Huber constant (null: 0.00054 sqrt(D))")
    label_dropout: float = key(0.1, "probability of the null class (classifier-free guidance)")
    perceptual: Literal["guide", "lpips"] = key("guide", "perceptual distance of rfpp and distill.loss=perceptual")
    perceptual_weight: float = key(1.0, "weight of the perceptual term of rfpp")
    objective: str = key("auto", "training objective: auto (from flow.loss and distill.*) or a registered name "
                                 "(flow_matching, rfpp, distillation, slimflow, repa, sra)")

    def validate(self) -> None:
        from ...core.timesteps import build_time_sampler
        from .registry import OBJECTIVES, objective_names

        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"flow.label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.shift <= 0:
            raise ConfigError(f"flow.shift must be positive, got {self.shift}")
        if self.huber_c is not None and not self.huber_c > 0:
            raise ConfigError(f"flow.huber_c must be positive, got {self.huber_c}")
        if self.perceptual_weight < 0:
            raise ConfigError(f"flow.perceptual_weight must be >= 0, got {self.perceptual_weight}")
        if self.objective != "auto" and self.objective not in OBJECTIVES:
            raise ConfigError(f"flow.objective: unknown training objective {self.objective!r}; valid: auto, "
                              f"{', '.join(objective_names())}")
        try:
            build_time_sampler(self.time_sampler)
        except ConfigError as e:
            raise ConfigError(f"flow.time_sampler: {e}") from None


class FlowMatching(TrainingObjective):
    """Flow matching / reflow with ``flow.loss`` ``mse`` or ``huber`` (see the module docstring):
    ``flowdit.core.losses.flow_matching_loss(v, eps - x0)`` for ``v, x0, eps [B, C, H, W]``,
    the mean over the batch of the per-sample distance. The fallback of ``flow.objective=auto``."""

    name = "flow_matching"

    @classmethod
    def selected_by(cls, cfg) -> bool:
        return True

    def velocity_loss(self, v: Tensor, xt: Tensor, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        fl = self.cfg.flow
        loss, _ = flow_matching_loss(v, eps - x0, kind=fl.loss, huber_c=fl.huber_c)
        return loss
