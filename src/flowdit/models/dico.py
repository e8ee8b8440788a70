"""DiCo: a diffusion ConvNet (Ai et al., "DiCo: Revitalizing ConvNets for Scalable and
Efficient Diffusion Modeling", NeurIPS 2025; code shallowdream204/DiCo, ``dico_models.py``),
predicting the rectified-flow velocity like flowdit's DiT.

Layout (``DiCo.forward`` there): a 3x3 stride-1 convolution embeds the image at full
resolution; five stages of DiCo blocks run at widths ``D, 2D, 4D, 2D, 2D`` on the full,
half and quarter grids (encoder 1, encoder 2, middle, decoder 2, decoder 1), with
``Downsample`` (3x3 convolution halving the channels, then pixel-unshuffle by 2) and
``Upsample`` (3x3 convolution doubling them, then pixel-shuffle by 2) between, and the
encoder outputs concatenated into the decoder stages through 1x1 convolutions. Each
stage's blocks are modulated by ``c = t_emb + y_emb`` at the stage's width (three time
and three label embedders, widths ``D, 2D, 4D``; the decoder stages use the ``2D`` one).

The block (``DiCoBlock``): adaLN-Zero around two residual branches on ``[B, C, H, W]``,

    x = x + g1 * conv1x1(CCA(GELU(dwconv3x3(conv1x1(mod(LN(x), s1, b1))))))
    x = x + g2 * conv1x1(GELU(conv1x1_{C -> rC}(mod(LN(x), s2, b2)))),

with compact channel attention ``CCA(h) = h * sigmoid(conv1x1(avgpool(h)))`` (one 1x1
convolution, no reduction) and LayerNorm over channels without affine parameters. The
output layer is adaLN then a 3x3 convolution, zero-initialised. Initialisation: Xavier
uniform for every linear and convolution, N(0, 0.02) embeddings and time MLPs, zeros for
the adaLN modulations and the output (``DiCo.initialize_weights``).

Not taken over: the learned-sigma channels (flowdit regresses the velocity), and the
label dropout inside the embedder (flowdit's trainer draws it). Times are flowdit's
``t in [0, 1]`` times ``time_scale`` (1000, the DDPM step range the reference embeds).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .layers import LabelEmbedder, TimestepEmbedder, batch_conditions

__all__ = ["DiCoConfig", "DiCoBlock", "DiCo"]


@dataclass
class DiCoConfig:
    """Architecture of a DiCo: base width ``hidden_size`` (``D``), blocks per stage
    ``depth`` (encoder 1, encoder 2, middle, decoder 2, decoder 1), FFN ratio."""

    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    hidden_size: int = 128
    depth: tuple = field(default=(5, 4, 4, 4, 4))
    mlp_ratio: float = 2.0
    time_scale: float = 1000.0

    def validate(self) -> None:
        if self.input_size % 4:
            raise ConfigError(f"model.input_size {self.input_size}: DiCo halves the grid twice, so it must be a "
                              "multiple of 4")
        if len(tuple(self.depth)) != 5 or any(int(d) < 0 for d in self.depth):
            raise ConfigError(f"model.depth must be 5 non-negative block counts for DiCo, got {self.depth}")
        for k in ("input_size", "in_channels", "num_classes", "hidden_size"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"model.{k} must be positive, got {getattr(self, k)}")
        if self.hidden_size % 2:
            raise ConfigError(f"model.hidden_size must be even for DiCo's downsampling, got {self.hidden_size}")


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [B, C, H, W] * (1 + scale) + shift`` with ``shift, scale [B, C]``."""
    return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


