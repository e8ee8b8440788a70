"""diffusers' SD3 transformer weights in flowdit's MMDiT.

``mmdit_from_diffusers_sd3(transformer)`` builds the ``MMDiT`` of the same architecture as
a diffusers ``SD3Transformer2DModel`` (SD3-medium, SD3.5-large; not SD3.5-medium's
MMDiT-X dual-attention blocks) and copies its weights key by key; the two then give the
same velocity for the same input (flowdit's ``t`` in ``[0, 1]``, diffusers' ``timestep =
1000 t``: the MMDiT's ``time_scale`` is 1000). Only the state dict is read, so diffusers is
not imported here.
"""

from __future__ import annotations

import torch
from torch import nn

from flowdit.errors import ConfigError
from flowdit.models.mmdit import MMDiT, MMDiTConfig

__all__ = ["mmdit_config_from_diffusers_sd3", "mmdit_from_diffusers_sd3", "sd3_state_dict_to_mmdit"]


def mmdit_config_from_diffusers_sd3(config) -> MMDiTConfig:
    """The ``MMDiTConfig`` of a diffusers ``SD3Transformer2DModel.config``; refuses what
    flowdit's MMDiT does not build (dual-attention blocks, a caption projection width other
    than the hidden width, other output channels)."""
    cfg = dict(config)
    if tuple(cfg.get("dual_attention_layers") or ()):
        raise ConfigError("SD3.5-medium's dual-attention (MMDiT-X) blocks are not part of flowdit's MMDiT")
    hidden = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    if int(cfg.get("caption_projection_dim", hidden)) != hidden:
        raise ConfigError(f"caption_projection_dim {cfg['caption_projection_dim']} must equal the hidden width {hidden}")
    if int(cfg.get("out_channels") or cfg["in_channels"]) != int(cfg["in_channels"]):
        raise ConfigError("out_channels must equal in_channels (a velocity shaped like the input)")
    if cfg.get("qk_norm") not in (None, "rms_norm"):
        raise ConfigError(f"qk_norm {cfg['qk_norm']!r}: only RMS QK-norm is built")
    return MMDiTConfig(
        input_size=int(cfg["sample_size"]), in_channels=int(cfg["in_channels"]), patch_size=int(cfg["patch_size"]),
        hidden_size=hidden, depth=int(cfg["num_layers"]), single_depth=0, num_heads=int(cfg["num_attention_heads"]),
        text_dim=int(cfg["joint_attention_dim"]), pooled_dim=int(cfg["pooled_projection_dim"]),
        qk_norm=cfg.get("qk_norm") == "rms_norm", pos_embed="sincos",
        pos_embed_max_size=cfg.get("pos_embed_max_size"), time_scale=1000.0)


def _scale_shift_to_shift_scale(t: torch.Tensor) -> torch.Tensor:
    """diffusers' ``AdaLayerNormContinuous`` emits ``(scale, shift)``; flowdit ``(shift, scale)``."""
    scale, shift = t.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def sd3_state_dict_to_mmdit(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Rename (and fuse) an ``SD3Transformer2DModel`` state dict into ``MMDiT`` keys.

    ``to_q/to_k/to_v`` are fused into ``qkv`` (rows q, k, v), ``add_{q,k,v}_proj`` into
    ``qkv_txt``; the two ``AdaLayerNormContinuous`` (the last block's text norm and
    ``norm_out``) are reordered from ``(scale, shift)`` to ``(shift, scale)``. The
    ``pos_embed.pos_embed`` buffer is dropped (flowdit computes the same crop).
    """
    out: dict[str, torch.Tensor] = {}
    pairs = {
        "pos_embed.proj": "x_embedder.proj",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "pooled_embedder.0",
        "time_text_embed.text_embedder.linear_2": "pooled_embedder.2",
        "context_embedder": "context_embedder",
        "proj_out": "final_layer.linear",
    }
    for src, dst in pairs.items():
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = sd[f"{src}.{p}"]
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _scale_shift_to_shift_scale(sd[f"norm_out.linear.{p}"])
    for i in range(depth):
        s, d = f"transformer_blocks.{i}.", f"blocks.{i}."
        last = f"{s}attn.to_add_out.weight" not in sd
        per_block = {
            "norm1.linear": "adaLN_modulation.1",
            "attn.to_out.0": "attn.proj",
            "ff.net.0.proj": "mlp.fc1",
            "ff.net.2": "mlp.fc2",
        }
        if not last:
            per_block.update({"norm1_context.linear": "adaLN_modulation_txt.1", "attn.to_add_out": "attn.proj_txt",
                              "ff_context.net.0.proj": "mlp_txt.fc1", "ff_context.net.2": "mlp_txt.fc2"})
        for src, dst in per_block.items():
            for p in ("weight", "bias"):
                out[f"{d}{dst}.{p}"] = sd[f"{s}{src}.{p}"]
        if last:
            for p in ("weight", "bias"):
                out[f"{d}adaLN_modulation_txt.1.{p}"] = _scale_shift_to_shift_scale(sd[f"{s}norm1_context.linear.{p}"])
        for p in ("weight", "bias"):
            out[f"{d}attn.qkv.{p}"] = torch.cat([sd[f"{s}attn.to_{c}.{p}"] for c in "qkv"], dim=0)
            out[f"{d}attn.qkv_txt.{p}"] = torch.cat([sd[f"{s}attn.add_{c}_proj.{p}"] for c in "qkv"], dim=0)
        for src, dst in (("norm_q", "q_norm"), ("norm_k", "k_norm"), ("norm_added_q", "q_norm_txt"),
                         ("norm_added_k", "k_norm_txt")):
            key = f"{s}attn.{src}.weight"
            if key in sd:
                out[f"{d}attn.{dst}.weight"] = sd[key]
    return out


@torch.no_grad()
def mmdit_from_diffusers_sd3(transformer: nn.Module) -> MMDiT:
    """flowdit's ``MMDiT`` with the weights of a diffusers ``SD3Transformer2DModel``
    (float32, on the CPU, in eval mode); ``model(x, t, text_condition(prompt_embeds,
    pooled_prompt_embeds))`` equals ``transformer(x, encoder_hidden_states=prompt_embeds,
    pooled_projections=pooled_prompt_embeds, timestep=1000 t).sample``."""
    config = mmdit_config_from_diffusers_sd3(transformer.config)
    model = MMDiT(config)
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in transformer.state_dict().items()}
    model.load_state_dict(sd3_state_dict_to_mmdit(sd, config.depth), strict=True)
    return model.eval()
