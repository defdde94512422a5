"""The pluggable attention interface.

:class:`tfx.model.gpt.CausalSelfAttention` projects q, k, v and calls its ``kernel``
with tensors of shape ``(batch, heads, seq, head_dim)``; the kernel returns the same
shape. Swapping ``block.attn.kernel`` changes the attention pattern without touching
parameters, so checkpoints stay interchangeable between dense and sparse attention.
Kernels are parameter-free ``nn.Module`` s so they travel with ``deepcopy`` and
``model.apply``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttentionKernel(nn.Module):
    """Base class: ``forward(q, k, v) -> out``, all ``(B, H, T, D)``, causal."""

    #: short name used in logs and reports
    pattern: str = "dense"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return self.pattern


class DenseCausalAttention(AttentionKernel):
    """Full causal attention through ``scaled_dot_product_attention`` (flash / efficient
    kernels where the device has them)."""

    pattern = "dense"

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout

    def forward(self, q, k, v):
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
