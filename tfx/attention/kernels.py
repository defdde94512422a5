"""Sparse attention kernels: the same pattern, three implementations.

* ``blocked``: a band of key tiles per query tile, one batched SDPA call
  (:mod:`tfx.attention.blocked`); CPU training, works on CUDA too.
* ``flex``: compiled ``flex_attention`` with a cached ``BlockMask``; CUDA training.
* ``dense_mask``: SDPA with the dense ``(T, T)`` boolean mask; the reference.
* ``auto`` (default): ``flex`` for CUDA tensors without attention dropout, else ``blocked``.

All are parameter-free :class:`~tfx.model.attention.AttentionKernel` s, so swapping
them never changes a checkpoint.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from tfx.attention.blocked import BlockedLayout, blocked_attention, build_layout
from tfx.attention.patterns import Pattern
from tfx.core.errors import ConfigError
from tfx.model.attention import AttentionKernel

IMPLS = ("auto", "blocked", "flex", "dense_mask")


class SparseKernel(AttentionKernel):
    """Shared constructor and ``extra_repr``; ``spec`` is the :class:`Pattern`."""

    impl = "?"

    def __init__(self, pattern: Pattern, dropout: float = 0.0) -> None:
        super().__init__()
        self.spec = pattern  # ``self.pattern`` is the base class's short name (a str)
        self.pattern = pattern.name
        self.dropout = dropout

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0

    def extra_repr(self) -> str:
        return f"{self.spec}, impl={self.impl}"


class DenseMaskKernel(SparseKernel):
    """SDPA with the pattern's dense boolean mask: O(T^2) work, the reference for tests."""

    impl = "dense_mask"

    def forward(self, q, k, v):
        mask = _dense_mask(self.spec, q.shape[-2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self._dropout_p())


class BlockedSparseKernel(SparseKernel):
    """Gathers only the key tiles each query tile needs; see :mod:`tfx.attention.blocked`.

    ``tile`` trades gather overhead against wasted scores: a sliding window of width
    W scores ``(ceil((W - 1) / tile) + 1) * tile`` keys per query.
    """

    impl = "blocked"

    def __init__(self, pattern: Pattern, tile: int = 64, dropout: float = 0.0) -> None:
        super().__init__(pattern, dropout)
        self.tile = tile

    @torch.compiler.disable  # a cached lookup; traced, it would rebuild the mask every call
    def layout(self, seq_len: int, device=torch.device("cpu")) -> BlockedLayout:
        """The gather plan, exposed so tests and benchmarks can count the work done."""
        return build_layout(self.spec, seq_len, self.tile, torch.device(device))

    def forward(self, q, k, v):
        layout = self.layout(q.shape[-2], q.device)
        return blocked_attention(q, k, v, layout, dropout_p=self._dropout_p())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tile={self.tile}"


class FlexSparseKernel(SparseKernel):
    """``flex_attention`` with a block mask cached per (T, device); CUDA only.

    ``flex_attention`` is compiled once per process: eager mode falls back to a
    dense reference that materialises the scores. No attention dropout (FlexAttention
    has none): ``auto`` then uses the blocked kernel.
    """

    impl = "flex"

    def forward(self, q, k, v):
        if self._dropout_p() > 0:
            raise ConfigError("FlexAttention has no attention dropout; set model.dropout=0 "
                              "or attention.impl=blocked")
        block_mask = _flex_block_mask(self.spec, q.shape[-2], q.device)
        return _compiled_flex()(q, k, v, block_mask=block_mask)


class AutoSparseKernel(SparseKernel):
    """FlexAttention for CUDA tensors, the blocked kernel otherwise (flex cannot train on
    CPU), and also while attention dropout is active (flex has no dropout)."""

    impl = "auto"

    def __init__(self, pattern: Pattern, tile: int = 64, dropout: float = 0.0) -> None:
        super().__init__(pattern, dropout)
        self.blocked = BlockedSparseKernel(pattern, tile, dropout)
        self.flex = FlexSparseKernel(pattern, dropout)

    def forward(self, q, k, v):
        use_flex = q.is_cuda and self._dropout_p() == 0
        return self.flex(q, k, v) if use_flex else self.blocked(q, k, v)


def make_kernel(pattern: Pattern, impl: str = "auto", tile: int = 64,
                dropout: float = 0.0) -> SparseKernel:
    """The kernel for ``impl`` (one of :data:`IMPLS`)."""
    if impl == "auto":
        return AutoSparseKernel(pattern, tile, dropout)
    if impl == "blocked":
        return BlockedSparseKernel(pattern, tile, dropout)
    if impl == "flex":
        return FlexSparseKernel(pattern, dropout)
    if impl == "dense_mask":
        return DenseMaskKernel(pattern, dropout)
    raise ConfigError(f"attention.impl={impl!r} is unknown; choose one of {', '.join(IMPLS)}")


@lru_cache(maxsize=8)
def _dense_mask(pattern: Pattern, seq_len: int, device: torch.device) -> torch.Tensor:
    return pattern.mask(seq_len, device)


@torch.compiler.disable  # built once per (T, device) outside the compiled graph
@lru_cache(maxsize=64)
def _flex_block_mask(pattern: Pattern, seq_len: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        # A plain function: FlexAttention counts a bound method's ``self`` as a fifth
        # argument and would take it for a score_mod.
        return pattern.mask_mod(b, h, q_idx, kv_idx)

    # B=None, H=None: one mask broadcast over batch and heads.
    return create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device)


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)
