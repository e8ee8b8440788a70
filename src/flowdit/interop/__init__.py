"""Bridges to models flowdit did not build (optional dependencies).

``flowdit.interop.diffusers`` wraps diffusers' ``SD3Transformer2DModel`` and
``FluxTransformer2DModel`` as flowdit velocity models (``pip install flowdit[diffusers]``).
Nothing here is imported by ``import flowdit``.
"""
