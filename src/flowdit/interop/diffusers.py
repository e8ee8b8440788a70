"""diffusers' SD3 and FLUX transformers as flowdit velocity models.

``wrap_transformer(transformer)`` returns a module with flowdit's model signature,
``model(x, t, y, ctx=None) -> v``:

- ``x [B, C, H, W]``: the VAE latent (for FLUX the *unpacked* latent; the adapter packs
  2 x 2 patches into FLUX's ``[B, HW/4, 4C]`` sequence and builds ``img_ids``);
- ``t [B]`` (or a float): flowdit's time, which for both models *is* the scheduler's sigma
  (t = 1 noise, t = 0 data); SD3 receives ``1000 t``, FLUX receives ``t`` (it scales by 1000
  inside, as the pipeline's ``timestep / 1000`` undoes);
- ``y``: a text condition, ``text_condition(prompt_embeds, pooled_prompt_embeds)``, a dict
  that classifier-free guidance concatenates and swaps for the negative prompt's;
- the output is the model's prediction, which both pipelines step with
  ``x_next = x + (sigma_next - sigma) v``: exactly flowdit's velocity ``v = eps - x0``.

The adapter is the one place that knows these models' internals. With a block policy in
``ctx`` (flowdit's caches), the two token streams are joined into one sequence
``[txt; img]`` of ``[B, L + N, D]`` and each joint or single-stream block becomes a callable
``block(tokens, temb, ctx)``, so every stack-level policy (FORA and TaylorSeer with
``cache=stack``, FBCache, TeaCache, confidence-gated Taylor, Delta-DiT) runs unchanged.
Each block also re-states diffusers' forward with its branch outputs exposed before their
adaLN gates (``forward_branches``, ``gates``: joint blocks with per-token gates, text rows
the context stream's; FLUX's single-stream block with one fused branch), so the per-block
caches (FORA and TaylorSeer with ``cache=blocks``) run as their authors' code does;
token-level policies are refused by name (``flowdit.accel.base.check_policy``). Without a
policy the blocks run exactly as diffusers runs them.

``scheduler_grid`` reads flowdit's time grid from the pipeline's own scheduler (SD3's
static shift, FLUX's resolution-dependent ``mu``), and ``DiffusersBridge`` loads a local
pipeline folder offline and samples (or inverts) with flowdit's solvers, guidance and caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch import Tensor, nn

from flowdit.accel.base import check_policy
from flowdit.core.hooks import StepContext, attention_hooks, output_hooks
from flowdit.errors import ConfigError

if TYPE_CHECKING:
    from flowdit.edit.rf_edit import EditResult
    from flowdit.edit.rf_inversion import RFInversionResult

__all__ = [
    "DiffusersTransformer",
    "FluxTransformer",
    "SD3Transformer",
    "DiffusersBridge",
    "PipelineInfo",
    "check_accel",
    "decode_latents",
    "inspect_pipeline",
    "require_diffusers",
    "scheduler_grid",
    "text_condition",
    "wrap_transformer",
]


EXTRA_HINT = 'pip install "flowdit[diffusers]"'


def require_diffusers():
    """Import diffusers (and transformers, for the text encoders) or fail in one line that
    names the extra to install."""
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"this needs diffusers and transformers ({err.name} is missing): {EXTRA_HINT}") from None
    return diffusers


def text_condition(prompt_embeds: Tensor, pooled_prompt_embeds: Tensor) -> dict[str, Tensor]:
    """The condition ``y`` of a wrapped SD3 / FLUX transformer.

    ``prompt_embeds [B, L, D_text]`` (the joint text-encoder sequence) and
    ``pooled_prompt_embeds [B, P]`` (the pooled CLIP vectors), as the pipelines'
    ``encode_prompt`` returns them.
    """
    if prompt_embeds.dim() != 3:
        raise ConfigError(f"prompt_embeds must be [B, L, D], got shape {tuple(prompt_embeds.shape)}")
    if pooled_prompt_embeds.dim() != 2 or pooled_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
        raise ConfigError(
            f"pooled_prompt_embeds must be [B, P] with B = {prompt_embeds.shape[0]}, "
            f"got shape {tuple(pooled_prompt_embeds.shape)}"
        )
    return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_prompt_embeds}


@dataclass
class _Call:
    """What every block of the current model call shares (set by the adapter's forward)."""

    n_txt: int = 0
    n_img: int = 0
    rotary: Any = None
    ctx: Optional[StepContext] = None


class _StackBlock:
    """One diffusers block as flowdit's ``block(tokens [B, L + N, D], temb [B, D], ctx)``.

    The joined sequence is split into the text and image streams, the block runs as
    diffusers runs it, and the streams are joined again. A block whose text output is
    ``None`` (SD3's last block, ``context_pre_only``) passes the text tokens through; they
    are not read afterwards.
    """

    def __init__(self, block: nn.Module, call: _Call, rotary: bool):
        self.block, self._call, self._rotary = block, call, rotary

    def _attn_kwargs(self) -> dict:
        return {"image_rotary_emb": self._call.rotary} if self._rotary else {}

    def __call__(self, tokens: Tensor, temb: Tensor, ctx: Optional[StepContext] = None) -> Tensor:
        n = self._call.n_txt
        txt, img = tokens[:, :n].contiguous(), tokens[:, n:].contiguous()
        txt_out, img_out = self.block(hidden_states=img, encoder_hidden_states=txt, temb=temb, **self._attn_kwargs())
        return torch.cat([txt if txt_out is None else txt_out, img_out], dim=1)


def _rows(txt_rows: Tensor, img_rows: Tensor, n_txt: int, n_img: int) -> Tensor:
    """A per-token tensor ``[B, L + N, D]`` over the joined sequence from a text-stream and
    an image-stream vector ``[B, D]`` each (text rows first)."""
    b, d = img_rows.shape
    return torch.cat([txt_rows.unsqueeze(1).expand(b, n_txt, d), img_rows.unsqueeze(1).expand(b, n_img, d)], dim=1)


class _JointBlock(_StackBlock):
    """SD3's ``JointTransformerBlock`` or FLUX's ``FluxTransformerBlock`` with its branch
    outputs exposed before their adaLN gates (flowdit's ``block_branches``).

    Per stream ``s`` (text ``c``, image ``x``): ``s' = s + g_a^s A^s``, then
    ``s'' = s' + g_m^s MLP^s((1 + scale^s) LN(s') + shift^s)``, where ``(A^x, A^c)`` is the
    joint attention of the two modulated streams. Over the joined sequence the branch
    outputs are ``a = [A^c; A^x]`` and ``m = [MLP^c; MLP^x]`` (``[B, L + N, D]``) and the
    gates are per token: text rows carry the context gates, image rows the image gates.
    SD3's last block (``context_pre_only``) has no text update: its text rows of ``a``,
    ``m`` and both gates are zero, so the text tokens pass through (they are not read
    afterwards). SD3.5's dual attention (``use_dual_attention``, a third gated branch
    ``attn2``) is not re-stated; such a model does not offer ``block_branches``.
    """

    def _check(self) -> None:
        if getattr(self.block, "use_dual_attention", False):
            raise ConfigError("per-block caches do not support SD3.5's dual-attention blocks (use cache=stack)")

    def _norms(self, txt: Tensor, img: Tensor, temb: Tensor):
        b = self.block
        norm_img, gate_msa, shift_mlp, scale_mlp, gate_mlp = b.norm1(img, emb=temb)
        if getattr(b, "context_pre_only", False):
            return norm_img, (gate_msa, shift_mlp, scale_mlp, gate_mlp), b.norm1_context(txt, temb), None
        norm_txt, *ctx_mods = b.norm1_context(txt, emb=temb)
        return norm_img, (gate_msa, shift_mlp, scale_mlp, gate_mlp), norm_txt, tuple(ctx_mods)

    def _ff(self, ff: nn.Module, h: Tensor) -> Tensor:
        chunk = getattr(self.block, "_chunk_size", None)
        if chunk is not None:
            from diffusers.models.attention import _chunked_feed_forward

            return _chunked_feed_forward(ff, h, self.block._chunk_dim, chunk)
        return ff(h)

    def gates(self, temb: Tensor) -> tuple[Tensor, Tensor]:
        """The current call's gates ``(g_a, g_m)``, each per token ``[B, L + N, D]`` (text
        rows the context stream's ``c_gate_msa`` / ``c_gate_mlp``, image rows ``gate_msa``
        / ``gate_mlp``; zero text rows for a ``context_pre_only`` block), from the
        ``AdaLayerNormZero`` chunks ``(shift_msa, scale_msa, gate_msa, shift_mlp,
        scale_mlp, gate_mlp)`` of ``temb [B, D]``."""
        self._check()
        b, n_txt, n_img = self.block, self._call.n_txt, self._call.n_img
        img = b.norm1.linear(b.norm1.silu(temb)).chunk(6, dim=1)
        if getattr(b, "context_pre_only", False):
            zero = torch.zeros_like(img[2])
            return _rows(zero, img[2], n_txt, n_img), _rows(zero, img[5], n_txt, n_img)
        txt = b.norm1_context.linear(b.norm1_context.silu(temb)).chunk(6, dim=1)
        return _rows(txt[2], img[2], n_txt, n_img), _rows(txt[5], img[5], n_txt, n_img)

    def forward_branches(self, tokens: Tensor, temb: Tensor, ctx: Optional[StepContext] = None,
                         attn_out: Optional[Tensor] = None,
                         mlp_out: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """``tokens [B, L + N, D] -> (tokens_out, a, m)``, all ``[B, L + N, D]``: the block
        as diffusers computes it (the same operations in the same order on each stream),
        with ``a`` and ``m`` the pre-gate attention and MLP outputs of both streams. A
        given ``attn_out`` / ``mlp_out`` replaces that branch (it is not computed); the
        gates always come from the current ``temb``."""
        self._check()
        b, n = self.block, self._call.n_txt
        txt, img = tokens[:, :n].contiguous(), tokens[:, n:].contiguous()
        norm_img, (gate_msa, shift_mlp, scale_mlp, gate_mlp), norm_txt, ctx_mods = self._norms(txt, img, temb)
        if attn_out is None:
            outs = b.attn(hidden_states=norm_img, encoder_hidden_states=norm_txt, **self._attn_kwargs())
            a_img, a_txt = outs[0], outs[1]
            if ctx_mods is None:
                a_txt = torch.zeros_like(txt)
        else:
            a_txt, a_img = attn_out[:, :n], attn_out[:, n:]
        img = img + gate_msa.unsqueeze(1) * a_img
        if mlp_out is None:
            h = b.norm2(img)
            m_img = self._ff(b.ff, h * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
        else:
            m_img = mlp_out[:, n:]
        img = img + gate_mlp.unsqueeze(1) * m_img
        if ctx_mods is None:
            m_txt = torch.zeros_like(txt) if mlp_out is None else mlp_out[:, :n]
        else:
            c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = ctx_mods
            txt = txt + c_gate_msa.unsqueeze(1) * a_txt
            if mlp_out is None:
                h = b.norm2_context(txt)
                m_txt = self._ff(b.ff_context, h * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None])
            else:
                m_txt = mlp_out[:, :n]
            txt = txt + c_gate_mlp.unsqueeze(1) * m_txt
            # FLUX clips the text stream in fp16 (SD3 does not).
            if self._rotary and txt.dtype == torch.float16:
                txt = txt.clip(-65504, 65504)
        out = torch.cat([txt, img], dim=1)
        a = attn_out if attn_out is not None else torch.cat([a_txt, a_img], dim=1)
        m = mlp_out if mlp_out is not None else torch.cat([m_txt, m_img], dim=1)
        return out, a, m


class _SingleBlock(_StackBlock):
    """FLUX's ``FluxSingleTransformerBlock`` with its one gated branch exposed.

    On the joined sequence ``x [B, L + N, D]``: ``x' = x + g a`` with
    ``a = proj_out([Attn(h); GELU(proj_mlp(h))])``, ``h = (1 + scale) LN(x) + shift``; the
    attention and MLP share one output projection and one gate, so the block has a single
    branch and ``m`` is ``None`` (as TaylorSeer-FLUX caches one fused feature per
    single-stream block).
    """

    def gates(self, temb: Tensor) -> tuple[Tensor, None]:
        """``(g, None)``: the block's one gate ``[B, D]`` (the third of the
        ``AdaLayerNormZeroSingle`` chunks ``(shift, scale, gate)`` of ``temb [B, D]``)."""
        norm = self.block.norm
        return norm.linear(norm.silu(temb)).chunk(3, dim=1)[2], None

    def forward_branches(self, tokens: Tensor, temb: Tensor, ctx: Optional[StepContext] = None,
                         attn_out: Optional[Tensor] = None,
                         mlp_out: Optional[Tensor] = None) -> tuple[Tensor, Tensor, None]:
        """``tokens [B, L + N, D] -> (tokens_out, a, None)``: diffusers' single-stream block
        (the fp16 clip included) with ``a [B, L + N, D]`` its pre-gate fused output. A given
        ``attn_out`` replaces ``a``; ``mlp_out`` must be ``None``."""
        if mlp_out is not None:
            raise ValueError("a single-stream block has one branch; mlp_out must be None")
        b = self.block
        norm, gate = b.norm(tokens, emb=temb)
        if attn_out is None:
            mlp = b.act_mlp(b.proj_mlp(norm))
            attn = b.attn(hidden_states=norm, **self._attn_kwargs())
            attn_out = b.proj_out(torch.cat([attn, mlp], dim=2))
        out = tokens + gate.unsqueeze(1) * attn_out
        if out.dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out, attn_out, None


class DiffusersTransformer(nn.Module):
    """Common part of the SD3 and FLUX adapters (see the module docstring).

    ``capabilities`` lists what flowdit's policies may rely on beyond the block stack:
    ``block_branches`` (each block's pre-gate branch outputs, ``forward_branches`` and
    ``gates`` on the joined sequence, with per-token gates ``[B, L + N, D]`` for the joint
    blocks). A model with SD3.5's dual-attention blocks does not offer it.
    """

    capabilities = frozenset({"block_branches"})
    family = "diffusers"

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        self._call = _Call()
        self.blocks: list[_StackBlock] = []
        cfg = transformer.config
        self.hidden_size = int(cfg.num_attention_heads * cfg.attention_head_dim)
        self._value_handles: list = []

    def _install_value_hooks(self) -> None:
        """Route every attention layer's value projection through the step context's
        ``attention`` hooks (RF-Edit's value sharing). The hooks are torch forward hooks on
        ``attn.to_v``; they do nothing unless a flowdit call with attention hooks runs."""
        for attn in self.attention_modules():
            self._value_handles.append(attn.to_v.register_forward_hook(self._value_hook(attn)))

    def _value_hook(self, attn: nn.Module):
        def hook(module, args, out):
            ctx = self._call.ctx
            if ctx is None or not ctx.hooks.attention:
                return None
            b, n, d = out.shape
            v = out.view(b, n, attn.heads, d // attn.heads).transpose(1, 2)
            _, _, new = attention_hooks(attn, None, None, v, ctx)
            return None if new is v else new.transpose(1, 2).reshape(b, n, d)
        return hook

    def attention_modules(self) -> list[nn.Module]:
        """The attention layer of every block, in block order (joint blocks, then FLUX's
        single-stream blocks). On these models the ``attention`` hook point sees the values
        only: ``q`` and ``k`` are ``None`` and ``v [B, H, N, Dh]`` is the value projection
        of the block's attention input (SD3 and FLUX joint blocks: the image stream; FLUX
        single-stream blocks: the joined ``[txt; img]`` sequence)."""
        return [block.attn for block in self.raw_blocks()]

    # -- the pieces each family defines ------------------------------------------------

    def embed(self, x: Tensor, t: Tensor, y: dict) -> tuple[Tensor, Tensor, Tensor]:
        """Image tokens ``[B, N, D]``, text tokens ``[B, L, D]`` and ``temb [B, D]``; sets
        the per-call state the blocks share."""
        raise NotImplementedError

    def raw_blocks(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def block_kwargs(self) -> dict:
        return {}

    def output(self, img: Tensor, temb: Tensor, x: Tensor) -> Tensor:
        """The velocity ``[B, C, H, W]`` from the final image tokens."""
        raise NotImplementedError

    # -- flowdit's model interface -----------------------------------------------------

    @staticmethod
    def _check(x: Tensor, y: Any) -> None:
        if not isinstance(y, dict) or not {"encoder_hidden_states", "pooled_projections"} <= set(y):
            raise ConfigError("y must be text_condition(prompt_embeds, pooled_prompt_embeds)")
        if x.dim() != 4:
            raise ConfigError(f"x must be a latent [B, C, H, W], got shape {tuple(x.shape)}")

    def forward(self, x: Tensor, t: Tensor | float, y: dict, ctx: Optional[StepContext] = None) -> Tensor:
        """Velocity ``v [B, C, H, W]`` at ``(x_t, t)`` for the text condition ``y``."""
        self._check(x, y)
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        img, txt, temb = self.embed(x, t, y)
        policy = None if ctx is None else ctx.hooks.stack
        if ctx is not None and ctx.hooks.attention and any(
                getattr(a, "fused_projections", False) for a in self.attention_modules()):
            raise ConfigError("attention hooks (RF-Edit) need unfused projections: call "
                              "transformer.unfuse_qkv_projections() first")
        self._call.ctx = ctx
        try:
            if policy is None:
                kw = self.block_kwargs()
                for block in self.raw_blocks():
                    txt, img = block(hidden_states=img, encoder_hidden_states=txt, temb=temb, **kw)
            else:
                check_policy(self, policy)
                self._call.n_img = img.shape[1]
                tokens = policy.run(self, torch.cat([txt, img], dim=1), temb, ctx)
                img = tokens[:, txt.shape[1]:]
        finally:
            self._call.ctx = None
        v = self.output(img, temb, x).to(x.dtype)
        return v if ctx is None or not ctx.hooks.after_output else output_hooks(self, v, ctx)

    def modulated_input(self, tokens: Tensor, temb: Tensor) -> Tensor:
        """TeaCache's signal: the first block's ``norm1`` applied to the image tokens of the
        joined sequence ``tokens [B, L + N, D]`` (TeaCache4FLUX, ``transformer_blocks[0].norm1``)."""
        img = tokens[:, self._call.n_txt:].contiguous()
        return self.raw_blocks()[0].norm1(img, emb=temb)[0]

    def block_flops(self, n_query: int, n_key: Optional[int] = None) -> float:
        """Multiply-add FLOPs (2 per MAC) of one block for one batch row on ``n_query``
        tokens of the joined sequence: QKV and output projections ``8 n D^2``, attention
        ``4 n n_k D`` and a 4x MLP ``16 n D^2``, plus the modulation; the same count as
        flowdit's DiT block, an average over joint and single-stream blocks."""
        d = self.hidden_size
        n_key = n_query if n_key is None else n_key
        return 8.0 * n_query * d * d + 4.0 * n_query * n_key * d + 16.0 * n_query * d * d + 12.0 * d * d

    def modulation_flops(self) -> float:
        """Multiply-add FLOPs (2 per MAC) of the adaLN gate vectors of one block for one
        batch row, averaged over the blocks: what a cached call of a per-block cache
        computes. A joint block has two modulation layers ``D -> 6D`` (``24 D^2``; SD3's
        ``context_pre_only`` block ``D -> 6D`` and ``D -> 2D``, ``16 D^2``), a single-stream
        block one ``D -> 3D`` (``6 D^2``)."""
        d, total, blocks = self.hidden_size, 0.0, self.raw_blocks()
        for b in blocks:
            if hasattr(b, "norm1_context"):
                total += (16.0 if getattr(b, "context_pre_only", False) else 24.0) * d * d
            else:
                total += 6.0 * d * d
        return total / max(len(blocks), 1)

    @property
    def config(self):
        return self.transformer.config


class SD3Transformer(DiffusersTransformer):
    """``SD3Transformer2DModel`` (MMDiT, Esser et al. 2024) as a flowdit velocity model."""

    family = "sd3"

    def __init__(self, transformer: nn.Module):
        super().__init__(transformer)
        self.blocks = [_JointBlock(b, self._call, rotary=False) for b in transformer.transformer_blocks]
        if any(getattr(b, "use_dual_attention", False) for b in transformer.transformer_blocks):
            self.capabilities = frozenset()
        self.patch_size = int(transformer.config.patch_size)
        self._install_value_hooks()

    def raw_blocks(self):
        return self.transformer.transformer_blocks

    def embed(self, x, t, y):
        tr = self.transformer
        img = tr.pos_embed(x).contiguous()
        # The pipeline feeds the scheduler's timesteps, sigma * num_train_timesteps (1000).
        temb = tr.time_text_embed(t.to(x.dtype) * 1000, y["pooled_projections"])
        txt = tr.context_embedder(y["encoder_hidden_states"])
        self._call.n_txt = txt.shape[1]
        return img, txt, temb

    def output(self, img, temb, x):
        tr = self.transformer
        out = tr.proj_out(tr.norm_out(img, temb))
        p, c = self.patch_size, tr.out_channels
        h, w = x.shape[-2] // p, x.shape[-1] // p
        out = out.reshape(out.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(out.shape[0], c, h * p, w * p)


def flux_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """FLUX's image position ids ``[h w, 3]`` for a packed latent of ``height x width``
    patches: ``(0, row, column)``, as ``FluxPipeline._prepare_latent_image_ids``."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] += torch.arange(height)[:, None]
    ids[..., 2] += torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


def pack_flux_latents(x: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, (H/2)(W/2), 4C]``: FLUX's 2 x 2 patch sequence."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ConfigError(f"FLUX latents need an even height and width, got {h} x {w}")
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_flux_latents(seq: Tensor, height: int, width: int) -> Tensor:
    """Inverse of ``pack_flux_latents``: ``[B, (H/2)(W/2), 4C] -> [B, C, H, W]``."""
    b, _, c4 = seq.shape
    x = seq.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


class FluxTransformer(DiffusersTransformer):
    """``FluxTransformer2DModel`` as a flowdit velocity model.

    Args:
        transformer: the diffusers model (``in_channels`` is 4x the VAE's channels).
        guidance: the distilled guidance scale FLUX-dev embeds (``guidance_embeds=True``;
            the pipeline's ``guidance_scale``, 3.5 by default); must be ``None`` for models
            without the embedding. True classifier-free guidance (the pipeline's
            ``true_cfg_scale``) is flowdit's ordinary CFG with a negative prompt.
    """

    family = "flux"

    def __init__(self, transformer: nn.Module, guidance: Optional[float] = None):
        super().__init__(transformer)
        embeds = bool(getattr(transformer.config, "guidance_embeds", False))
        if embeds and guidance is None:
            guidance = 3.5
        if not embeds and guidance is not None:
            raise ConfigError("guidance: this FLUX model has no guidance embedding (guidance_embeds=False); "
                              "use classifier-free guidance (cfg) instead")
        self.guidance = None if guidance is None else float(guidance)
        self.blocks = [*(_JointBlock(b, self._call, rotary=True) for b in transformer.transformer_blocks),
                       *(_SingleBlock(b, self._call, rotary=True) for b in transformer.single_transformer_blocks)]
        self._install_value_hooks()

    def rf_edit_blocks(self) -> list[int]:
        """RF-Edit's reference block set (``FLUX_Image_Edit/src/flux/modules/layers.py``,
        ``SingleStreamBlock.forward``: ``info['id'] > 19``): the single-stream blocks 20-37
        of FLUX.1's 38, as indices into ``attention_modules()`` (after the joint blocks).
        A model with ``n`` single-stream blocks shares the last ones from
        ``round(20 n / 38)`` on, the same fraction."""
        n_joint = len(self.transformer.transformer_blocks)
        n_single = len(self.transformer.single_transformer_blocks)
        start = min(round(20 * n_single / 38), n_single - 1)
        return [n_joint + i for i in range(start, n_single)]

    def raw_blocks(self):
        return (*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks)

    def block_kwargs(self):
        return {"image_rotary_emb": self._call.rotary}

    def embed(self, x, t, y):
        tr = self.transformer
        b, _, h, w = x.shape
        img = tr.x_embedder(pack_flux_latents(x))
        dtype = img.dtype
        timestep = t.to(dtype) * 1000
        if self.guidance is None:
            temb = tr.time_text_embed(timestep, y["pooled_projections"])
        else:
            g = torch.full((b,), self.guidance, device=x.device, dtype=dtype) * 1000
            temb = tr.time_text_embed(timestep, g, y["pooled_projections"])
        txt = tr.context_embedder(y["encoder_hidden_states"])
        txt_ids = torch.zeros(txt.shape[1], 3, device=x.device, dtype=dtype)
        ids = torch.cat([txt_ids, flux_image_ids(h // 2, w // 2, x.device, dtype)], dim=0)
        self._call.rotary = tr.pos_embed(ids)
        self._call.n_txt = txt.shape[1]
        return img, txt, temb

    def output(self, img, temb, x):
        tr = self.transformer
        seq = tr.proj_out(tr.norm_out(img, temb))
        return unpack_flux_latents(seq, x.shape[-2], x.shape[-1])


def wrap_transformer(transformer: nn.Module, guidance: Optional[float] = None) -> DiffusersTransformer:
    """Wrap a diffusers ``SD3Transformer2DModel`` or ``FluxTransformer2DModel``; ``guidance``
    is FLUX-dev's embedded guidance scale (see ``FluxTransformer``), refused for SD3."""
    name = type(transformer).__name__
    if name == "SD3Transformer2DModel":
        if guidance is not None:
            raise ConfigError("guidance: SD3 has no guidance embedding; use classifier-free guidance (cfg) instead")
        return SD3Transformer(transformer)
    if name == "FluxTransformer2DModel":
        return FluxTransformer(transformer, guidance=guidance)
    raise ConfigError(f"no flowdit adapter for {name}; supported: SD3Transformer2DModel, FluxTransformer2DModel")


def scheduler_grid(scheduler: Any, num_steps: int, image_seq_len: Optional[int] = None) -> Tensor:
    """flowdit's time grid ``[N + 1]`` (float64, 1 -> 0) from a pipeline's flow-matching scheduler.

    Calls ``set_timesteps`` as the pipeline does and returns ``scheduler.sigmas`` (which end
    in 0): SD3 uses its static ``shift`` (3.0) on the default grid; FLUX passes
    ``sigmas = linspace(1, 1/N, N)`` and, with ``use_dynamic_shifting``, the exponential
    shift ``mu = calculate_shift(image_seq_len, ...)`` from the scheduler's config
    (``image_seq_len`` = packed latent tokens, ``(H/2)(W/2)``).
    """
    import numpy as np

    if not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {num_steps!r}")
    cfg = scheduler.config
    if cfg.get("use_dynamic_shifting", False):
        if image_seq_len is None:
            raise ConfigError("image_seq_len is needed for a scheduler with use_dynamic_shifting (FLUX)")
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    else:
        scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.detach().to("cpu", torch.float64)


class DiffusersBridge:
    """A local diffusers pipeline folder, sampled with flowdit's solvers, guidance and caches.

    ``DiffusersBridge.from_pretrained(path)`` loads the pipeline offline
    (``local_files_only``); ``bridge.model`` is the wrapped transformer, ``bridge.grid(n,
    height, width)`` the pipeline's time grid, ``bridge.encode(prompts)`` the text condition
    and ``bridge.sample(...)`` a full text-to-latent run.
    """

    def __init__(self, pipeline: Any, guidance: Optional[float] = None):
        self.pipeline = pipeline
        self.model = wrap_transformer(pipeline.transformer, guidance=guidance)

    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: Optional[torch.dtype] = None, **kw) -> "DiffusersBridge":
        """Load the pipeline in ``path`` without network access."""
        import os

        diffusers = require_diffusers()
        if not os.path.isdir(path):
            raise ConfigError(f"pipeline folder {path} does not exist or is not a folder")
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ConfigError(f"pipeline folder {path} has no model_index.json (not a diffusers pipeline folder)")
        import json

        try:
            with open(os.path.join(path, "model_index.json")) as f:
                index = json.load(f)
        except (OSError, ValueError) as err:
            raise ConfigError(f"pipeline folder {path}: model_index.json is unreadable: {err}") from None
        # Components saved as absent (a pipeline without its VAE or text encoders, for
        # sampling from given embeddings) load as absent.
        absent = {k: None for k, v in index.items()
                  if not k.startswith("_") and isinstance(v, list) and all(x is None for x in v)}
        if torch_dtype is not None:
            kw_dtype = {"torch_dtype": torch_dtype}
        else:
            kw_dtype = {}
        pipe = diffusers.DiffusionPipeline.from_pretrained(path, local_files_only=True, **kw_dtype, **absent)
        return cls(pipe, **kw)

    @property
    def latent_channels(self) -> int:
        tr = self.pipeline.transformer
        return tr.config.in_channels // 4 if self.model.family == "flux" else tr.config.in_channels

    def grid(self, num_steps: int, height: int, width: int) -> Tensor:
        """The pipeline's time grid for a latent of ``height x width``."""
        seq = (height // 2) * (width // 2)
        return scheduler_grid(self.pipeline.scheduler, num_steps, image_seq_len=seq)

    def encode(self, prompts: Sequence[str], device=None) -> dict[str, Tensor]:
        """The text condition of ``prompts`` by the pipeline's own text encoders."""
        pipe = self.pipeline
        if self.model.family == "flux":
            embeds, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device)
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None,
                                                      device=device, do_classifier_free_guidance=False)
        return text_condition(embeds, pooled)

    def sample(self, noise: Tensor, cond: dict, negative: Optional[dict] = None, cfg: float = 1.0,
               solver: str = "euler", steps: int = 28, accel: Any = None, progress: bool = False) -> Tensor:
        """Integrate from ``noise [B, C, H, W]`` (latent) to a latent with flowdit's ``solver``
        on the pipeline's grid; ``cfg > 1`` needs the ``negative`` condition. ``accel`` is a
        policy spec or object (``flowdit.accel.build_policy``)."""
        from flowdit.accel import build_policy
        from flowdit.sampling.context import StepContext
        from flowdit.sampling.guidance import cfg_velocity
        from flowdit.sampling.sample import sample

        if cfg != 1.0 and negative is None:
            raise ConfigError("cfg != 1 needs a negative prompt condition")
        policy = build_policy(accel) if isinstance(accel, str) else accel
        check_policy(self.model, policy)
        ctx = StepContext(block_policy=policy)
        if cfg == 1.0:
            def fn(x, t):
                ctx.branch = "cond"
                return self.model(x, t, cond, ctx=ctx)
        else:
            fn = cfg_velocity(self.model, cond, negative, cfg, ctx=ctx)
        grid = self.grid(steps, noise.shape[-2], noise.shape[-1])
        return sample(fn, noise, solver=solver, schedule=grid, step_context=ctx, progress=progress).x

    def edit(self, latents: Tensor, source: dict, target: dict, inject_steps: int = 2, solver: str = "rf2",
             steps: int = 28, negative: Optional[dict] = None, cfg: float = 1.0, blocks: Optional[Sequence[int]] = None,
             accel: Any = None) -> "EditResult":
        """RF-Edit a latent ``[B, C, H, W]`` from the ``source`` to the ``target`` text
        condition (``flowdit.edit.rf_edit``) on the pipeline's time grid: invert under
        ``source``, regenerate under ``target`` (guided with ``cfg`` against ``negative``),
        sharing attention values in ``blocks`` (default: the model's reference set, FLUX's
        late single-stream blocks; for SD3 the second half of its joint blocks) for the
        first ``inject_steps`` steps. ``accel``: a block policy run in both passes."""
        from flowdit.accel import build_policy
        from flowdit.edit.rf_edit import rf_edit

        if cfg != 1.0 and negative is None:
            raise ConfigError("cfg != 1 needs a negative prompt condition")
        policy = build_policy(accel) if isinstance(accel, str) else accel
        check_policy(self.model, policy)
        grid = self.grid(steps, latents.shape[-2], latents.shape[-1])
        return rf_edit(self.model, latents, source, target, inject_steps, solver, steps, blocks=blocks, cfg_scale=cfg,
                       batch_size=latents.shape[0], device=latents.device, policy=policy, negative=negative,
                       grid=grid)

    def rf_inversion(self, latents: Tensor, source: dict, target: dict, gamma: float = 0.5, eta: float = 0.9,
                     eta_steps: Optional[tuple[int, int]] = None, solver: str = "euler", steps: int = 28,
                     negative: Optional[dict] = None, cfg: float = 1.0, seed: int = 0) -> "RFInversionResult":
        """RF-Inversion (``flowdit.edit.rf_inversion``) of a latent ``[B, C, H, W]`` from the
        ``source`` to the ``target`` text condition on the pipeline's time grid: the
        controlled forward ODE (``gamma``) under ``source``, the controlled reverse ODE
        (``eta`` on regeneration steps ``eta_steps``) under ``target``. ``eta_steps`` defaults
        to the first quarter of the steps, ``(0, round(steps / 4))``, as the FLUX RF-Inversion
        pipeline's ``stop_timestep=0.25`` (7 of its 28 steps)."""
        from flowdit.edit.rf_inversion import rf_inversion

        if eta_steps is None:
            eta_steps = (0, round(steps / 4))
        if cfg != 1.0 and negative is None:
            raise ConfigError("cfg != 1 needs a negative prompt condition")
        grid = self.grid(steps, latents.shape[-2], latents.shape[-1])
        return rf_inversion(self.model, latents, source, target, gamma, eta, eta_steps, solver, steps, cfg_scale=cfg,
                            seed=seed, batch_size=latents.shape[0], device=latents.device, negative=negative,
                            grid=grid)

# -- a pipeline folder, read before anything is loaded -----------------------------------

_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
# The text encoders each family's ``encode_prompt`` cannot do without (SD3's T5 is optional:
# the pipeline uses zeros in its place).
_TEXT_PARTS = {"sd3": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
               "flux": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}


@dataclass(frozen=True)
class PipelineInfo:
    """What a local SD3 / FLUX pipeline folder holds, read from its JSON files only.

    ``size_multiple`` is the pixel multiple a height or width must be: the VAE factor times
    SD3's patch size (``StableDiffusion3Pipeline.check_inputs``) or times 2 for FLUX's
    2 x 2 packing (``FluxPipeline.check_inputs``). ``default_size`` is the pipelines'
    default side in pixels, ``max_size`` the largest side SD3's positional embedding covers
    (``None``: no limit). ``missing_text`` lists the absent parts ``encode`` needs.
    """

    path: str
    pipeline: str
    family: str
    has_vae: bool
    vae_scale_factor: int
    size_multiple: int
    default_size: int
    max_size: Optional[int]
    guidance_embeds: bool
    latent_channels: int
    missing_text: tuple[str, ...]


def _read_json(path: str, what: str) -> dict:
    import json

    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{what} {path} is unreadable: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} is not a JSON object")
    return data


def _present(entry: Any) -> bool:
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and all(x is not None for x in entry)


def inspect_pipeline(path: str) -> PipelineInfo:
    """Read ``model_index.json`` and the transformer's and VAE's ``config.json`` of a
    pipeline folder, without diffusers and without loading weights; refuse, in one line
    naming the folder, one that is missing, not a diffusers folder, or not SD3 / FLUX."""
    import os

    if not os.path.isdir(path):
        raise ConfigError(f"pipeline folder {path} does not exist or is not a folder")
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise ConfigError(f"pipeline folder {path} has no model_index.json (not a diffusers pipeline folder)")
    index = _read_json(index_path, "pipeline index")
    transformer = index.get("transformer")
    cls = transformer[1] if _present(transformer) else None
    family = _FAMILIES.get(cls)
    if family is None:
        found = index.get("_class_name", "?")
        raise ConfigError(f"pipeline folder {path} is a {found} with transformer {cls}; "
                          f"supported: {', '.join(_FAMILIES)} (SD3 or FLUX pipelines)")
    tcfg = _read_json(os.path.join(path, "transformer", "config.json"), "transformer config")
    has_vae = _present(index.get("vae"))
    vsf = 8  # the pipelines' value without a VAE
    if has_vae:
        vcfg = _read_json(os.path.join(path, "vae", "config.json"), "VAE config")
        vsf = 2 ** (len(vcfg.get("block_out_channels", (0,) * 4)) - 1)
    in_ch = int(tcfg.get("in_channels", 16 if family == "sd3" else 64))
    if family == "sd3":
        patch = int(tcfg.get("patch_size", 2))
        multiple, default = vsf * patch, int(tcfg.get("sample_size", 128)) * vsf
        pos = tcfg.get("pos_embed_max_size")
        max_size = int(pos) * patch * vsf if pos else None
        latent = in_ch
    else:
        multiple, default, max_size, latent = vsf * 2, 128 * vsf, None, in_ch // 4
    missing = tuple(k for k in _TEXT_PARTS[family] if not _present(index.get(k)))
    return PipelineInfo(path=path, pipeline=str(index.get("_class_name", "")), family=family, has_vae=has_vae,
                        vae_scale_factor=vsf, size_multiple=multiple, default_size=default, max_size=max_size,
                        guidance_embeds=bool(tcfg.get("guidance_embeds", False)), latent_channels=latent,
                        missing_text=missing)


def check_accel(family: str, policy: Any) -> None:
    """Refuse, before any model is loaded, a policy that the ``family`` adapter
    (``"sd3"`` or ``"flux"``) cannot run (the same one-line error as sampling gives)."""
    cls = {"sd3": SD3Transformer, "flux": FluxTransformer}[family]
    check_policy(cls.__new__(cls), policy)


def decode_latents(pipeline: Any, latents: Tensor) -> Tensor:
    """Decode latents ``[B, C, H, W]`` (the bridge's, FLUX's unpacked) with the pipeline's VAE
    into images ``[B, 3, f H, f W]`` (``f`` the VAE factor) in ``[-1, 1]``, unclamped, undoing the VAE's scaling and
    shift as both pipelines do before ``vae.decode``:
    ``latents / scaling_factor + shift_factor``."""
    vae = pipeline.vae
    if vae is None:
        raise ConfigError("this pipeline has no VAE to decode with")
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents / vae.config.scaling_factor + shift
    with torch.no_grad():
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]
