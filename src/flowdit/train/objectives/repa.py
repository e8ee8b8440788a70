"""REPA: representation alignment (Yu et al., "Representation Alignment for Generation:
Training Diffusion Transformers Is Easier Than You Think", ICLR 2025; code sihyun-yu/REPA).

The tokens ``h_k [B, N, D]`` after block ``k`` of the model being trained go through a
training-only projector ``h_phi`` (a 3-layer MLP with SiLU, ``models/sit.py`` ``build_mlp``)
and are pulled towards a frozen encoder's patch features ``y_* [B, N, F]`` of the *clean*
image, patch by patch, by negative cosine similarity (paper eq. 8, ``loss.py`` ``SILoss``):

    L = L_velocity + lambda * (1 / (B N)) sum_{b, n} -cos(h_phi(h_k)[b, n], y_*[b, n]),

``lambda = repa.weight`` (0.5, the code's ``--proj-coeff``). The denoising term is the
inner objective's (flow matching with the run's ``flow.loss``), on the same forward pass.

Scaled-down defaults, stated: the paper aligns block 8 of SiT-XL's 28 (``repa.block``
null: ``round(8 depth / 28)``, block 2 of DiT-mnist's 6) through a projector of width
2048 at hidden size 1152 (``repa.projector_dim`` null: ``2048 D / 1152`` rounded to a
multiple of 64, 256 for D = 128). The encoder's feature map is average-pooled to the
model's token grid where the two differ (REPA resizes the image to the encoder's input
instead; here the grids match: 7 x 7 for 28 x 28 images at patch 4).

Encoders (``repa.encoder``): ``guide``, the data set's shipped guide network (its last
convolution's map ``[B, 96, 7, 7]`` before pooling; a model aligned to it is no longer
independent of the guide-feature FID, which must then be read as such), or the path of
an encoder flowdit trained without labels (``flowdit encoder train``). The evaluator is
never an encoder: it scores the results. Features of every training image are computed
once, when the run starts (stored in float16), and looked up by data index each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.path import interpolate
from ...errors import ConfigError, FlowditError
from ...utils.precision import autocast
from ..sections import absolute_path, key
from .base import Extras, StepDraws, TrainingObjective, Velocity
from .features import check_blocks, inner_velocity_objective, scaled_block, tapped_velocity

__all__ = ["RepaSection", "REPA", "build_projector", "repa_alignment_loss", "load_representation_encoder"]


@dataclass
class RepaSection:
    """REPA's options (``flow.objective=repa``)."""

    encoder: str = key("guide", "frozen encoder of the clean image: guide (the shipped guide network) or the "
                                "directory of an encoder trained by flowdit encoder train; never the evaluator")
    weight: float = key(0.5, "lambda, the weight of the alignment term (REPA's --proj-coeff)")
    block: Optional[int] = key(None, "block whose output is aligned, counted from 1 (null: round(8 depth / 28), "
                                     "the paper's 8 of 28)")
    projector_dim: Optional[int] = key(None, "hidden width of the 3-layer projector (null: 2048 D / 1152 rounded to "
                                             "a multiple of 64, the paper's 2048 at SiT-XL's width)")

    def resolved(self) -> "RepaSection":
        """A copy with an encoder directory made absolute against the working directory."""
        import dataclasses

        if self.encoder.strip() in ("guide", "evaluator"):
            return self
        return dataclasses.replace(self, encoder=absolute_path(self.encoder))

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"repa.weight must be >= 0, got {self.weight}")
        if self.block is not None and self.block < 1:
            raise ConfigError(f"repa.block must be >= 1, got {self.block}")
        if self.projector_dim is not None and self.projector_dim < 1:
            raise ConfigError(f"repa.projector_dim must be positive, got {self.projector_dim}")
        if self.encoder.strip().lower() == "evaluator":
            raise ConfigError("repa.encoder: the evaluator scores the results and is never trained against; "
                              "use guide or a flowdit encoder train directory")
        from pathlib import Path

        if self.encoder.strip() != "guide" and not Path(self.encoder).expanduser().is_dir():
            raise ConfigError(f"repa.encoder: {self.encoder!r} is neither 'guide' nor an existing encoder directory")


def build_projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA's projector ``D -> P -> P -> F`` with SiLU between (``models/sit.py`` ``build_mlp``),
    Xavier-uniform weights and zero biases as SiT's ``initialize_weights`` gives it."""
    mlp = nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                        nn.SiLU(), nn.Linear(projector_dim, z_dim))
    for m in mlp:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return mlp


def repa_alignment_loss(z_tilde: Tensor, z: Tensor) -> Tensor:
    """``(1 / (B N)) sum_{b, n} -cos(z_tilde[b, n], z[b, n])`` for ``[B, N, F]`` tensors, in
    float32 (REPA's projection loss with one encoder)."""
    z_tilde = F.normalize(z_tilde.float(), dim=-1)
    z = F.normalize(z.float(), dim=-1)
    return -(z_tilde * z).sum(dim=-1).mean()


