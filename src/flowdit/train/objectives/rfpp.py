"""2-rectified flow++ (Lee, Lin & Fanti, "Improving the Training of Rectified Flows",
NeurIPS 2024, sec. 4.2, eq. for the LPIPS-Huber-1/t loss): reflow on fixed pairs with

    L = (1 - t) H(v, eps - x0) / D  +  w_p P(x_t - t v, x0) / max(t, 1e-5),

``H`` the pseudo-Huber distance (``c = 0.00054 D`` unless ``flow.huber_c``), ``P`` the
perceptual distance ``flow.perceptual`` on the data estimate and ``w_p`` =
``flow.perceptual_weight`` (:func:`flowdit.distill.rfpp_loss`). Selected by ``flow.loss=rfpp``;
trains on ``data.pairs``.
"""

from __future__ import annotations

from torch import Tensor

from ...distill.rfpp import rfpp_loss
from ...errors import ConfigError
from .base import TrainingObjective, build_perceptual

__all__ = ["RectifiedFlowPP"]


class RectifiedFlowPP(TrainingObjective):
    """The 2-RF++ loss of ``v, xt, x0, eps [B, C, H, W]`` at ``t [B]`` (module docstring).
    ``perceptual``: the frozen perceptual distance, loaded when ``flow.perceptual_weight > 0``
    (else ``None`` and the loss is the time-weighted pseudo-Huber term alone)."""

    name = "rfpp"

    def __init__(self, cfg, dataset, device, amp_dtype):
        super().__init__(cfg, dataset, device, amp_dtype)
        fl = cfg.flow
        self.perceptual = build_perceptual(fl.perceptual, dataset.name, device) if fl.perceptual_weight > 0 else None

    @classmethod
    def selected_by(cls, cfg) -> bool:
        return cfg.flow.loss == "rfpp"

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.flow.loss == "rfpp" and not cfg.data.pairs:
            raise ConfigError("flow.loss=rfpp is the 2-rectified flow++ reflow loss: set data.pairs")
        if cfg.flow.loss == "rfpp" and cfg.distill.steps:
            raise ConfigError("flow.loss=rfpp trains the flow at all t; for distillation (distill.steps > 0) choose "
                              "the distance with distill.loss")

    def velocity_loss(self, v: Tensor, xt: Tensor, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        fl = self.cfg.flow
        loss, _ = rfpp_loss(v, xt, x0, eps, t, perceptual=self.perceptual, perceptual_weight=fl.perceptual_weight,
                            huber_c=fl.huber_c)
        return loss
