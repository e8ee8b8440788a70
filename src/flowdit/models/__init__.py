"""Models: the DiT, its layers, swappable attention processors, the registry, and frozen text encoders."""

from .attention import Attention, MathProcessor, SDPAProcessor
from .dit import DiT, DiTBlock, DiTConfig
from .registry import MODEL_CONFIGS, build_model, model_config
from .text_encoder import (
    HashEncoder, HFEncoder, MiniLMEncoder, TextCondition, TextEncoder, build_text_encoder, encode_cached,
)

__all__ = [
    "Attention",
    "DiT",
    "DiTBlock",
    "DiTConfig",
    "HFEncoder",
    "HashEncoder",
    "MODEL_CONFIGS",
    "MathProcessor",
    "MiniLMEncoder",
    "SDPAProcessor",
    "TextCondition",
    "TextEncoder",
    "build_model",
    "build_text_encoder",
    "encode_cached",
    "model_config",
]
