"""Sparse attention that skips the work it masks (GitHub issue 5).

``patterns`` says who attends to whom, ``blocked`` is the CPU kernel, ``kernels``
picks an implementation (and registers it with transformers' attention interface for
Hugging Face models), ``technique`` plugs it into the pipeline. Docs:
``docs/attention.md``.
"""
from tfx.attention.blocked import BlockedLayout, blocked_attention, build_layout
from tfx.attention.kernels import (IMPLS, AutoSparseKernel, BlockedSparseKernel, DenseMaskKernel,
                                   FlexSparseKernel, SparseKernel, hf_attention_name, make_kernel,
                                   register_hf_attention)
from tfx.attention.patterns import FixedBlockSparse, GlobalLocal, Pattern, SlidingWindow
from tfx.attention.technique import (BlockSparseAttention, GlobalLocalAttention, SlidingWindowAttention,
                                     SparseAttention, apply_sparse_attention)

__all__ = [
    "IMPLS", "AutoSparseKernel", "BlockSparseAttention", "BlockedLayout", "BlockedSparseKernel",
    "DenseMaskKernel", "FixedBlockSparse", "FlexSparseKernel", "GlobalLocal", "GlobalLocalAttention",
    "Pattern", "SlidingWindow", "SlidingWindowAttention", "SparseAttention", "SparseKernel",
    "apply_sparse_attention", "blocked_attention", "build_layout", "hf_attention_name", "make_kernel",
    "register_hf_attention",
]
