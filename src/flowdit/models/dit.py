"""Diffusion Transformer with adaLN-Zero conditioning (Peebles & Xie, "Scalable Diffusion
Models with Transformers", ICCV 2023), predicting the rectified-flow velocity.

``DiT(x_t, t, y) -> v_hat``: ``x_t [B, C, H, W]``, ``t [B]`` in ``[0, 1]`` (t = 0 data),
``y [B]`` class indices (``num_classes`` is the null class). Parameter names match the
public DiT / SiT checkpoints; ``flowdit.interop.checkpoints`` imports them (dropping their
learned-sigma channels, which are not part of this model: ``out_channels == in_channels``)
into a DiT with ``time_scale = 1`` and wraps it to convert their time and target
conventions (docs/conventions.md, docs/interop.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.hooks import StepContext, block_hooks, output_hooks
from .attention import Attention, AttentionProcessor
from .layers import (LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, batch_conditions, modulate, sincos_pos_embed_2d,
                     xavier_linears_and_patches)


@dataclass
class DiTConfig:
    """Architecture of a DiT. ``input_size`` is the image (or latent) side length.

    ``mup_base_width`` (``None``: the standard parametrisation) makes the model a muP DiT
    (:mod:`flowdit.models.mup`): its weights start from the muP initialisation and its
    readout multiplies its input by ``mup_output_mult * mup_base_width / hidden_size``
    (``MuReadout``). Both fields are left out of :meth:`DiT.config_dict` at their defaults,
    so the configs of existing runs stay as they were saved.
    """

    input_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    qk_norm: bool = False
    time_scale: float = 1000.0
    mup_base_width: Optional[int] = None
    mup_output_mult: float = 1.0

    def validate(self) -> None:
        from ..errors import ConfigError

        if self.input_size % self.patch_size:
            raise ConfigError(
                f"model.input_size {self.input_size} is not divisible by model.patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size {self.hidden_size} is not divisible by model.num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ConfigError(f"model.hidden_size {self.hidden_size} must be divisible by 4 (2D sin-cos positions)")
        for key in ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "num_classes"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.mup_base_width is not None and (isinstance(self.mup_base_width, bool) or not isinstance(
                self.mup_base_width, int) or self.mup_base_width <= 0):
            raise ConfigError(f"model.mup_base_width must be a positive integer or null, got {self.mup_base_width!r}")
        if not (isinstance(self.mup_output_mult, (int, float)) and math.isfinite(self.mup_output_mult)
                and self.mup_output_mult > 0):
            raise ConfigError(f"model.mup_output_mult must be a positive number, got {self.mup_output_mult!r}")
        if self.mup_base_width is None and self.mup_output_mult != 1.0:
            raise ConfigError("model.mup_output_mult applies to a muP model: set model.mup_base_width too")

    @property
    def readout_mult(self) -> Optional[float]:
        """The muP readout multiplier ``mup_output_mult / (hidden_size / mup_base_width)``
        (``MuReadout``), or ``None`` for the standard parametrisation."""
        if self.mup_base_width is None:
            return None
        return self.mup_output_mult * self.mup_base_width / self.hidden_size

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


# DiTConfig fields left out of config_dict() while at these values.
_MUP_DEFAULTS = {"mup_base_width": None, "mup_output_mult": 1.0}


class DiTBlock(nn.Module):
    """One transformer block with adaLN-Zero: six modulation vectors (shift, scale, gate
    for attention and MLP) regressed from the conditioning, the gates initialised to zero
    so that the block is the identity at initialisation (DiT, sec. 3.2)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def modulation(self, c_act: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Six ``[B, D]`` vectors from the already-activated conditioning ``SiLU(c)``.

        The SiLU of ``adaLN_modulation.0`` is shared by every block, so the model applies
        it once and calls the linear layer here directly.
        """
        return self.adaLN_modulation[1](c_act).chunk(6, dim=-1)

    def forward(self, x: torch.Tensor, c_act: torch.Tensor, ctx: Optional[StepContext] = None) -> torch.Tensor:
        """``x [B, N, D] -> [B, N, D]``, inside the context's ``block`` hooks when it has some."""
        if ctx is not None and ctx.hooks.block:
            return block_hooks(self, x, c_act, ctx, lambda xx: self._forward(xx, c_act, ctx))
        return self._forward(x, c_act, ctx)

    def _forward(self, x: torch.Tensor, c_act: torch.Tensor, ctx: Optional[StepContext]) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c_act)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), ctx)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x

    def gates(self, c_act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention and MLP gates ``(gate_msa, gate_mlp)``, each ``[B, D]``, from ``SiLU(c)``."""
        mod = self.modulation(c_act)
        return mod[2], mod[5]

    def forward_branches(
        self,
        x: torch.Tensor,
        c_act: torch.Tensor,
        ctx: Optional[StepContext] = None,
        attn_out: Optional[torch.Tensor] = None,
        mlp_out: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block with its two branch outputs exposed *before* their adaLN gates.

        ``x [B, N, D] -> (x_out, a, m)`` with ``x_out = x + g_a a`` followed by
        ``x_out += g_m m``, where ``a = Attn(modulate(LN(x)))`` and ``m = MLP(modulate(LN(.)))``
        are ``[B, N, D]``. A given ``attn_out`` / ``mlp_out`` replaces that branch (it is
        not computed), while the gates always come from the current ``c_act``: this is
        how the feature caches of FORA and TaylorSeer reuse a block (their public code
        caches ``a`` and ``m`` and multiplies them by the current call's gates).
        """
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c_act)
        if attn_out is None:
            attn_out = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), ctx)
        x = x + gate_msa.unsqueeze(1) * attn_out
        if mlp_out is None:
            mlp_out = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        x = x + gate_mlp.unsqueeze(1) * mlp_out
        return x, attn_out, mlp_out


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens to ``p * p * C`` pixels.

    ``input_mult`` (muP's readout, ``MuReadout``): the modulated tokens are multiplied by
    it before the linear map, ``out = W (input_mult h) + b``; ``None`` skips the product.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, input_mult: Optional[float] = None):
        super().__init__()
        self.input_mult = input_mult
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation[1](c_act).chunk(2, dim=-1)
        h = modulate(self.norm_final(x), shift, scale)
        if self.input_mult is not None:
            h = h * self.input_mult
        return self.linear(h)


