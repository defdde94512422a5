"""One-shot, calibration-based compression of decoder layers: Wanda, SparseGPT, GPTQ.

Plain functions on ``(out, in)`` weight matrices and input statistics, plus the
layer-by-layer driver :func:`compress_sequential` that feeds them calibration data.
"""
from tfx.compression.oneshot.gptq import (GPTQCompressor, QuantizedWeight, dequantize,
                                          gptq_quantize, rtn_quantize)
from tfx.compression.oneshot.sequential import (calibration_batches, capture_layer_inputs,
                                                compress_sequential)
from tfx.compression.oneshot.sparsegpt import SparseGPTCompressor, sparsegpt_prune
from tfx.compression.oneshot.stats import (LinearStats, StatsCollector, compressible_modules,
                                           set_weight_matrix, weight_matrix)
from tfx.compression.oneshot.wanda import (WandaCompressor, magnitude_mask, mask_from_scores,
                                           wanda_mask)

__all__ = [
    "GPTQCompressor", "LinearStats", "QuantizedWeight", "SparseGPTCompressor",
    "StatsCollector", "WandaCompressor", "calibration_batches", "capture_layer_inputs",
    "compress_sequential", "compressible_modules", "dequantize", "gptq_quantize",
    "magnitude_mask", "mask_from_scores", "rtn_quantize", "set_weight_matrix",
    "sparsegpt_prune", "wanda_mask", "weight_matrix",
]
