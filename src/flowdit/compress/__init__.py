"""Compression of trained models: post-training quantization (W8A8 in int8, LRQ-DiT) and
depth pruning (TinyFusion, block importance, the exhaustive oracle) with masked-KD recovery.

Calibration (:mod:`.calibrate`) and the quantization methods (:mod:`.quantize`) live here;
the layers a quantized model runs on, and how it is stored, are in
:mod:`flowdit.models.quantized`. Depth pruning: :mod:`.depth` (what the methods share),
:mod:`.tinyfusion`, :mod:`.block_importance`, :mod:`.recovery`, :mod:`.prune` (end to end).
"""

from .calibrate import DEFAULT_LAYERS, LayerStats, calibrate, target_linears
from .depth import FlowStream, keep_blocks, oracle_subsets, subset_loss
from .prune import PRUNE_METHODS, PruneConfig, select_blocks
from .quantize import PRESETS, QuantizeConfig, preset, quantize_model, smooth_factors
from .recovery import RecoveryConfig, recover
from .tinyfusion import tinyfusion_search

__all__ = ["DEFAULT_LAYERS", "FlowStream", "LayerStats", "PRESETS", "PRUNE_METHODS", "PruneConfig", "QuantizeConfig",
           "RecoveryConfig", "calibrate", "keep_blocks", "oracle_subsets", "preset", "quantize_model", "recover",
           "select_blocks", "smooth_factors", "subset_loss", "target_linears", "tinyfusion_search"]
