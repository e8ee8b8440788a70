"""Compression of trained models: post-training quantization (W8A8 in int8, LRQ-DiT).

Calibration (:mod:`.calibrate`) and the methods (:mod:`.quantize`) live here; the layers
a compressed model runs on, and how it is stored, are in :mod:`flowdit.models.quantized`.
"""

from .calibrate import DEFAULT_LAYERS, LayerStats, calibrate, target_linears
from .quantize import PRESETS, QuantizeConfig, preset, quantize_model, smooth_factors

__all__ = ["DEFAULT_LAYERS", "LayerStats", "PRESETS", "QuantizeConfig", "calibrate", "preset", "quantize_model",
           "smooth_factors", "target_linears"]