class DiT(nn.Module):
    """Class-conditional DiT predicting the velocity ``v = eps - x0`` of the rectified path."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        config.validate()
        self.config = config
        D, p = config.hidden_size, config.patch_size
        self.in_channels = self.out_channels = config.in_channels
        self.patch_size = p
        self.num_classes = config.num_classes
        self.x_embedder = PatchEmbed(p, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D, time_scale=config.time_scale)
        self.y_embedder = LabelEmbedder(config.num_classes, D)
        grid = config.input_size // p
        # Fixed, not learned, but saved with the weights as in the public checkpoints.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, grid).unsqueeze(0), persistent=True)
        self.blocks = nn.ModuleList(
            DiTBlock(D, config.num_heads, config.mlp_ratio, config.qk_norm) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(D, p, self.out_channels, config.readout_mult)
        # Activation (gradient) checkpointing of the block stack while training; the
        # trainer sets it from ``train.grad_checkpoint``.
        self.grad_checkpointing = False
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        """The label index of the unconditional (null) embedding."""
        return self.num_classes

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears, N(0, 0.02) embeddings, and zeros for
        every adaLN modulation and the output layer (adaLN-Zero). A muP model
        (``config.mup_base_width`` set) takes :func:`flowdit.models.mup.mup_initialize` instead."""
        if self.config.mup_base_width is not None:
            from .mup import mup_initialize

            mup_initialize(self)
            return

        xavier_linears_and_patches(self, self.x_embedder.proj)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        for layer in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -- conditioning, blocks, output --------------------------------------------------

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``[B, N, D]`` and the activated conditioning ``SiLU(c) [B, D]``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        t, y = batch_conditions(x, t, y, self.null_class)
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y)
        return tokens, F.silu(c)

    def run_blocks(self, tokens: torch.Tensor, c_act: torch.Tensor, ctx: Optional[StepContext] = None) -> torch.Tensor:
        """Run the block stack. A block policy carried by ``ctx`` (docs/conventions.md,
        "Extension points") may take over this loop; without one every block runs in order."""
        policy = None if ctx is None else ctx.hooks.stack
        if policy is not None:
            return policy.run(self, tokens, c_act, ctx)
        if self.grad_checkpointing and torch.is_grad_enabled():
            # Keep only each block's input for backward and recompute its inside: about
            # one more forward per step for activation memory of O(depth) token tensors.
            for block in self.blocks:
                tokens = checkpoint(block, tokens, c_act, ctx, use_reentrant=False)
            return tokens
        for block in self.blocks:
            tokens = block(tokens, c_act, ctx)
        return tokens

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, p * p * C] -> [B, C, H, W]`` (inverse of the patch embedding's order)."""
        B, N, _ = tokens.shape
        p, C = self.patch_size, self.out_channels
        g = int(round(N**0.5))
        x = tokens.reshape(B, g, g, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None, ctx: Optional[StepContext] = None) -> torch.Tensor:
        """Velocity ``v_hat [B, C, H, W]`` at ``(x_t, t)`` for labels ``y`` (None: unconditional)."""
        tokens, c_act = self.embed(x, t, y)
        tokens = self.run_blocks(tokens, c_act, ctx)
        v = self.unpatchify(self.final_layer(tokens, c_act)).to(x.dtype)
        # Policies that update only some tokens (region-adaptive sampling) keep the last
        # velocity of the others, which only exists after the output layer.
        return v if ctx is None or not ctx.hooks.after_output else output_hooks(self, v, ctx)

    # -- extension points --------------------------------------------------------------

    def attention_modules(self) -> list[Attention]:
        """The self-attention layers, in block order."""
        return [block.attn for block in self.blocks]

    def set_attn_processor(self, processor: AttentionProcessor | dict[int, AttentionProcessor], blocks: Optional[Iterable[int]] = None) -> None:
        """Install an attention processor: one instance on the given blocks (all by default),
        or a dict ``{block_index: processor}`` giving chosen layers their own (for
        processors that keep per-layer state)."""
        if isinstance(processor, dict):
            for i, proc in processor.items():
                self.blocks[i].attn.processor = proc
            return
        for i in range(len(self.blocks)) if blocks is None else blocks:
            self.blocks[i].attn.processor = processor

    def param_count(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def config_dict(self) -> dict:
        """The ``DiTConfig`` as a plain dict, as saved with checkpoints. The muP fields
        (``mup_base_width``, ``mup_output_mult``) appear only when they differ from their
        defaults, so configs saved before they existed still compare equal."""
        return {k: v for k, v in asdict(self.config).items()
                if not (k in _MUP_DEFAULTS and v == _MUP_DEFAULTS[k])}
