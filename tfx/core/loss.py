"""Token-level language-model loss that makes gradient accumulation exact.

Each micro-batch contributes ``sum of token cross-entropies / norm`` where ``norm``
is the number of target tokens in the whole accumulated (and, under data
parallelism, global) batch. Summed over micro-steps (and averaged by DDP over
ranks after multiplying by the world size) this is exactly the mean over the large
batch, even when micro-batches hold different numbers of real targets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over non-ignored targets, computed in fp32."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
