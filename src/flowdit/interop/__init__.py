"""Bridges to models flowdit did not build (optional dependencies).

``flowdit.interop.diffusers`` wraps diffusers' ``SD3Transformer2DModel`` and
``FluxTransformer2DModel`` as flowdit velocity models (``pip install flowdit[diffusers]``).
``flowdit.interop.checkpoints`` imports the public DiT (DDPM epsilon) and SiT (linear-path
velocity) checkpoints into flowdit's DiT, wrapped as flowdit velocity models (no extra needed).
``flowdit.interop.mmdit_weights`` copies an ``SD3Transformer2DModel``'s weights into
flowdit's own ``MMDiT`` (docs/mmdit.md; reads the state dict only).
Nothing here is imported by ``import flowdit``.
"""
