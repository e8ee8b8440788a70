"""Named MMDiT configurations (looked up through ``flowdit.models.registry``).

Tiny ones for tests and CPU training on the captioned shapes data (text width 384, the
token and pooled width of all-MiniLM-L6-v2), and the paper sizes: SD3-medium and
SD3.5-large (Esser et al. 2024; diffusers' ``SD3Transformer2DModel`` configs of
``stabilityai/stable-diffusion-3-medium`` and ``-3.5-large``) and a FLUX.1-shaped model
(19 double + 38 single-stream blocks, ``FluxTransformer2DModel``'s defaults). Each entry
gives every architecture field, including its own ``input_size`` (image or latent side)
and ``in_channels``; ``build_model`` may replace them.
"""

from __future__ import annotations

MMDIT_CONFIGS: dict[str, dict] = {
    # For tests: a few tens of thousands of parameters, SD3-style (sin-cos, last block context_pre_only).
    "MMDiT-tiny": dict(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, single_depth=0,
                       num_heads=2, text_dim=24, pooled_dim=16),
    # For tests: FLUX-style (RoPE over (index, row, column), QK-norm, 1 double + 2 single blocks).
    "FLUX-tiny": dict(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=1, single_depth=2,
                      num_heads=2, text_dim=24, pooled_dim=16, qk_norm=True, pos_embed="rope", axes_dims=(4, 6, 6)),
    # For tests of text-conditioned training: the hash encoder's default widths (64).
    "MMDiT-hash-tiny": dict(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, single_depth=0,
                            num_heads=2, text_dim=64, pooled_dim=64, qk_norm=True),
    # Captioned shapes, 16x16x4 autoencoder latents, patch 2: 64 image tokens; MiniLM text (384).
    "MMDiT-shapes": dict(input_size=16, in_channels=4, patch_size=2, hidden_size=128, depth=6, single_depth=0,
                         num_heads=4, text_dim=384, pooled_dim=384, qk_norm=True),
    # Captioned shapes in pixels, 64x64x3, patch 4: 256 image tokens.
    "MMDiT-shapes-px": dict(input_size=64, in_channels=3, patch_size=4, hidden_size=128, depth=6, single_depth=0,
                            num_heads=4, text_dim=384, pooled_dim=384, qk_norm=True),
    # Captioned shapes latents, FLUX-style: 2 double + 6 single-stream blocks, RoPE.
    "FLUX-shapes": dict(input_size=16, in_channels=4, patch_size=2, hidden_size=128, depth=2, single_depth=6,
                        num_heads=4, text_dim=384, pooled_dim=384, qk_norm=True, pos_embed="rope",
                        axes_dims=(8, 12, 12)),
    # stabilityai/stable-diffusion-3-medium: 24 blocks, 24 heads of 64, 128x128x16 latents (1024 px).
    "SD3-medium": dict(input_size=128, in_channels=16, patch_size=2, hidden_size=1536, depth=24, single_depth=0,
                       num_heads=24, text_dim=4096, pooled_dim=2048, pos_embed_max_size=192),
    # stabilityai/stable-diffusion-3.5-large: 38 blocks, 38 heads of 64, RMS QK-norm.
    "SD3.5-large": dict(input_size=128, in_channels=16, patch_size=2, hidden_size=2432, depth=38, single_depth=0,
                        num_heads=38, text_dim=4096, pooled_dim=2048, pos_embed_max_size=192, qk_norm=True),
    # FLUX.1 shape: 19 double + 38 single blocks, 24 heads of 128, 2x2 patches of 16 latent
    # channels (FLUX's 64 packed input channels), CLIP-L pooled 768; no guidance embedding
    # (FLUX.1-schnell; ``guidance_embed=True`` gives FLUX.1-dev's).
    "FLUX-like": dict(input_size=128, in_channels=16, patch_size=2, hidden_size=3072, depth=19, single_depth=38,
                      num_heads=24, text_dim=4096, pooled_dim=768, qk_norm=True, pos_embed="rope",
                      axes_dims=(16, 56, 56)),
}
