"""Models: the DiT, the DDT (decoupled encoder / decoder), DiCo (a diffusion ConvNet), the MMDiT (SD3 / FLUX-style), their layers, swappable attention processors, the registry,
and frozen text encoders."""

from .attention import Attention, MathProcessor, SDPAProcessor
from .ddt import DDT, DDTConfig
from .dico import DiCo, DiCoConfig
from .dit import DiT, DiTBlock, DiTConfig
from .mmdit import MMDiT, MMDiTConfig, text_condition
from .mmdit_configs import MMDIT_CONFIGS
from .registry import DDT_CONFIGS, DICO_CONFIGS, MODEL_CONFIGS, build_model, model_config, model_names
from .text_encoder import (
    HashEncoder, HFEncoder, MiniLMEncoder, TextCondition, TextEncoder, build_text_encoder, encode_cached,
)

__all__ = [
    "Attention",
    "DDT",
    "DiCo",
    "DiCoConfig",
    "DICO_CONFIGS",
    "DDTConfig",
    "DDT_CONFIGS",
    "DiT",
    "DiTBlock",
    "DiTConfig",
    "HFEncoder",
    "HashEncoder",
    "MMDIT_CONFIGS",
    "MMDiT",
    "MMDiTConfig",
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
    "model_names",
    "text_condition",
]
