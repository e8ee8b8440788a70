"""Text-to-image inference: a text-conditioned run loaded with its text encoder and, for a
latent model, its autoencoder; images generated from prompts.

A run trained by ``flowdit train`` with ``text.encoder`` set records the encoder it used
(``meta["text"]``) and, when it trained on a latent cache, that cache's autoencoder
(``meta["latents"]["source"]["autoencoder"]``); :func:`load_text_run` restores all three,
so ``generate_from_prompts`` returns decoded pixels in ``[-1, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError
from .generate import generate
from .loading import load_run_model

__all__ = ["TextRun", "load_text_run", "encode_prompts", "generate_from_prompts"]


@dataclass
class TextRun:
    """A loaded text-to-image run: the model, its text encoder, its latent space (``None``
    for a pixel model), the shape it samples (latent or image ``(C, H, W)``), the flow
    shift and the run's metadata."""

    model: torch.nn.Module
    encoder: object
    space: Optional[torch.nn.Module]
    shape: tuple[int, int, int]
    shift: float
    meta: dict

    def sample_shape(self, height: Optional[int] = None, width: Optional[int] = None) -> tuple[int, int, int]:
        """The ``(C, h, w)`` the model samples for images of ``height x width`` pixels
        (``None``: the trained size). A latent run divides by its autoencoder's factor; both
        sides must be multiples of that factor times the patch size."""
        c, h0, w0 = self.shape
        factor = self.space.factor if self.space is not None else 1
        patch = self.model.config.patch_size  # text runs are MMDiTs (validated at training)
        step = factor * patch
        out = []
        for name, v, default in (("height", height, h0), ("width", width, w0)):
            if v is None:
                out.append(default)
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % step:
                raise ConfigError(f"{name} must be a positive multiple of {step} pixels (autoencoder factor "
                                  f"{factor} x patch size {patch}), got {v!r}")
            out.append(v // factor)
        return (c, out[0], out[1])


def load_text_run(path: str | Path, use_ema: bool = True) -> TextRun:
    """Load a text-conditioned run directory (or checkpoint); refuses a class-conditional one."""
    from ..models.text_encoder import build_text_encoder

    model, meta = load_run_model(path, use_ema=use_ema)
    text = meta.get("text")
    if text is None:
        raise ConfigError("a class-conditional run: prompts need a run trained with text.encoder")
    encoder = build_text_encoder(text["encoder"], max_length=int(text.get("max_length", 32)))
    if encoder.identity != text.get("identity", encoder.identity):
        raise CheckpointError(f"{path}: trained with text encoder {text['identity']}, but {encoder.identity} is "
                              "what loads here (another model folder or version)")
    space = None
    latents = meta.get("latents")
    if latents:
        from ..models.autoencoder import LatentSpace

        folder = latents.get("source", {}).get("autoencoder")
        if not folder or not Path(folder).is_dir():
            raise CheckpointError(f"{path}: trained on latents of the autoencoder {folder!r}, which is not there; "
                                  "it is needed to decode samples")
        space = LatentSpace.from_pretrained(folder)
    shape = tuple(meta["data"]["shape"])
    shift = float(meta.get("config", {}).get("flow", {}).get("shift", 1.0))
    return TextRun(model, encoder, space, shape, shift, meta)  # type: ignore[arg-type]


def encode_prompts(encoder, prompts: Sequence[str]) -> dict:
    """``{"tokens" [N, L, D], "mask" [N, L], "pooled" [N, P]}`` of ``prompts`` (float32)."""
    enc = encoder.encode(list(prompts))
    return {"tokens": enc["tokens"].float(), "mask": enc["mask"], "pooled": enc["pooled"].float()}


@torch.no_grad()
def generate_from_prompts(run: TextRun, prompts: Sequence[str], solver: str = "euler", steps: int = 28,
                          cfg_scale: float = 4.0, seed: int = 0, negative: str = "", amp_dtype=None,
                          batch_size: int = 64, accel=None, progress: bool = False,
                          first_index: int = 0, height: Optional[int] = None,
                          width: Optional[int] = None) -> tuple[Tensor, int]:
    """One image per prompt: ``(images [N, C, H, W] in [-1, 1], NFE per image)`` at
    ``height x width`` pixels (default: the trained size; :meth:`TextRun.sample_shape`;
    sizes other than trained need position embeddings that extend, e.g. RoPE with
    ``MMDiT.set_extrapolation``, docs/resolution.md). Guidance
    contrasts each prompt with ``negative`` (the empty prompt by default: the null
    condition the model was trained with). Sample ``i`` uses the noise of ``(seed, first_index + i)``."""
    if not prompts:
        raise ConfigError("no prompts given")
    shape = run.sample_shape(height, width)
    cond = encode_prompts(run.encoder, prompts)
    null = encode_prompts(run.encoder, [negative])
    out = generate(run.model, cond, shape, solver=solver, steps=steps, cfg_scale=cfg_scale, shift=run.shift,
                   seed=seed, batch_size=batch_size, amp_dtype=amp_dtype, progress=progress, accel=accel,
                   null=null, clamp=run.space is None, first_index=first_index)
    x = out.images
    if run.space is not None:
        x = torch.cat([run.space.decode(x[i:i + 100]).float() for i in range(0, len(x), 100)]).clamp(-1, 1)
    return x, out.nfe
