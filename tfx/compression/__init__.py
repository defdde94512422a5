"""Model compression: pruning, sparse storage, quantization, distillation, low-rank,
compressed exports, one-shot calibrated methods (Wanda, SparseGPT, GPTQ; ``oneshot/``),
LoRA fine-tuning (peft).
Each module has plain functions (usable without Hydra) and a thin
:class:`tfx.core.Technique` for ``compression=[...]``. See docs/compression.md."""
from tfx.compression.distill import Distillation, kd_loss_sum
from tfx.compression.export import CompressedExport, load_compressed, save_compressed
from tfx.compression.lora import LoRA, apply_lora
from tfx.compression.lowrank import LowRank, apply_lowrank, factorize
from tfx.compression.oneshot.storage import load_gptq, read_gptq, save_gptq
from tfx.compression.oneshot.technique import GPTQ, SparseGPT, Wanda
from tfx.compression.prune import (MagnitudePruning, NMPruning, cubic_sparsity, magnitude_prune,
                                   make_permanent, nm_prune, sparsity)
from tfx.compression.quantize import PostTrainingQuant, QAT, quantize_model
from tfx.compression.reload import conform_to_state_dict, inference_state_dict, load_compressed_state
from tfx.compression.sparse_storage import load_sparse, save_sparse
from tfx.compression.structured import StructuredPruning, prune_structured

__all__ = [
    "CompressedExport", "Distillation", "GPTQ", "LoRA", "LowRank", "MagnitudePruning", "NMPruning",
    "PostTrainingQuant", "QAT", "SparseGPT", "StructuredPruning", "Wanda", "apply_lora", "apply_lowrank",
    "conform_to_state_dict", "cubic_sparsity", "factorize", "inference_state_dict", "kd_loss_sum",
    "load_compressed", "load_compressed_state", "load_gptq", "load_sparse", "magnitude_prune",
    "make_permanent", "nm_prune", "prune_structured", "quantize_model", "read_gptq",
    "save_compressed", "save_gptq", "save_sparse", "sparsity",
]
