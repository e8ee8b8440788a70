"""Multimodal Diffusion Transformer (MMDiT) of Stable Diffusion 3 (Esser et al., "Scaling
Rectified Flow Transformers for High-Resolution Image Synthesis", ICML 2024) and its
FLUX-style variant (Black Forest Labs, FLUX.1: double-stream blocks followed by
single-stream blocks, RoPE positions), predicting the rectified-flow velocity.

``MMDiT(x_t, t, y) -> v_hat``: ``x_t [B, C, H, W]`` (any ``H``, ``W`` divisible by the
patch size), ``t [B]`` in ``[0, 1]`` (t = 0 data), ``y`` a text condition
(:func:`text_condition`): ``{"tokens": [B, L, D_txt], "mask": [B, L] bool (optional),
"pooled": [B, P]}`` and, for a model with a guidance embedding, ``"guidance": [B]``.

Architecture (SD3 paper, sec. 4 and fig. 2):

* the image is patchified to ``N = (H/p)(W/p)`` tokens, the text sequence is projected to
  the hidden width ``D`` (``context_embedder``), and the conditioning vector is
  ``c = TimestepEmbed(time_scale * t) + MLP(pooled)`` (+ ``TimestepEmbed(time_scale * g)``
  with a FLUX-dev guidance embedding);
* a **double-stream block** (``JointBlock``) keeps separate weights per stream (adaLN-Zero
  modulation, QKV, output projection, MLP) and one *joint* attention over the
  concatenated sequence ``[txt; img]``: ``softmax(Q K^T / sqrt(Dh)) V`` with
  ``Q = [Q_txt; Q_img]`` etc.; padded text tokens are masked out as keys;
* a **single-stream block** (``SingleBlock``, FLUX) runs one set of weights over the
  joined sequence with attention and MLP in parallel and one gate:
  ``x + g * W_2 [Attn(h); GELU(W_1 h)]``, ``h = (1 + scale) LN(x) + shift``;
* positions: 2D sin-cos added to the image tokens (SD3; the text has none), or RoPE over
  three axes ``(index, row, column)`` applied to queries and keys, with every text token
  at ids ``(0, 0, 0)`` (FLUX);
* optional RMS QK-norm per head and stream (SD3 paper sec. 5.3.2, in SD3.5 and FLUX);
* output: adaLN (shift, scale) + LayerNorm + linear to ``p * p * C``, unpatchified.

flowdit's block interface runs over the *joined* sequence ``tokens [B, L + N, D]``: every
entry of ``model.blocks`` is a callable ``block(tokens, c_act, ctx)`` (``c_act = SiLU(c)``),
so the stack-level block policies (caches with ``cache=stack``, FBCache, TeaCache, ...)
run unchanged. Docs: docs/mmdit.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Optional, TypedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.hooks import StepContext, attention_hooks, output_hooks
from ..errors import ConfigError
from .attention import cpu_bf16_training, merge_heads
from .dit import FinalLayer
from .layers import Mlp, PatchEmbed, RMSNorm, TimestepEmbedder, modulate, xavier_linears_and_patches
from .rope_scaling import (ROPE_SCALINGS, TIME_AWARE_SCALINGS, extrapolation_factors, lumina_time,
                           proportional_attention_scale, scaled_rope_frequencies)

__all__ = [
    "MMDiT",
    "MMDiTConfig",
    "JointBlock",
    "SingleBlock",
    "JointAttention",
    "SingleAttention",
    "JointCall",
    "TextCondition",
    "text_condition",
    "rope_frequencies",
    "apply_rope",
    "image_position_ids",
    "sincos_pos_embed_grid",
    "joint_attention",
]

POS_EMBEDS = ("sincos", "rope")


class TextCondition(TypedDict, total=False):
    """The condition ``y`` of an MMDiT: what a text encoder returns for a batch of prompts.

    ``tokens [B, L, D_txt]`` the token states (T5's slot in SD3), ``mask [B, L]`` bool
    (True = a real token; optional, absent = every token counts), ``pooled [B, P]`` the
    pooled vector (CLIP's slot), and ``guidance [B]`` only for a model with a guidance
    embedding (FLUX-dev's distilled guidance scale).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor
    guidance: torch.Tensor


def text_condition(tokens: torch.Tensor, pooled: torch.Tensor, mask: Optional[torch.Tensor] = None,
                   guidance: Optional[torch.Tensor] = None) -> TextCondition:
    """Check shapes and build the condition dict ``y`` of :class:`MMDiT`.

    Args:
        tokens: ``[B, L, D_txt]`` text-encoder token states.
        pooled: ``[B, P]`` pooled text vectors.
        mask: ``[B, L]`` (bool, or 0/1), True where a token is real; ``None`` for none.
        guidance: ``[B]`` (or a float) embedded guidance scale, for ``guidance_embed`` models.
    Returns:
        ``{"tokens", "pooled"[, "mask"][, "guidance"]}``; classifier-free guidance
        concatenates two such dicts key by key, so a negative condition needs the same keys.
    """
    if tokens.dim() != 3:
        raise ConfigError(f"text tokens must be [B, L, D], got shape {tuple(tokens.shape)}")
    B, L = tokens.shape[:2]
    if pooled.dim() != 2 or pooled.shape[0] != B:
        raise ConfigError(f"pooled text must be [B, P] with B = {B}, got shape {tuple(pooled.shape)}")
    y: TextCondition = {"tokens": tokens, "pooled": pooled}
    if mask is not None:
        if tuple(mask.shape) != (B, L):
            raise ConfigError(f"text mask must be [B, L] = {[B, L]}, got shape {tuple(mask.shape)}")
        y["mask"] = mask.bool()
    if guidance is not None:
        g = torch.as_tensor(guidance, dtype=torch.float32, device=tokens.device)
        y["guidance"] = g.expand(B) if g.dim() == 0 else g
    return y


@dataclass
class MMDiTConfig:
    """Architecture of an MMDiT.

    ``input_size`` is the training image (or latent) side, used only as the default grid
    (and, for SD3-style sin-cos, as the base size of the positions); the model accepts any
    ``H x W`` divisible by ``patch_size``. ``depth`` double-stream blocks are followed by
    ``single_depth`` single-stream blocks (0: SD3, whose last double block then keeps no text
    output, ``context_pre_only``). ``pos_embed``: ``"sincos"`` (SD3) or ``"rope"`` (FLUX,
    ``axes_dims`` summing to the head dimension, ``rope_theta``). For sin-cos,
    ``pos_embed_max_size`` (SD3's ``pos_embed_max_size``) makes the embedding the centre
    crop of a ``max x max`` grid whose positions are scaled by ``input_size / patch /
    max`` (SD3's ``base_size``); ``None`` computes integer positions for the given grid.

    Sampling larger than trained (docs/mmdit.md, "Larger sizes than trained";
    ``flowdit.models.rope_scaling``): ``rope_scaling`` rescales the RoPE frequencies of the
    row and column axes for grids larger than ``rope_train_size / patch_size``
    (``rope_train_size``: the side the model was trained at, ``None`` = ``input_size``):
    ``"none"`` (default), ``"linear"``, ``"ntk"``, ``"yarn"``, ``"lumina"``,
    ``"lumina_watershed"`` (switching at Lumina time ``1 - t = rope_watershed``).
    ``proportional_attn`` scales the attention logits by ``sqrt(log N / log N_0)`` (image
    tokens ``N``, ``N_0`` at the train size; Lumina-Next). These fields are left out of
    ``MMDiT.config_dict()`` while at their defaults, so saved configs stay as they were.
    """

    input_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 4
    single_depth: int = 0
    num_heads: int = 6
    mlp_ratio: float = 4.0
    text_dim: int = 384
    pooled_dim: int = 384
    qk_norm: bool = False
    pos_embed: str = "sincos"
    pos_embed_max_size: Optional[int] = None
    axes_dims: tuple[int, ...] = field(default_factory=lambda: (4, 14, 14))
    rope_theta: float = 10000.0
    guidance_embed: bool = False
    time_scale: float = 1000.0
    rope_scaling: str = "none"
    rope_train_size: Optional[int] = None
    rope_watershed: float = 0.3
    proportional_attn: bool = False

    def validate(self) -> None:
        """Raise ``ConfigError`` for an inconsistent configuration."""
        for key in ("input_size", "in_channels", "patch_size", "hidden_size", "num_heads", "text_dim", "pooled_dim"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.depth < 0 or self.single_depth < 0 or self.depth + self.single_depth == 0:
            raise ConfigError(f"model.depth {self.depth} + single_depth {self.single_depth} must be at least 1")
        if self.input_size % self.patch_size:
            raise ConfigError(f"model.input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.pos_embed not in POS_EMBEDS:
            raise ConfigError(f"model.pos_embed must be one of {', '.join(POS_EMBEDS)}, got {self.pos_embed!r}")
        if self.pos_embed == "sincos" and self.hidden_size % 4:
            raise ConfigError(f"model.hidden_size {self.hidden_size} must be divisible by 4 (2D sin-cos positions)")
        if self.pos_embed == "rope":
            dims = tuple(self.axes_dims)
            if len(dims) != 3 or any(d <= 0 or d % 2 for d in dims) or sum(dims) != self.head_dim:
                raise ConfigError(f"model.axes_dims {dims} must be three even sizes summing to the head dimension "
                                  f"{self.head_dim}")
        if self.pos_embed_max_size is not None and self.pos_embed_max_size < self.input_size // self.patch_size:
            raise ConfigError(f"model.pos_embed_max_size {self.pos_embed_max_size} is smaller than the grid "
                              f"{self.input_size // self.patch_size}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ConfigError(f"model.rope_scaling must be one of {', '.join(ROPE_SCALINGS)}, "
                              f"got {self.rope_scaling!r}")
        if self.rope_scaling != "none" and self.pos_embed != "rope":
            raise ConfigError(f"model.rope_scaling {self.rope_scaling!r} needs pos_embed='rope', "
                              f"got {self.pos_embed!r}")
        if self.rope_train_size is not None:
            if isinstance(self.rope_train_size, bool) or not isinstance(self.rope_train_size, int) \
                    or self.rope_train_size <= 0 or self.rope_train_size % self.patch_size:
                raise ConfigError(f"model.rope_train_size must be a positive multiple of patch_size "
                                  f"{self.patch_size}, got {self.rope_train_size!r}")
        if not 0.0 <= self.rope_watershed <= 1.0:
            raise ConfigError(f"model.rope_watershed must lie in [0, 1], got {self.rope_watershed!r}")
        if self.proportional_attn and self.train_grid[0] * self.train_grid[1] < 2:
            raise ConfigError("model.proportional_attn needs a train grid of at least 2 tokens")

    @property
    def head_dim(self) -> int:
        """Channels per attention head, ``hidden_size / num_heads``."""
        return self.hidden_size // self.num_heads

    @property
    def train_grid(self) -> tuple[int, int]:
        """The patch grid ``(rows, columns)`` of the train size (``rope_train_size`` or ``input_size``)."""
        side = (self.input_size if self.rope_train_size is None else self.rope_train_size) // self.patch_size
        return side, side


_EXTRAPOLATION_DEFAULTS = {"rope_scaling": "none", "rope_train_size": None, "rope_watershed": 0.3,
                           "proportional_attn": False}


# -- positions -------------------------------------------------------------------------


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``[n] -> [n, dim]``: ``[sin(pos w_i), cos(pos w_i)]``, ``w_i = 10000^(-i / (dim/2))`` (MAE, SD3)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_pos_embed_grid(embed_dim: int, height: int, width: int, max_size: Optional[int] = None,
                          base_size: Optional[int] = None) -> torch.Tensor:
    """2D sin-cos positions of an ``height x width`` patch grid, ``[height * width, embed_dim]`` float32.

    Tokens are row-major; the first half of the channels encodes the column, the second
    the row (MAE / DiT / SD3 layout, ``flowdit.models.layers.sincos_pos_embed_2d`` for a
    square grid). Without ``max_size`` the positions are ``0 .. height-1`` and
    ``0 .. width-1``. With ``max_size`` (SD3's ``pos_embed_max_size``) this is the centre
    crop SD3 takes of a ``max_size x max_size`` table whose positions are
    ``i * base_size / max_size`` (``PatchEmbed.cropped_pos_embed``): rows ``top .. top +
    height`` with ``top = (max_size - height) // 2``, likewise the columns; it is computed
    for the crop only, so no table is stored.
    """
    if max_size is None:
        rows = torch.arange(height, dtype=torch.float32)
        cols = torch.arange(width, dtype=torch.float32)
    else:
        if height > max_size or width > max_size:
            raise ConfigError(f"a {height} x {width} patch grid exceeds pos_embed_max_size {max_size}")
        base = max_size if base_size is None else base_size
        scale = torch.tensor(max_size / base, dtype=torch.float32)
        rows = torch.arange(max_size, dtype=torch.float32)[(max_size - height) // 2:][:height] / scale
        cols = torch.arange(max_size, dtype=torch.float32)[(max_size - width) // 2:][:width] / scale
    gh, gw = torch.meshgrid(rows, cols, indexing="ij")
    emb = torch.cat([_sincos_1d(embed_dim // 2, gw.reshape(-1)), _sincos_1d(embed_dim // 2, gh.reshape(-1))], dim=1)
    return emb.float()


def image_position_ids(height: int, width: int, device=None) -> torch.Tensor:
    """FLUX's image position ids ``[height * width, 3]``: ``(0, row, column)`` per token, row-major."""
    rows = torch.arange(height, device=device, dtype=torch.float32)[:, None].expand(height, width)
    cols = torch.arange(width, device=device, dtype=torch.float32)[None, :].expand(height, width)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(height * width, 3)


def rope_frequencies(ids: torch.Tensor, axes_dims: Iterable[int], theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of multi-axis position ids (RoFormer; FLUX's ``EmbedND``).

    Axis ``a`` of ``ids [N, A]`` rotates ``axes_dims[a]`` channels in adjacent pairs
    ``(x_{2i}, x_{2i+1})`` by the angle ``ids[:, a] * theta^(-2i / axes_dims[a])``; the axes
    are concatenated along the head dimension.

    Returns:
        ``cos, sin``, each ``[N, sum(axes_dims)]`` float32, every angle repeated for the two
        channels of its pair (diffusers' ``repeat_interleave_real`` layout).
    """
    cos, sin = [], []
    for a, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles = ids[:, a].double()[:, None] * freqs[None]
        cos.append(angles.cos().repeat_interleave(2, dim=1))
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, dim=1).float(), torch.cat(sin, dim=1).float()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate ``x [B, H, N, Dh]`` by ``rope = (cos, sin)`` (``[N, Dh]`` each, :func:`rope_frequencies`):
    ``x cos + rot(x) sin`` with ``rot(x)_{2i} = -x_{2i+1}``, ``rot(x)_{2i+1} = x_{2i}``; in float32."""
    cos, sin = rope
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)


# -- attention -------------------------------------------------------------------------


@dataclass
class JointCall:
    """What every block of one model call shares: the number of text tokens ``n_txt``
    (the joined sequence is ``[txt; img]``), the attention key mask ``[B, 1, 1, L + N]``
    bool (``None``: every key counts), the RoPE ``(cos, sin)`` of the joined sequence
    (``[L + N, Dh]`` each, or ``[B, 1, L + N, Dh]`` for a time-aware scaling with
    different times in the batch; ``None`` for sin-cos positions) and the softmax scale
    (``None``: ``1 / sqrt(Dh)``; set by ``proportional_attn``)."""

    n_txt: int
    key_mask: Optional[torch.Tensor] = None
    rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    attn_scale: Optional[float] = None


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(Dh) + mask) v`` over ``[B, H, N, Dh]`` heads (PyTorch SDPA);
    ``key_mask [B, 1, 1, N]`` bool excludes the keys where it is False; ``scale`` replaces
    ``1 / sqrt(Dh)`` (proportional attention). A differentiated bf16 call on a CPU runs in
    fp32 (``flowdit.models.attention.cpu_bf16_training``)."""
    kw = {} if scale is None else {"scale": scale}
    if not cpu_bf16_training(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, **kw)
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=key_mask, **kw).to(q.dtype)


def _heads(x: torch.Tensor, qkv: nn.Linear, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [B, N, D]`` through a fused ``qkv`` projection: ``q, k, v [B, H, N, Dh]``."""
    B, N, _ = x.shape
    return qkv(x).view(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


class SingleAttention(nn.Module):
    """The attention of a single-stream block: one fused ``qkv`` projection of the joined
    sequence, optional per-head RMS QK-norm; the output projection is part of the block's
    ``linear2`` (FLUX)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, call: JointCall, ctx: Optional[StepContext] = None) -> torch.Tensor:
        """``x [B, L + N, D] -> [B, L + N, D]`` (heads merged, not projected)."""
        q, k, v = _heads(x, self.qkv, self.num_heads)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if call.rope is not None:
            q, k = apply_rope(q, call.rope), apply_rope(k, call.rope)
        if ctx is not None and ctx.hooks.attention:
            q, k, v = attention_hooks(self, q, k, v, ctx)
        return merge_heads(joint_attention(q, k, v, call.key_mask, call.attn_scale))


class JointAttention(nn.Module):
    """SD3's joint attention: per-stream ``qkv`` / ``qkv_txt`` projections and QK-norms,
    one attention over ``[txt; img]``, per-stream output projections ``proj_txt`` / ``proj``.

    The attention hooks see the joined ``q, k, v [B, H, L + N, Dh]`` (after QK-norm and
    RoPE). ``context_pre_only`` (SD3's last block) has no text output projection.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, context_pre_only: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qkv_txt = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_txt = None if context_pre_only else nn.Linear(dim, dim)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
            self.q_norm_txt, self.k_norm_txt = RMSNorm(self.head_dim), RMSNorm(self.head_dim)

    def forward(self, txt: torch.Tensor, img: torch.Tensor, call: JointCall,
                ctx: Optional[StepContext] = None) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """``txt [B, L, D]``, ``img [B, N, D]`` (modulated) -> ``(txt_out or None, img_out)``."""
        qi, ki, vi = _heads(img, self.qkv, self.num_heads)
        qt, kt, vt = _heads(txt, self.qkv_txt, self.num_heads)
        if self.qk_norm:
            qi, ki = self.q_norm(qi), self.k_norm(ki)
            qt, kt = self.q_norm_txt(qt), self.k_norm_txt(kt)
        q, k, v = torch.cat([qt, qi], dim=2), torch.cat([kt, ki], dim=2), torch.cat([vt, vi], dim=2)
        if call.rope is not None:
            q, k = apply_rope(q, call.rope), apply_rope(k, call.rope)
        if ctx is not None and ctx.hooks.attention:
            q, k, v = attention_hooks(self, q, k, v, ctx)
        o = merge_heads(joint_attention(q, k, v, call.key_mask, call.attn_scale))
        n = txt.shape[1]
        txt_out = None if self.proj_txt is None else self.proj_txt(o[:, :n])
        return txt_out, self.proj(o[:, n:])


# -- blocks ----------------------------------------------------------------------------


class _CallHolder:
    """The current model call's ``JointCall``, shared by the blocks of one model (set by
    ``MMDiT.forward`` around the block stack)."""

    def __init__(self):
        self.call: Optional[JointCall] = None


class _StackBlock(nn.Module):
    """A block callable as flowdit's ``block(tokens [B, L + N, D], c_act [B, D], ctx)``."""

    def __init__(self, holder: _CallHolder):
        super().__init__()
        self._holder = holder

    def forward(self, tokens: torch.Tensor, c_act: torch.Tensor, ctx: Optional[StepContext] = None) -> torch.Tensor:
        call = self._holder.call
        if call is None:
            raise RuntimeError("MMDiT blocks run inside MMDiT.forward (which sets the text length, mask and positions)")
        return self.run(tokens, c_act, call, ctx)

    def run(self, tokens: torch.Tensor, c_act: torch.Tensor, call: JointCall,
            ctx: Optional[StepContext] = None) -> torch.Tensor:
        raise NotImplementedError


class JointBlock(_StackBlock):
    """SD3's double-stream MMDiT block with adaLN-Zero per stream (SD3 paper, fig. 2b).

    For each stream ``s`` (image, text), from ``SiLU(c)``: ``(shift_a, scale_a, gate_a,
    shift_m, scale_m, gate_m)^s``; ``h^s = modulate(LN(x^s))``; the joint attention gives
    ``a^s``; ``x^s += gate_a^s a^s``; ``x^s += gate_m^s MLP^s(modulate(LN(x^s)))``. With
    ``context_pre_only`` the text stream only supplies keys and values (two modulation
    vectors, no output: SD3's last block), and its tokens pass through unchanged.
    """

    def __init__(self, holder: _CallHolder, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 qk_norm: bool = False, context_pre_only: bool = False):
        super().__init__(holder)
        D, H = hidden_size, int(hidden_size * mlp_ratio)
        self.context_pre_only = context_pre_only
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.norm1_txt = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.adaLN_modulation_txt = nn.Sequential(nn.SiLU(), nn.Linear(D, (2 if context_pre_only else 6) * D))
        self.attn = JointAttention(D, num_heads, qk_norm, context_pre_only)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(D, H)
        if not context_pre_only:
            self.norm2_txt = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
            self.mlp_txt = Mlp(D, H)

    def modulated_image(self, img: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        """The attention input of the image stream, ``modulate(LN(img), shift_a, scale_a)``, ``[B, N, D]``."""
        shift, scale = self.adaLN_modulation[1](c_act).chunk(6, dim=-1)[:2]
        return modulate(self.norm1(img), shift, scale)

    def run(self, tokens, c_act, call, ctx=None):
        n = call.n_txt
        txt, img = tokens[:, :n], tokens[:, n:]
        sa, ca, ga, sm, cm, gm = self.adaLN_modulation[1](c_act).chunk(6, dim=-1)
        mod_txt = self.adaLN_modulation_txt[1](c_act).chunk(2 if self.context_pre_only else 6, dim=-1)
        txt_a, img_a = self.attn(modulate(self.norm1_txt(txt), mod_txt[0], mod_txt[1]),
                                 modulate(self.norm1(img), sa, ca), call, ctx)
        img = img + ga.unsqueeze(1) * img_a
        img = img + gm.unsqueeze(1) * self.mlp(modulate(self.norm2(img), sm, cm))
        if not self.context_pre_only:
            _, _, tga, tsm, tcm, tgm = mod_txt
            txt = txt + tga.unsqueeze(1) * txt_a
            txt = txt + tgm.unsqueeze(1) * self.mlp_txt(modulate(self.norm2_txt(txt), tsm, tcm))
        return torch.cat([txt, img], dim=1)


class SingleBlock(_StackBlock):
    """FLUX's single-stream block over the joined sequence, attention and MLP in parallel
    (Dehghani et al. 2023's parallel layers, as in FLUX.1):

    ``(shift, scale, gate)`` from ``SiLU(c)``; ``h = modulate(LN(x), shift, scale)``;
    ``x + gate * linear2([Attn(h); GELU_tanh(mlp_in(h))])``, ``linear2: D + H -> D``.
    """

    def __init__(self, holder: _CallHolder, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 qk_norm: bool = False):
        super().__init__(holder)
        D, H = hidden_size, int(hidden_size * mlp_ratio)
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 3 * D))
        self.attn = SingleAttention(D, num_heads, qk_norm)
        self.mlp_in = nn.Linear(D, H)
        self.act = nn.GELU(approximate="tanh")
        self.linear2 = nn.Linear(D + H, D)

    def modulated(self, tokens: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        """``modulate(LN(tokens), shift, scale)``, ``[B, L + N, D]``."""
        shift, scale, _ = self.adaLN_modulation[1](c_act).chunk(3, dim=-1)
        return modulate(self.norm(tokens), shift, scale)

    def run(self, tokens, c_act, call, ctx=None):
        shift, scale, gate = self.adaLN_modulation[1](c_act).chunk(3, dim=-1)
        h = modulate(self.norm(tokens), shift, scale)
        out = self.linear2(torch.cat([self.attn(h, call, ctx), self.act(self.mlp_in(h))], dim=-1))
        return tokens + gate.unsqueeze(1) * out


# -- the model -------------------------------------------------------------------------


class MMDiT(nn.Module):
    """Text-conditioned MMDiT (SD3) / double + single-stream (FLUX-style) transformer
    predicting the velocity ``v = eps - x0`` (module docstring; docs/mmdit.md)."""

    capabilities = frozenset()
    """Block policies may rely only on ``model.blocks`` (over the joined ``[txt; img]``
    sequence): per-stream gates do not fit the ``block.gates(c_act) -> [B, D]`` contract of
    the per-block caches (``block_branches``), the sequence is not a square image grid
    (``token_layout``), and the joint attention has no single-stream processor
    (``attention_processors``). See docs/mmdit.md."""

    null_class = None
    """Text models guide with a negative condition (the empty prompt's), not a null label."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        config.validate()
        self.config = config
        D, p = config.hidden_size, config.patch_size
        self.in_channels = self.out_channels = config.in_channels
        self.patch_size = p
        self.x_embedder = PatchEmbed(p, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D, time_scale=config.time_scale)
        self.guidance_embedder = TimestepEmbedder(D, time_scale=config.time_scale) if config.guidance_embed else None
        self.pooled_embedder = nn.Sequential(nn.Linear(config.pooled_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.context_embedder = nn.Linear(config.text_dim, D)
        self._holder = _CallHolder()
        blocks: list[_StackBlock] = [
            JointBlock(self._holder, D, config.num_heads, config.mlp_ratio, config.qk_norm,
                       context_pre_only=config.single_depth == 0 and i == config.depth - 1)
            for i in range(config.depth)
        ]
        blocks += [SingleBlock(self._holder, D, config.num_heads, config.mlp_ratio, config.qk_norm)
                   for _ in range(config.single_depth)]
        self.blocks = nn.ModuleList(blocks)
        self.final_layer = FinalLayer(D, p, self.out_channels)
        self.grad_checkpointing = False
        self._pos_cache: dict = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears and patch embedding, N(0, 0.02) time
        embedders, and zeros for every adaLN modulation and the output layer (adaLN-Zero:
        every block is the identity and the output is 0 at initialisation)."""

        xavier_linears_and_patches(self, self.x_embedder.proj)
        for emb in (self.t_embedder, self.guidance_embedder):
            if emb is not None:
                nn.init.normal_(emb.mlp[0].weight, std=0.02)
                nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for block in self.blocks:
            for name in ("adaLN_modulation", "adaLN_modulation_txt"):
                mod = getattr(block, name, None)
                if mod is not None:
                    nn.init.zeros_(mod[1].weight)
                    nn.init.zeros_(mod[1].bias)
        for layer in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -- conditioning, positions, blocks, output ---------------------------------------

    def _check(self, x: torch.Tensor, y) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(f"expected x of shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ConfigError(f"image size {tuple(x.shape[-2:])} is not divisible by the patch size {p}")
        if not isinstance(y, dict) or not {"tokens", "pooled"} <= set(y):
            raise ConfigError("y must be a text condition: text_condition(tokens, pooled, mask=None)")
        tok, pooled = y["tokens"], y["pooled"]
        B = x.shape[0]
        if tok.dim() != 3 or tok.shape[0] != B or tok.shape[2] != self.config.text_dim:
            raise ConfigError(f"y['tokens'] must be [B={B}, L, {self.config.text_dim}], got {tuple(tok.shape)}")
        if tuple(pooled.shape) != (B, self.config.pooled_dim):
            raise ConfigError(f"y['pooled'] must be [{B}, {self.config.pooled_dim}], got {tuple(pooled.shape)}")
        mask = y.get("mask")
        if mask is not None and tuple(mask.shape) != tuple(tok.shape[:2]):
            raise ConfigError(f"y['mask'] must be [B, L] = {list(tok.shape[:2])}, got {tuple(mask.shape)}")
        if self.guidance_embedder is not None and y.get("guidance") is None:
            raise ConfigError("this model embeds a guidance scale: y needs 'guidance' [B] (text_condition(..., guidance=g))")

    def _positions(self, h: int, w: int, n_txt: int, device: torch.device, t: Optional[float] = None):
        """Sin-cos ``[1, N, D]`` or RoPE ``(cos, sin)`` of ``[txt; img]``, cached per shape, device
        and scaling (for a time-aware scaling, ``t`` is the call's time)."""
        cfg = self.config
        method = cfg.rope_scaling if cfg.pos_embed == "rope" else "none"
        factors = extrapolation_factors(method, (h, w), cfg.train_grid)
        if method != "none" and all(f == 1.0 for f in factors):
            method = "none"  # not larger than trained: the trained frequencies
        if method == "lumina":
            return self._rope(h, w, n_txt, device, method, factors, t)  # every time differs: not cached
        phase = lumina_time(t) < cfg.rope_watershed if method == "lumina_watershed" else None
        key = (h, w, n_txt if cfg.pos_embed == "rope" else 0, str(device))
        if method != "none":
            key += (method, factors, cfg.train_grid, phase)
        hit = self._pos_cache.get(key)
        if hit is not None:
            return hit
        if cfg.pos_embed == "sincos":
            out = sincos_pos_embed_grid(cfg.hidden_size, h, w, cfg.pos_embed_max_size,
                                        cfg.input_size // cfg.patch_size).unsqueeze(0).to(device)
        elif method == "none":
            ids = torch.cat([torch.zeros(n_txt, 3), image_position_ids(h, w)], dim=0)
            out = tuple(f.to(device) for f in rope_frequencies(ids, cfg.axes_dims, cfg.rope_theta))
        else:
            out = self._rope(h, w, n_txt, device, method, factors, t)
        if len(self._pos_cache) >= 16:
            self._pos_cache.clear()
        self._pos_cache[key] = out
        return out

    def _rope(self, h: int, w: int, n_txt: int, device: torch.device, method: str, factors: tuple[float, ...],
              t: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rescaled RoPE ``(cos, sin)`` ``[L + N, Dh]`` of ``[txt; img]`` (``rope_scaling``)."""
        cfg = self.config
        ids = torch.cat([torch.zeros(n_txt, 3), image_position_ids(h, w)], dim=0)
        rope = scaled_rope_frequencies(ids, cfg.axes_dims, cfg.rope_theta, method, factors, cfg.train_grid, t,
                                       cfg.rope_watershed)
        return tuple(f.to(device) for f in rope)

    def _call_positions(self, h: int, w: int, n_txt: int, device: torch.device, t: torch.Tensor):
        """``_positions`` for a call at times ``t [B]``: a time-aware RoPE scaling with several
        times in the batch gives ``(cos, sin)`` ``[B, 1, L + N, Dh]``, one row per sample."""
        cfg = self.config
        if cfg.pos_embed != "rope" or cfg.rope_scaling not in TIME_AWARE_SCALINGS:
            return self._positions(h, w, n_txt, device)
        times = t.detach().float().cpu().tolist()
        distinct = sorted(set(times))
        if len(distinct) == 1:
            return self._positions(h, w, n_txt, device, distinct[0])
        per = {s: self._positions(h, w, n_txt, device, s) for s in distinct}
        return tuple(torch.stack([per[s][i] for s in times])[:, None] for i in range(2))

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: dict) -> tuple[torch.Tensor, torch.Tensor, JointCall]:
        """The joined tokens ``[txt; img]`` ``[B, L + N, D]``, the activated conditioning
        ``SiLU(c) [B, D]`` with ``c = T(time_scale t) + MLP(pooled)`` (SD3 eq. in sec. 4.1,
        fig. 2a) (+ ``T_g(time_scale g)``), and the call's shared ``JointCall``."""
        self._check(x, y)
        B, dtype = x.shape[0], x.dtype
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(B)
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        img = self.x_embedder(x)
        txt = self.context_embedder(y["tokens"].to(dtype))
        c = self.t_embedder(t) + self.pooled_embedder(y["pooled"].to(dtype))
        if self.guidance_embedder is not None:
            g = torch.as_tensor(y["guidance"], device=x.device, dtype=torch.float32)
            c = c + self.guidance_embedder(g.expand(B) if g.ndim == 0 else g)
        n_txt = txt.shape[1]
        pos = self._call_positions(h, w, n_txt, x.device, t)
        rope = None
        if self.config.pos_embed == "sincos":
            img = img + pos.to(img.dtype)
        else:
            rope = pos
        mask = y.get("mask")
        key_mask = None
        if mask is not None:
            key_mask = torch.cat([mask.to(device=x.device, dtype=torch.bool),
                                  torch.ones(B, h * w, device=x.device, dtype=torch.bool)], dim=1)[:, None, None]
        attn_scale = None
        if self.config.proportional_attn:
            th, tw = self.config.train_grid
            attn_scale = proportional_attention_scale(h * w, th * tw, self.config.head_dim)
        return torch.cat([txt, img], dim=1), F.silu(c), JointCall(n_txt, key_mask, rope, attn_scale)

    def run_blocks(self, tokens: torch.Tensor, c_act: torch.Tensor, ctx: Optional[StepContext] = None) -> torch.Tensor:
        """Run the block stack over ``tokens [B, L + N, D]`` (inside ``forward``). A block
        policy carried by ``ctx`` takes over the loop (as in ``DiT.run_blocks``); one that
        needs a capability this model lacks is refused by name."""
        policy = None if ctx is None else ctx.hooks.stack
        if policy is not None:
            missing = sorted(set(getattr(policy, "requires", ())) - set(self.capabilities))
            if missing:
                hint = " (use cache=stack)" if missing == ["block_branches"] else ""
                raise ConfigError(f"--accel {policy!r} needs {', '.join(missing)}, which MMDiT does not offer{hint}")
            return policy.run(self, tokens, c_act, ctx)
        if self.grad_checkpointing and torch.is_grad_enabled():
            call = self._holder.call
            for block in self.blocks:
                tokens = checkpoint(block.run, tokens, c_act, call, ctx, use_reentrant=False)
            return tokens
        for block in self.blocks:
            tokens = block(tokens, c_act, ctx)
        return tokens

    def unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``[B, h w, p * p * C] -> [B, C, h p, w p]`` for an ``h x w`` patch grid (row-major tokens)."""
        B = tokens.shape[0]
        p, C = self.patch_size, self.out_channels
        x = tokens.reshape(B, height, width, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, height * p, width * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: dict, ctx: Optional[StepContext] = None) -> torch.Tensor:
        """Velocity ``v_hat [B, C, H, W]`` at ``(x_t [B, C, H, W], t [B])`` for the text condition ``y``."""
        tokens, c_act, call = self.embed(x, t, y)
        self._holder.call = call
        try:
            tokens = self.run_blocks(tokens, c_act, ctx)
        finally:
            self._holder.call = None
        img = tokens[:, call.n_txt:]
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        v = self.unpatchify(self.final_layer(img, c_act), h, w).to(x.dtype)
        return v if ctx is None or not ctx.hooks.after_output else output_hooks(self, v, ctx)

    # -- extension points --------------------------------------------------------------

    def attention_modules(self) -> list[nn.Module]:
        """The attention layer of every block, in block order (double-stream, then
        single-stream). Each passes its joined ``q, k, v [B, H, L + N, Dh]`` (after
        projection, QK-norm and RoPE) through the context's ``attention`` hooks."""
        return [block.attn for block in self.blocks]

    def rf_edit_blocks(self) -> list[int]:
        """RF-Edit's value-sharing layers, as indices into ``attention_modules()``: the
        reference shares FLUX.1's single-stream blocks 20-37 of 38; with ``n`` single-stream
        blocks, those from ``round(20 n / 38)`` on; without any, the second half of the
        double-stream blocks."""
        nd, ns = self.config.depth, self.config.single_depth
        if ns == 0:
            return list(range(nd // 2, nd))
        start = min(round(20 * ns / 38), ns - 1)
        return [nd + i for i in range(start, ns)]

    def modulated_input(self, tokens: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        """TeaCache's signal: block 0's modulated image tokens ``[B, N, D]`` from the joined
        ``tokens [B, L + N, D]`` (inside ``forward``)."""
        n = self._holder.call.n_txt if self._holder.call is not None else 0
        block = self.blocks[0]
        if isinstance(block, JointBlock):
            return block.modulated_image(tokens[:, n:], c_act)
        return block.modulated(tokens, c_act)[:, n:]

    def block_flops(self, n_query: int, n_key: Optional[int] = None) -> float:
        """Multiply-add FLOPs (2 per MAC) of one block for one batch row, averaged over the
        stack, for ``n_query`` tokens of the joined sequence attending to ``n_key`` keys.

        Double-stream: QKV and output projections ``8 n D^2``, attention ``4 n n_k D``, MLP
        ``4 n D H``, modulation ``24 D^2`` (two streams); single-stream: QKV ``6 n D^2``,
        ``mlp_in`` ``2 n D H``, ``linear2`` ``2 n (D + H) D``, attention ``4 n n_k D``,
        modulation ``6 D^2``. SD3's last block's missing text output is not subtracted.
        """
        cfg = self.config
        d, hdim = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
        n, nk = n_query, (n_query if n_key is None else n_key)
        double = 8.0 * n * d * d + 4.0 * n * nk * d + 4.0 * n * d * hdim + 24.0 * d * d
        single = 6.0 * n * d * d + 2.0 * n * d * hdim + 2.0 * n * (d + hdim) * d + 4.0 * n * nk * d + 6.0 * d * d
        return (cfg.depth * double + cfg.single_depth * single) / (cfg.depth + cfg.single_depth)

    def param_count(self, trainable_only: bool = True) -> int:
        """Number of parameters (trainable only by default)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def config_dict(self) -> dict:
        """The ``MMDiTConfig`` as a plain JSON-shaped dict (tuples as lists), as saved with
        checkpoints, so a saved config compares equal to the model's. The sampling-time
        extrapolation fields (``rope_scaling``, ``rope_train_size``, ``rope_watershed``,
        ``proportional_attn``) appear only when they differ from their defaults, so configs
        saved before they existed still compare equal."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()
                if not (k in _EXTRAPOLATION_DEFAULTS and v == _EXTRAPOLATION_DEFAULTS[k])}

    def set_extrapolation(self, rope_scaling: Optional[str] = None, rope_train_size: Optional[int] = None,
                          proportional_attn: Optional[bool] = None, rope_watershed: Optional[float] = None) -> "MMDiT":
        """Choose how to sample larger than trained (the ``MMDiTConfig`` fields of the same
        names; ``None`` keeps a field), validated; clears the position cache. Returns the model."""
        changes = {k: v for k, v in dict(rope_scaling=rope_scaling, rope_train_size=rope_train_size,
                                         proportional_attn=proportional_attn,
                                         rope_watershed=rope_watershed).items() if v is not None}
        config = replace(self.config, **changes)
        config.validate()
        self.config = config
        self._pos_cache.clear()
        return self