def load_representation_encoder(spec: str, dataset: str) -> tuple[Callable[[Tensor], Tensor], str]:
    """The frozen encoder ``repa.encoder`` names, as ``(fn, label)``: ``fn(x [B, C, H, W] in
    [-1, 1]) -> [B, F, h, w]`` patch features. ``guide``: the data set's shipped guide
    network's last convolution map; a directory: an encoder of ``flowdit encoder train``."""
    name = spec.strip()
    if name == "guide":
        from ...eval.evaluator import load_classifier

        try:
            net, _ = load_classifier(dataset, "guide")
        except FlowditError as e:
            raise ConfigError(f"repa.encoder=guide: {e}") from None
        net = net.eval().requires_grad_(False)
        return net.conv, f"guide ({dataset})"
    from pathlib import Path

    if not Path(name).exists():
        raise ConfigError(f"repa.encoder: {name!r} is neither 'guide' nor an existing encoder directory")
    try:
        from ...models.ssl_encoder import load_ssl_encoder
    except ImportError:
        raise ConfigError(f"repa.encoder {name}: this flowdit has no self-supervised encoders") from None
    enc = load_ssl_encoder(name).eval().requires_grad_(False)
    return enc.feature_map, f"ssl ({name})"


class REPA(TrainingObjective):
    """REPA (module docstring) around ``inner``, the objective ``flow.objective=auto`` would
    choose (flow matching), whose :meth:`velocity_loss` is the denoising term.

    Extras: ``repa_z [G, N, F]`` (float16), the cached encoder features of the batch's
    images. Trainable: the projector (checkpointed as ``heads``)."""

    name = "repa"
    sections = {"repa": RepaSection}

    def __init__(self, cfg, dataset, device, amp_dtype):
        super().__init__(cfg, dataset, device, amp_dtype)
        self.inner: TrainingObjective = inner_velocity_objective(self, cfg, dataset, device, amp_dtype)
        self.encoder, self.encoder_label = load_representation_encoder(cfg.repa.encoder, dataset.name)
        self.terms: dict[str, Tensor] = {}
        self.projector: Optional[nn.Module] = None
        self.z: Optional[Tensor] = None

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.flow.objective != cls.name:
            return
        if cfg.data.pairs:
            raise ConfigError("flow.objective=repa aligns to features of training images; data.pairs has none")
        if cfg.data.latents:
            raise ConfigError("flow.objective=repa: data.latents is not supported (the encoders read pixels)")

    def bind(self, model: nn.Module, ema: nn.Module) -> None:
        """Choose the block, build the projector and cache the encoder's features of every
        training image, pooled to the model's token grid."""
        depth = len(getattr(model, "blocks", ()))
        r = self.cfg.repa
        self.block = r.block if r.block is not None else scaled_block(8, 28, depth)
        check_blocks(model, {"repa.block": self.block})
        self.model = model
        D = model.config.hidden_size
        P = r.projector_dim if r.projector_dim is not None else max(64, 64 * round(2048 * D / 1152 / 64))
        self.z = self._cache_features(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed)
            self.projector = build_projector(D, P, self.z.shape[-1])

    def trainable(self) -> Optional[nn.Module]:
        return self.projector

    @torch.no_grad()
    def _cache_features(self, model: nn.Module, chunk: int = 500) -> Tensor:
        from tqdm.auto import tqdm

        C, H, W = self.dataset.shape
        p = model.patch_size
        grid = (H // p, W // p)
        out = None
        n = len(self.dataset)
        for lo in tqdm(range(0, n, chunk), desc=f"REPA features ({self.encoder_label})", disable=None, leave=False):
            x, _ = self.dataset.batch(torch.arange(lo, min(n, lo + chunk)))
            fmap = self.encoder(x.float())
            if tuple(fmap.shape[-2:]) != grid:
                fmap = F.adaptive_avg_pool2d(fmap, grid)
            z = fmap.flatten(2).transpose(1, 2)  # [b, N, F], tokens in the patch embedding's row-major order
            if out is None:
                out = torch.empty(n, z.shape[1], z.shape[2], dtype=torch.float16)
            out[lo:lo + len(z)] = z.half()
        return out

    def draw(self, draws: StepDraws, generator: torch.Generator) -> Extras:
        """The inner objective's draws, then ``repa_z [G, N, F]``: the cached features of
        the global batch's images (no random draw)."""
        extras = dict(self.inner.draw(draws, generator))
        extras["repa_z"] = self.z[draws.idx]
        return extras

    def loss(self, velocity: Velocity, x0: Tensor, eps: Tensor, t: Tensor, y: Tensor, extras: Extras) -> Tensor:
        """Denoising loss plus ``repa.weight`` times the alignment term, from one forward."""
        xt = interpolate(x0, eps, t)
        v, feats = tapped_velocity(velocity, self.model, xt, t, y, [self.block])
        h = feats[self.block]
        with autocast(self.device.type, self.amp_dtype):
            z_tilde = self.projector(h)
        flow = self.inner.velocity_loss(v, xt, x0, eps, t)
        align = repa_alignment_loss(z_tilde, extras["repa_z"])
        self.terms = {"flow": flow.detach(), "repa": align.detach()}
        return flow + self.cfg.repa.weight * align
