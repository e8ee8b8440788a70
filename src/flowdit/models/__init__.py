"""Models: the DiT, the MMDiT (SD3 / FLUX-style), their layers, swappable attention processors and the registry."""

from .attention import Attention, MathProcessor, SDPAProcessor
from .dit import DiT, DiTBlock, DiTConfig
from .mmdit import MMDiT, MMDiTConfig, text_condition
from .mmdit_configs import MMDIT_CONFIGS
from .registry import MODEL_CONFIGS, build_model, model_config, model_names

__all__ = [
    "Attention",
    "DiT",
    "DiTBlock",
    "DiTConfig",
    "MMDIT_CONFIGS",
    "MMDiT",
    "MMDiTConfig",
    "MODEL_CONFIGS",
    "MathProcessor",
    "SDPAProcessor",
    "build_model",
    "model_config",
    "model_names",
    "text_condition",
]
