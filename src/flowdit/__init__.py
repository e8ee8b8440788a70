"""flowdit: rectified-flow diffusion transformers.

Conventions (see docs/conventions.md): images are ``[B, C, H, W]`` in ``[-1, 1]``;
time ``t`` in ``[0, 1]`` with t = 0 data and t = 1 noise; the path is
``x_t = (1 - t) x0 + t eps`` and a model predicts the velocity ``v = eps - x0``.
"""

__version__ = "0.1.0"
