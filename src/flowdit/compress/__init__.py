"""Compression of trained models: post-training quantization (W8A8 in int8, LRQ-DiT) and
depth pruning (TinyFusion, block importance, the exhaustive oracle) with masked-KD recovery,
and adaptation to a new data set (Diffscaler's Affiner, LoRA, full fine-tuning).

Calibration (:mod:`.calibrate`) and the quantization methods (:mod:`.quantize`) live here;
the layers a quantized model runs on, and how it is stored, are in
:mod:`flowdit.models.quantized`. Depth pruning: :mod:`.depth` (what the methods share),
:mod:`.tinyfusion`, :mod:`.block_importance`, :mod:`.recovery`, :mod:`.prune` (end to end).
Adaptation: :mod:`.adapt` (the Affiner layer itself is :mod:`flowdit.models.adapters`).
"""

from .adapt import ADAPT_METHODS, AdaptConfig, adapt
from .calibrate import DEFAULT_LAYERS, LayerStats, calibrate, target_linears
from .depth import FlowStream, keep_blocks, oracle_subsets, subset_loss
from .prune import PRUNE_METHODS, PruneConfig, select_blocks
from .quantize import PRESETS, QuantizeConfig, preset, quantize_model, smooth_factors
from .recovery import RecoveryConfig, recover
from .tinyfusion import tinyfusion_search

__all__ = ["ADAPT_METHODS", "AdaptConfig", "DEFAULT_LAYERS", "FlowStream", "LayerStats", "PRESETS", "PRUNE_METHODS", "PruneConfig", "QuantizeConfig",
           "RecoveryConfig", "adapt", "calibrate", "keep_blocks", "oracle_subsets", "preset", "quantize_model", "recover",
           "select_blocks", "smooth_factors", "subset_loss", "target_linears", "tinyfusion_search"]
