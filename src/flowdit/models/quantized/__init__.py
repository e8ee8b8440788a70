"""Quantized layers: quantizers, bit packing, rotations, fake-quant and int8 linears, storage.

The methods that choose what to quantize and how (calibration, SmoothQuant, LRQ-DiT)
live in :mod:`flowdit.compress`; this package holds what a stored quantized model needs
to run, so that loading one sits as low as loading any model.
"""

from .linear import FakeQuantLinear, Int8Linear, exact_onednn_int8, int8_backend
from .packing import pack_bits, packed_nbytes, unpack_bits
from .quantizers import (CLIP_QUANTILES, TWIN_LOG_ETAS, TwinLogWeight, UniformWeight, fake_quant_tokens,
                         quantize_tokens_int8, twin_log_quantize, uniform_quantize)
from .rotation import hadamard, random_hadamard
from .store import apply_quantized, decode_layer, encode_fake, encode_int8

__all__ = [
    "CLIP_QUANTILES", "TWIN_LOG_ETAS", "FakeQuantLinear", "Int8Linear", "TwinLogWeight", "UniformWeight",
    "apply_quantized", "decode_layer", "encode_fake", "encode_int8", "fake_quant_tokens", "hadamard",
    "exact_onednn_int8", "int8_backend", "pack_bits", "packed_nbytes", "quantize_tokens_int8", "random_hadamard",
    "twin_log_quantize", "uniform_quantize", "unpack_bits",
]
