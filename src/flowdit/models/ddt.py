"""DDT, the Decoupled Diffusion Transformer (Wang, Tian, Huang, Wang, "DDT: Decoupled Diffusion
Transformer", arXiv 2504.05741, 2025), predicting flowdit's rectified-flow velocity.

A DDT splits the stack of ``L`` transformer blocks into a **condition encoder** of ``E``
blocks and a **velocity decoder** of ``L - E`` blocks (paper, sec. 3.2, fig. 3). Restated from
the authors' code, ``MCG-NJU/DDT``, ``src/models/denoiser/decoupled_improved_dit.py``,
``DDT.forward``, with ``tau`` the reference's time (``tau = 1`` data) and ``P`` the ``p x p``
patches ``[B, N, C p p]`` of ``x_tau``:

    c     = SiLU(T(tau) + Y(y))                      [B, D]     (T, Y: time / label embedders)
    s_0   = W_s P                                    [B, N, D]  (s_embedder, a linear map)
    s_i   = Block_i(s_{i-1} | c),  i = 1 .. E        adaLN from c, one vector per sample
    s     = SiLU(T(tau) + s_E)                       [B, N, D]  the encoder state ("self-condition")
    h_0   = W_x P                                    [B, N, D]  (x_embedder)
    h_j   = Block_{E+j}(h_{j-1} | s), j = 1 .. L - E adaLN from s, one vector per *token*
    v_ref = Final(h_{L-E} | s)                       [B, N, C p p] -> fold -> [B, C, H, W]

The decoder sees neither ``tau`` nor ``y`` except through ``s``, so a sampler may reuse ``s``
between nearby steps and run only the decoder ("encoder sharing", sec. 3.3; see
``flowdit.accel.ddt_share``). The reference's blocks are "improved DiT" blocks (its
``DDTBlock``): RMSNorm with a learned gain before attention and the feed-forward, attention
with bias-free ``qkv``, RMS QK-norm and 2D rotary positions on a grid scaled to ``[0, 16]``
(``precompute_freqs_cis_2d``), a SwiGLU feed-forward of width ``int(2/3 * 4 D)``, and six
adaLN vectors ``x * (1 + scale) + shift`` / gates from a linear map of the (already
activated) condition. The time embedder feeds ``tau`` in ``[0, 1]`` to sinusoids of
``max_period = 10`` (no 1000x scale).

Conventions (docs/conventions.md): the reference's path is ``x_tau = tau x0 + (1 - tau) eps``
(its ``LinearScheduler``: ``alpha = tau``, ``sigma = 1 - tau``) and it predicts
``x0 - eps``. flowdit's ``t = 1 - tau`` gives the same ``x_t = (1 - t) x0 + t eps``, and
flowdit's target ``eps - x0`` is the negated reference output, so at the boundary

    DDT(x_t, t, y) = -DDT_ref(x_t, 1 - t, y).

Parameter names, shapes and the construction order are the reference's (``blocks.{i}`` for
the encoder ``0 .. E-1`` then the decoder, ``x_embedder.proj``, ``s_embedder.proj``,
``t_embedder.mlp``, ``y_embedder.embedding_table``, ``final_layer``), so a state dict of the
reference ``DDT`` loads key by key and the same seed gives the same initial weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.hooks import StepContext, attention_hooks, block_hooks, output_hooks
from ..errors import ConfigError
from .attention import merge_heads, sdpa
from .layers import LabelEmbedder, RMSNorm, SwiGLU, TimestepEmbedder, batch_conditions, timestep_embedding

__all__ = ["DDT", "DDTAttention", "DDTBlock", "DDTConfig", "DDTFinalLayer", "apply_rope_2d", "ddt_rope",
           "swiglu_hidden"]


@dataclass
class DDTConfig:
    """Architecture of a DDT (the reference ``DDT.__init__``'s arguments, renamed).

    ``encoder_depth`` is the reference's ``num_encoder_blocks``; ``encoder_depth +
    decoder_depth`` its ``num_blocks``; ``num_heads`` its ``num_groups``. ``rope_theta`` and
    ``rope_scale`` are the fixed arguments of its ``precompute_freqs_cis_2d`` (positions
    ``linspace(0, rope_scale, side)``); ``time_max_period`` that of its
    ``TimestepEmbedder.timestep_embedding``.
    """

    input_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    encoder_depth: int = 22
    decoder_depth: int = 6
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    qk_norm: bool = True
    rope_theta: float = 10000.0
    rope_scale: float = 16.0
    time_max_period: float = 10.0

    def validate(self) -> None:
        """Refuse, naming the key, a shape the model cannot be built with."""
        for key in ("input_size", "in_channels", "patch_size", "hidden_size", "encoder_depth", "decoder_depth",
                    "num_heads", "num_classes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{key} must be a positive integer, got {value!r}")
        if self.input_size % self.patch_size:
            raise ConfigError(f"model.input_size {self.input_size} is not divisible by model.patch_size "
                              f"{self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size {self.hidden_size} is not divisible by model.num_heads "
                              f"{self.num_heads}")
        if self.head_dim % 4:
            raise ConfigError(f"model.hidden_size / model.num_heads = {self.head_dim} must be divisible by 4 "
                              "(2D rotary positions: a quarter of the head's channels per axis and frequency)")
        if not self.mlp_ratio > 0:
            raise ConfigError(f"model.mlp_ratio must be positive, got {self.mlp_ratio!r}")

    @property
    def depth(self) -> int:
        """All blocks, encoder then decoder (the reference's ``num_blocks``)."""
        return self.encoder_depth + self.decoder_depth

    @property
    def head_dim(self) -> int:
        """Channels per attention head, ``hidden_size / num_heads``."""
        return self.hidden_size // self.num_heads

    @property
    def num_tokens(self) -> int:
        """Tokens of a square ``input_size`` image, ``(input_size / patch_size)^2``."""
        return (self.input_size // self.patch_size) ** 2


def swiglu_hidden(hidden_size: int, mlp_ratio: float) -> int:
    """The SwiGLU width of a block: ``int(2 * int(mlp_ratio * D) / 3)`` (the reference's
    ``FeedForward(dim, int(dim * mlp_ratio))``, which keeps two thirds of the MLP width)."""
    return int(2 * int(hidden_size * mlp_ratio) / 3)


def ddt_rope(head_dim: int, height: int, width: int, theta: float = 10000.0, scale: float = 16.0,
             device=None) -> torch.Tensor:
    """2D rotary positions of an ``height x width`` patch grid (row-major tokens): the reference's
    ``precompute_freqs_cis_2d(dim, height, width, theta, scale)``.

    Token ``(r, c)`` sits at ``x = linspace(0, scale, width)[c]``, ``y = linspace(0, scale,
    height)[r]``; with ``f_i = theta^(-4 i / head_dim)``, ``i < head_dim / 4``, the channel pair
    ``2m, 2m + 1`` of a head (``m < head_dim / 2``) rotates by ``x f_{m/2}`` for even ``m`` and
    by ``y f_{(m-1)/2}`` for odd ``m`` (the reference interleaves the two axes per frequency).

    Returns:
        ``freqs_cis [height * width, head_dim / 2]`` complex64, ``exp(i angle)`` per pair.
    """
    if head_dim % 4:
        raise ValueError(f"head dimension {head_dim} must be divisible by 4 for 2D rotary positions")
    xs = torch.linspace(0, scale, width)
    ys = torch.linspace(0, scale, height)
    ys, xs = torch.meshgrid(ys, xs, indexing="ij")
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))
    angles = torch.stack([torch.outer(xs.reshape(-1), freqs), torch.outer(ys.reshape(-1), freqs)], dim=-1)
    angles = angles.reshape(height * width, head_dim // 2).float()
    return torch.polar(torch.ones_like(angles), angles).to(device)


def apply_rope_2d(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs ``(x_{2m}, x_{2m+1})`` of ``x [B, H, N, Dh]`` by ``freqs_cis [N, Dh/2]``
    (:func:`ddt_rope`) as one complex product in float32, the reference's ``apply_rotary_emb``;
    returned in ``x.dtype``."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis).flatten(-2).to(x.dtype)


def _tokens(v: torch.Tensor) -> torch.Tensor:
    """A modulation vector as ``[B, 1, D]`` (one per sample) or ``[B, N, D]`` (one per token)."""
    return v.unsqueeze(1) if v.dim() == 2 else v


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with ``x [B, N, D]`` and shift / scale ``[B, 1, D]`` or ``[B, N, D]``."""
    return torch.addcmul(shift, x, 1 + scale)


class DDTTimestepEmbedder(TimestepEmbedder):
    """flowdit's ``TimestepEmbedder`` fed the reference time ``tau`` in ``[0, 1]`` unscaled,
    with sinusoids of ``max_period`` (10 in the reference's ``TimestepEmbedder``)."""

    def __init__(self, hidden_size: int, max_period: float = 10.0):
        super().__init__(hidden_size, frequency_embedding_size=256, time_scale=1.0)
        self.max_period = max_period

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``tau [B] -> [B, D]``."""
        freq = timestep_embedding(t * self.time_scale, self.frequency_embedding_size, self.max_period)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class PatchProjection(nn.Module):
    """A linear map of flattened patches ``[B, N, C p p] -> [B, N, D]`` (the reference's
    ``Embed``: ``proj``, no norm)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(in_features, hidden_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``[B, N, C p p] -> [B, N, D]``."""
        return self.proj(patches)


class DDTAttention(nn.Module):
    """Self-attention of a DDT block (the reference's ``RAttention``): bias-free ``qkv``, per-head
    RMS QK-norm with learned gains, 2D rotary positions on queries and keys, SDPA, ``proj``.

    The context's ``attention`` hooks see ``q, k, v [B, H, N, Dh]`` after QK-norm and RoPE
    (as in ``flowdit.models.mmdit``).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, ctx: Optional[StepContext] = None) -> torch.Tensor:
        """``x [B, N, D]`` (modulated), ``rope [N, Dh/2]`` from :func:`ddt_rope` -> ``[B, N, D]``."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope_2d(q, rope), apply_rope_2d(k, rope)
        if ctx is not None and ctx.hooks.attention:
            q, k, v = attention_hooks(self, q, k, v, ctx)
        return self.proj(merge_heads(sdpa(q, k, v)))


class DDTBlock(nn.Module):
    """One block of the encoder or the decoder (the reference's ``DDTBlock``):

    ``(shift_a, scale_a, gate_a, shift_m, scale_m, gate_m) = W c`` (a linear map of the
    activated condition: ``c [B, D]`` in the encoder, ``s [B, N, D]`` per token in the
    decoder); ``x += gate_a * Attn(modulate(RMSNorm(x)))``; ``x += gate_m *
    SwiGLU(modulate(RMSNorm(x)))``. Unlike DiT's adaLN-Zero, the modulation keeps PyTorch's
    default initialisation (the reference zeroes only the output layer).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = DDTAttention(hidden_size, num_heads, qk_norm)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size, swiglu_hidden(hidden_size, mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.Linear(hidden_size, 6 * hidden_size))

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Six modulation vectors ``[B, 1, D]`` (from ``c [B, D]``) or ``[B, N, D]`` (from ``s``)."""
        return _tokens(self.adaLN_modulation[0](c)).chunk(6, dim=-1)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor,
                ctx: Optional[StepContext] = None) -> torch.Tensor:
        """``x [B, N, D] -> [B, N, D]`` under condition ``c`` (``[B, D]`` or ``[B, N, D]``), inside
        the context's ``block`` hooks when it has some."""
        if ctx is not None and ctx.hooks.block:
            return block_hooks(self, x, c, ctx, lambda xx: self._forward(xx, c, rope, ctx))
        return self._forward(x, c, rope, ctx)

    def _forward(self, x, c, rope, ctx):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c)
        x = x + gate_a * self.attn(_modulate(self.norm1(x), shift_a, scale_a), rope, ctx)
        return x + gate_m * self.mlp(_modulate(self.norm2(x), shift_m, scale_m))


class DDTFinalLayer(nn.Module):
    """LayerNorm (no gain), per-token adaLN shift / scale from ``s``, linear to ``C p p``
    (the reference's ``FinalLayer``, whose modulation has no SiLU of its own)."""

    def __init__(self, hidden_size: int, out_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_features)
        self.adaLN_modulation = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``x [B, N, D]``, ``s [B, N, D]`` -> ``[B, N, C p p]``."""
        shift, scale = _tokens(self.adaLN_modulation[0](s)).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class DDT(nn.Module):
    """Class-conditional DDT predicting flowdit's velocity ``v = eps - x0`` (module docstring).

    Same interface as ``DiT``: ``forward(x, t, y=None, ctx=None)``, ``num_classes``,
    ``null_class``, ``in_channels``, ``config_dict()``, ``param_count()``,
    ``attention_modules()``. For encoder sharing: ``encoder_state(x, t, y)`` returns ``s``,
    ``decode(x, s)`` runs the decoder on a given ``s``, and ``forward_with_state`` is the
    reference's ``forward(x, t, y, s=None) -> (v, s)``. A block policy in the step context
    must be an encoder-sharing one (``flowdit.accel.ddt_share``): the model hands it the
    computation of ``s`` through ``policy.encoder_state(model, compute, tokens, ctx)``.
    """

    capabilities = frozenset()
    """No DiT block-stack capability: the blocks are two stacks under different conditions
    (the per-block caches' ``block_branches``, ``token_layout`` and swappable
    ``attention_processors`` do not apply)."""

    def __init__(self, config: DDTConfig):
        super().__init__()
        config.validate()
        self.config = config
        D, p, C = config.hidden_size, config.patch_size, config.in_channels
        self.in_channels = self.out_channels = C
        self.patch_size = p
        self.num_classes = config.num_classes
        self.encoder_depth = config.encoder_depth
        # The reference's construction order (same seed, same weights): embedders, final
        # layer, then the blocks.
        self.x_embedder = PatchProjection(C * p * p, D)
        self.s_embedder = PatchProjection(C * p * p, D)
        self.t_embedder = DDTTimestepEmbedder(D, config.time_max_period)
        self.y_embedder = LabelEmbedder(config.num_classes, D)
        self.final_layer = DDTFinalLayer(D, C * p * p)
        self.blocks = nn.ModuleList(DDTBlock(D, config.num_heads, config.mlp_ratio, config.qk_norm)
                                    for _ in range(config.depth))
        self.grad_checkpointing = False
        self._rope_cache: dict = {}
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        """The label index of the unconditional (null) embedding."""
        return self.num_classes

    @property
    def encoder_blocks(self) -> nn.ModuleList:
        """``blocks[:encoder_depth]``: the condition encoder."""
        return self.blocks[: self.encoder_depth]

    @property
    def decoder_blocks(self) -> nn.ModuleList:
        """``blocks[encoder_depth:]``: the velocity decoder."""
        return self.blocks[self.encoder_depth:]

    def initialize_weights(self) -> None:
        """The reference's ``DDT.initialize_weights``: both patch projections Xavier-uniform with
        zero bias, label table and the two time-MLP weights N(0, 0.02), the output layer's
        modulation and linear map zero (the output is 0 at initialisation); every other layer
        (the blocks, their modulations included) keeps PyTorch's default initialisation."""
        for emb in (self.x_embedder, self.s_embedder):
            nn.init.xavier_uniform_(emb.proj.weight)
            nn.init.zeros_(emb.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in (self.final_layer.adaLN_modulation[0], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -- patches, positions, conditioning ------------------------------------------------

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, (H/p)(W/p), C p p]``, row-major patches, each flattened
        channel-major (``F.unfold``, as the reference)."""
        p = self.patch_size
        return F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)

    def unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``[B, N, C p p] -> [B, C, height, width]`` (``F.fold``, the inverse of :meth:`patchify`)."""
        p = self.patch_size
        return F.fold(tokens.transpose(1, 2), (height, width), kernel_size=p, stride=p)

    def rope(self, height: int, width: int, device) -> torch.Tensor:
        """The ``freqs_cis`` of :func:`ddt_rope` for an ``height x width`` patch grid, cached."""
        key = (height, width, str(device))
        hit = self._rope_cache.get(key)
        if hit is None:
            cfg = self.config
            hit = ddt_rope(cfg.head_dim, height, width, cfg.rope_theta, cfg.rope_scale, device=device)
            if len(self._rope_cache) >= 8:
                self._rope_cache.clear()
            self._rope_cache[key] = hit
        return hit

    def _check(self, x: torch.Tensor) -> tuple[int, int]:
        p = self.patch_size
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the patch size {p}")
        return x.shape[-2] // p, x.shape[-1] // p

    def embed(self, x: torch.Tensor, t: torch.Tensor,
              y: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The patches ``[B, N, C p p]``, the time embedding ``T(1 - t) [B, D]`` and the
        encoder's activated condition ``c = SiLU(T(1 - t) + Y(y)) [B, D]`` (``y = None``: the
        null class). ``t`` is flowdit's time (``t = 0`` data), ``1 - t`` the reference's."""
        self._check(x)
        t, y = batch_conditions(x, t, y, self.null_class)
        t_emb = self.t_embedder(1.0 - t)
        return self.patchify(x), t_emb, F.silu(t_emb + self.y_embedder(y))

    # -- encoder and decoder -------------------------------------------------------------

    def _run(self, blocks, h: torch.Tensor, c: torch.Tensor, rope, ctx) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in blocks:
                h = checkpoint(block, h, c, rope, ctx, use_reentrant=False)
            return h
        for block in blocks:
            h = block(h, c, rope, ctx)
        return h

    def run_encoder(self, patches: torch.Tensor, t_emb: torch.Tensor, c_act: torch.Tensor, rope,
                    ctx: Optional[StepContext] = None) -> torch.Tensor:
        """The condition encoder: ``s = SiLU(T + Blocks_{0..E-1}(W_s P | c)) [B, N, D]`` from the
        patches ``P [B, N, C p p]``, ``t_emb = T [B, D]`` and ``c_act = c [B, D]`` (:meth:`embed`)."""
        s = self._run(self.encoder_blocks, self.s_embedder(patches), c_act, rope, ctx)
        return F.silu(t_emb.unsqueeze(1) + s)

    def run_decoder(self, patches: torch.Tensor, s: torch.Tensor, rope,
                    ctx: Optional[StepContext] = None) -> torch.Tensor:
        """The velocity decoder: ``Final(Blocks_{E..L-1}(W_x P | s) | s) [B, N, C p p]`` (the
        reference's output, before the sign of flowdit's velocity)."""
        h = self._run(self.decoder_blocks, self.x_embedder(patches), s, rope, ctx)
        return self.final_layer(h, s)

    def _state_for_call(self, patches, t_emb, c_act, rope, ctx) -> torch.Tensor:
        """``s`` for one model call: computed, or supplied by the context's sharing policy."""
        policy = None if ctx is None else ctx.hooks.stack

        def compute() -> torch.Tensor:
            return self.run_encoder(patches, t_emb, c_act, rope, ctx)

        if policy is None:
            return compute()
        if getattr(policy, "name", None) == "none":
            # The benchmarks' uncached reference (accel.base.FullCompute): every call runs
            # both stacks, counted as a full call.
            st, n = policy.stats, patches.shape[1]
            st.calls += 1
            st.full_calls += 1
            st.block_evals += 1.0
            st.flops += patches.shape[0] * (self.encoder_depth * self.encoder_block_flops(n)
                                            + (self.config.depth - self.encoder_depth) * self.decoder_block_flops(n))
            return compute()
        share: Optional[Callable] = getattr(policy, "encoder_state", None)
        if not callable(share):
            raise ConfigError(f"--accel {policy!r} runs a DiT's block stack; a DDT's blocks are a condition "
                              "encoder and a velocity decoder, and its policy shares the encoder state: "
                              "ddt_share (docs/ddt.md)")
        return share(self, compute, patches, ctx)

    def _velocity(self, out: torch.Tensor, x: torch.Tensor, ctx: Optional[StepContext]) -> torch.Tensor:
        v = (-self.unpatchify(out, x.shape[-2], x.shape[-1])).to(x.dtype)
        return v if ctx is None or not ctx.hooks.after_output else output_hooks(self, v, ctx)

    def encoder_state(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                      ctx: Optional[StepContext] = None) -> torch.Tensor:
        """The encoder state ``s [B, N, D]`` of ``(x_t [B, C, H, W], t [B], y [B])`` (no policy)."""
        h, w = self._check(x)
        patches, t_emb, c_act = self.embed(x, t, y)
        return self.run_encoder(patches, t_emb, c_act, self.rope(h, w, x.device), ctx)

    def decode(self, x: torch.Tensor, s: torch.Tensor, ctx: Optional[StepContext] = None) -> torch.Tensor:
        """The velocity ``v [B, C, H, W]`` at ``x_t`` from a given encoder state ``s [B, N, D]``
        (computed at this or another time: the decoder sees time and class only through ``s``)."""
        h, w = self._check(x)
        return self._velocity(self.run_decoder(self.patchify(x), s, self.rope(h, w, x.device), ctx), x, ctx)

    def forward_with_state(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                           s: Optional[torch.Tensor] = None,
                           ctx: Optional[StepContext] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's ``DDT.forward(x, t, y, s=None) -> (out, s)`` in flowdit's conventions:
        ``(v [B, C, H, W], s [B, N, D])``; a given ``s`` skips the encoder (and the policy)."""
        h, w = self._check(x)
        rope = self.rope(h, w, x.device)
        if s is None:
            patches, t_emb, c_act = self.embed(x, t, y)
            s = self._state_for_call(patches, t_emb, c_act, rope, ctx)
        else:
            patches = self.patchify(x)
        return self._velocity(self.run_decoder(patches, s, rope, ctx), x, ctx), s

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                ctx: Optional[StepContext] = None) -> torch.Tensor:
        """Velocity ``v_hat [B, C, H, W]`` at ``(x_t, t)`` for labels ``y`` (None: unconditional)."""
        return self.forward_with_state(x, t, y, ctx=ctx)[0]

    # -- extension points, accounting ----------------------------------------------------

    def attention_modules(self) -> list[DDTAttention]:
        """The self-attention layers, encoder blocks then decoder blocks. Each passes its
        ``q, k, v [B, H, N, Dh]`` (after QK-norm and RoPE) through the context's ``attention`` hooks."""
        return [block.attn for block in self.blocks]

    def encoder_block_flops(self, n: int) -> float:
        """FLOPs (2 per MAC) of one encoder block for one batch row of ``n`` tokens: projections
        ``8 n D^2``, attention ``4 n^2 D``, SwiGLU ``6 n D H'``, modulation ``12 D^2`` (one per row)."""
        d = self.config.hidden_size
        hid = swiglu_hidden(d, self.config.mlp_ratio)
        return 8.0 * n * d * d + 4.0 * n * n * d + 6.0 * n * d * hid + 12.0 * d * d

    def decoder_block_flops(self, n: int) -> float:
        """As :meth:`encoder_block_flops`, with the modulation per token (``12 n D^2``)."""
        d = self.config.hidden_size
        return self.encoder_block_flops(n) + 12.0 * (n - 1) * d * d

    def block_flops(self, n_query: int, n_key: Optional[int] = None) -> float:
        """One block's FLOPs for one row, averaged over the stack (``flowdit.accel.base.block_flops``)."""
        E, L = self.config.encoder_depth, self.config.depth
        return (E * self.encoder_block_flops(n_query) + (L - E) * self.decoder_block_flops(n_query)) / L

    def param_count(self, trainable_only: bool = True) -> int:
        """Number of parameters (trainable only by default)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def config_dict(self) -> dict:
        """The ``DDTConfig`` as a dict (what a checkpoint's manifest records)."""
        return asdict(self.config)