def _layer_norm_2d(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of ``[B, C, H, W]``, no affine parameters, eps 1e-6."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=1e-6).permute(0, 3, 1, 2)


class DiCoBlock(nn.Module):
    """One DiCo block on ``[B, C, H, W]`` (module docstring), conditioned by ``c [B, C]``."""

    def __init__(self, channels: int, mlp_ratio: float = 2.0):
        super().__init__()
        C, Cf = channels, int(mlp_ratio * channels)
        self.conv1 = nn.Conv2d(C, C, 1)
        self.conv2 = nn.Conv2d(C, C, 3, padding=1, groups=C)
        self.conv3 = nn.Conv2d(C, C, 1)
        self.ca = nn.Conv2d(C, C, 1)  # compact channel attention: one 1x1 conv on the pooled map
        self.conv4 = nn.Conv2d(C, Cf, 1)
        self.conv5 = nn.Conv2d(Cf, C, 1)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        h = F.gelu(self.conv2(self.conv1(_modulate(_layer_norm_2d(x), shift1, scale1))))
        h = h * torch.sigmoid(self.ca(h.mean(dim=(2, 3), keepdim=True)))
        x = x + gate1[:, :, None, None] * self.conv3(h)
        h = self.conv5(F.gelu(self.conv4(_modulate(_layer_norm_2d(x), shift2, scale2))))
        return x + gate2[:, :, None, None] * h


class _Stage(nn.Module):
    def __init__(self, channels: int, n: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(DiCoBlock(channels, mlp_ratio) for _ in range(n))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, c)
        return x


class DiCo(nn.Module):
    """Class-conditional DiCo predicting ``v = eps - x0``: ``forward(x [B, C, H, W], t [B],
    y [B]) -> v [B, C, H, W]`` (``y`` None: the null class)."""

    def __init__(self, config: DiCoConfig):
        super().__init__()
        config.validate()
        self.config = config
        D, r, d = config.hidden_size, config.mlp_ratio, [int(v) for v in config.depth]
        self.in_channels = self.out_channels = config.in_channels
        self.num_classes = config.num_classes
        self.patch_size = 1
        self.x_embedder = nn.Conv2d(config.in_channels, D, 3, padding=1)
        self.t_embedders = nn.ModuleList(TimestepEmbedder(w, time_scale=config.time_scale) for w in (D, 2 * D, 4 * D))
        self.y_embedders = nn.ModuleList(LabelEmbedder(config.num_classes, w) for w in (D, 2 * D, 4 * D))
        self.encoder1 = _Stage(D, d[0], r)
        self.down1 = nn.Sequential(nn.Conv2d(D, D // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))
        self.encoder2 = _Stage(2 * D, d[1], r)
        self.down2 = nn.Sequential(nn.Conv2d(2 * D, D, 3, padding=1, bias=False), nn.PixelUnshuffle(2))
        self.middle = _Stage(4 * D, d[2], r)
        self.up2 = nn.Sequential(nn.Conv2d(4 * D, 8 * D, 3, padding=1, bias=False), nn.PixelShuffle(2))
        self.reduce2 = nn.Conv2d(4 * D, 2 * D, 1)
        self.decoder2 = _Stage(2 * D, d[3], r)
        self.up1 = nn.Sequential(nn.Conv2d(2 * D, 4 * D, 3, padding=1, bias=False), nn.PixelShuffle(2))
        self.reduce1 = nn.Conv2d(2 * D, 2 * D, 1)
        self.decoder1 = _Stage(2 * D, d[4], r)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(2 * D, 4 * D))
        self.final_conv = nn.Conv2d(2 * D, self.out_channels, 3, padding=1)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        """The label index of the unconditional (null) embedding."""
        return self.num_classes

    def stages(self) -> list[_Stage]:
        """The five stages in the order they run."""
        return [self.encoder1, self.encoder2, self.middle, self.decoder2, self.decoder1]

    def initialize_weights(self) -> None:
        """The reference's: Xavier-uniform linears and convolutions with zero biases, N(0, 0.02)
        label tables and time MLPs, zero adaLN modulations and output."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for emb in self.y_embedders:
            nn.init.normal_(emb.embedding_table.weight, std=0.02)
        for emb in self.t_embedders:
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for stage in self.stages():
            for block in stage.blocks:
                nn.init.zeros_(block.adaLN_modulation[1].weight)
                nn.init.zeros_(block.adaLN_modulation[1].bias)
        for m in (self.final_adaLN[1], self.final_conv):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None, ctx=None) -> torch.Tensor:
        """Velocity ``[B, C, H, W]`` at ``(x_t, t)`` for labels ``y``. A step context with
        hooks is refused: DiCo has no transformer blocks for them to act on."""
        if ctx is not None and len(ctx.hooks):
            raise ConfigError("DiCo runs no block hooks or caches (--accel, RF-Edit's value sharing); "
                              "use them with a transformer")
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        t, y = batch_conditions(x, t, y, self.null_class)
        c1, c2, c3 = (te(t) + ye(y) for te, ye in zip(self.t_embedders, self.y_embedders))
        h1 = self.encoder1(self.x_embedder(x), c1)
        h2 = self.encoder2(self.down1(h1), c2)
        h = self.middle(self.down2(h2), c3)
        h = self.decoder2(self.reduce2(torch.cat([self.up2(h), h2], dim=1)), c2)
        h = self.decoder1(self.reduce1(torch.cat([self.up1(h), h1], dim=1)), c2)
        shift, scale = self.final_adaLN(c2).chunk(2, dim=1)
        return self.final_conv(_modulate(_layer_norm_2d(h), shift, scale)).to(x.dtype)

    def param_count(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def config_dict(self) -> dict:
        out = asdict(self.config)
        out["depth"] = list(out["depth"])
        return out
