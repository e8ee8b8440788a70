"""Perceptual distances for distillation losses: a pluggable ``(a, b) -> [B]`` callable.

2-rectified flow++ (Lee, Lin & Fanti, NeurIPS 2024, sec. 4.2, "LPIPS-Huber") and SlimFlow
(Zhu, Liu & Liu, ECCV 2024, sec. 4.3) measure the distance between a predicted and a
target image with LPIPS (Zhang et al., CVPR 2018, eq. 1): unit-normalise each layer's
activations along channels, square the difference, weight channels with learned
vectors ``w_l``, average over space and sum over layers.

LPIPS needs pretrained VGG/AlexNet weights, which flowdit cannot download. So the
default distance is LPIPS's formula with ``w_l = 1`` (the "baseline" variant of Zhang et
al.) on the activations of a small network that *is* shipped: the data set's *guide*
network (``flowdit.eval``: never the evaluator, which scores the results). The trainer
loads it and hands it here; this module only knows ``nn.Module``s, so it stays below the
``eval`` layer. Where the ``lpips`` package and its weights are present,
:class:`LPIPSDistance` plugs in instead (``flow.perceptual: lpips``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["PerceptualFn", "FeatureDistance", "LPIPSDistance"]

PerceptualFn = Callable[[Tensor, Tensor], Tensor]
"""``(a [B, C, H, W], b [B, C, H, W]) -> distance [B]``, images in ``[-1, 1]``, differentiable in ``a``."""


def _unit(f: Tensor, eps: float = 1e-10) -> Tensor:
    # LPIPS's channel normalisation: each location's feature vector to unit length, so
    # that layers with large activations do not dominate the sum.
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class FeatureDistance(nn.Module):
    """LPIPS-style distance with unit channel weights on a frozen network's activations.

    ``d(a, b) = sum_l mean_{h,w} || u_l(a)_{hw} - u_l(b)_{hw} ||^2`` with ``u_l`` the
    channel-normalised output of tap ``l`` (Zhang et al. 2018, eq. 1 with ``w_l = 1``).

    Args:
        net: the feature network (its weights are frozen and it is put in eval mode).
        taps: modules of ``net`` whose outputs are compared; default: every activation
            module (GELU/ReLU/SiLU) inside ``net``, in order.
        forward: how to run ``net`` on an image batch (default ``net.features`` when it
            exists, else ``net``); only the taps' outputs are used.

    Inputs are images ``[B, C, H, W]`` in ``[-1, 1]`` at the network's own resolution (the
    guide network was trained on them, so no resizing as LPIPS does for VGG).
    """

    def __init__(self, net: nn.Module, taps: Optional[Sequence[nn.Module]] = None,
                 forward: Optional[Callable[[Tensor], Tensor]] = None):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        if taps is None:
            taps = [m for m in net.modules() if isinstance(m, (nn.GELU, nn.ReLU, nn.SiLU))]
        if not taps:
            raise ConfigError(f"{type(net).__name__} has no activation modules to read features from; pass taps=")
        self.taps = list(taps)
        self._run = forward or getattr(net, "features", net)

    def layer_features(self, x: Tensor) -> list[Tensor]:
        """Activations of every tap for ``x [B, C, H, W]``, in tap order."""
        out: list[Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: out.append(o)) for m in self.taps]
        try:
            self._run(x)
        finally:
            for h in hooks:
                h.remove()
        return out

    def train(self, mode: bool = True) -> "FeatureDistance":
        # The network stays in eval mode whatever the owner does (no dropout, fixed stats).
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Distance per sample ``[B]`` (float32) between ``a`` and ``b`` ``[B, C, H, W]``."""
        if a.shape != b.shape:
            raise ConfigError(f"perceptual distance of shapes {tuple(a.shape)} and {tuple(b.shape)}")
        if b.requires_grad:
            both = self.layer_features(torch.cat([a.float(), b.float()]))
            n = a.shape[0]
            pairs = [(f[:n], f[n:]) for f in both]
        else:
            # A fixed target (the usual case: a teacher endpoint or a detached two-step
            # target) needs no graph: its features are computed without autograd, which
            # spares the backward pass over half of the batch.
            with torch.no_grad():
                fbs = self.layer_features(b.float())
            pairs = list(zip(self.layer_features(a.float()), fbs))
        d = torch.zeros(a.shape[0], device=a.device)
        for fa, fb in pairs:
            d = d + (_unit(fa.float()) - _unit(fb.float())).pow(2).sum(dim=1).flatten(1).mean(dim=1)
        return d


class LPIPSDistance(nn.Module):
    """LPIPS (Zhang et al. 2018) from the ``lpips`` package, as 2-RF++ and SlimFlow use it.

    Images in ``[-1, 1]`` (what ``lpips`` expects); grey images are repeated to three
    channels and, as in the 2-RF++ code, both inputs are resized bilinearly to ``size``
    pixels first. Needs ``pip install lpips`` and its VGG weights on disk.
    """

    def __init__(self, net: str = "vgg", size: int = 224):
        super().__init__()
        try:
            import lpips  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError("flow.perceptual=lpips needs the lpips package (pip install lpips) and its "
                              "VGG weights; use flow.perceptual=guide offline") from None
        self.metric = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)
        self.size = size

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """LPIPS per sample ``[B]`` between ``a`` and ``b`` ``[B, C, H, W]`` in ``[-1, 1]``."""
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        if self.size and a.shape[-1] != self.size:
            a = F.interpolate(a.float(), size=self.size, mode="bilinear")
            b = F.interpolate(b.float(), size=self.size, mode="bilinear")
        return self.metric(a, b).flatten().float()
