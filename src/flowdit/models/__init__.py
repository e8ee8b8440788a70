"""Models: the DiT, its layers, swappable attention processors and the registry."""

from .attention import Attention, MathProcessor, SDPAProcessor
from .dit import DiT, DiTBlock, DiTConfig
from .registry import MODEL_CONFIGS, build_model, model_config

__all__ = [
    "Attention",
    "DiT",
    "DiTBlock",
    "DiTConfig",
    "MODEL_CONFIGS",
    "MathProcessor",
    "SDPAProcessor",
    "build_model",
    "model_config",
]
