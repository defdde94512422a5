"""Sparse attention kernels: the same pattern, three implementations.

* ``blocked``: a band of key tiles per query tile, one batched SDPA call
  (:mod:`tfx.attention.blocked`); CPU training, works on CUDA too.
* ``flex``: compiled ``flex_attention`` with a cached ``BlockMask``; CUDA training.
* ``dense_mask``: SDPA with the dense ``(T, T)`` boolean mask; the reference.
* ``auto`` (default): ``flex`` for CUDA tensors without attention dropout, else ``blocked``.

All are parameter-free :class:`~tfx.model.attention.AttentionKernel` s, so swapping
them never changes a checkpoint. ``kernel(q, k, v)`` is what tfx's GPT calls;
``kernel.attend(q, k, v, dropout_p, scale)`` is the same computation with the dropout
and the softmax scale given by the caller, and with grouped-query attention (fewer KV
heads than query heads) in every implementation.

Hugging Face models reach the same kernels through transformers' attention interface:
:func:`register_hf_attention` registers a kernel under a name of its own with
``AttentionInterface`` (and ``AttentionMaskInterface``), and the model is switched to
it with ``set_attn_implementation`` (no module is patched).
"""
from __future__ import annotations

from dataclasses import fields
from functools import lru_cache, partial
from typing import Optional

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

    def forward(self, q, k, v):
        return self.attend(q, k, v, self._dropout_p())

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
               scale: Optional[float] = None) -> torch.Tensor:
        """``q`` ``(B, Hq, T, D)``, ``k``/``v`` ``(B, Hkv, T, D)`` with ``Hkv`` dividing
        ``Hq`` (query head ``h`` uses KV head ``h // (Hq / Hkv)``, transformers'
        ``repeat_kv`` order); ``scale`` None: ``1/sqrt(D)``. Returns ``(B, Hq, T, Dv)``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.spec}, impl={self.impl}"


def _groups(q: torch.Tensor, k: torch.Tensor) -> int:
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    return q.shape[1] // k.shape[1]


class DenseMaskKernel(SparseKernel):
    """SDPA with the pattern's dense boolean mask: O(T^2) work, the reference for tests."""

    impl = "dense_mask"

    def attend(self, q, k, v, dropout_p=0.0, scale=None):
        mask = _dense_mask(self.spec, q.shape[-2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=_groups(q, k) > 1)


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
    def layout(self, seq_len: int, device=torch.device("cpu"), groups: int = 1) -> BlockedLayout:
        """The gather plan, exposed so tests and benchmarks can count the work done."""
        return build_layout(self.spec, seq_len, self.tile, torch.device(device), groups)

    def attend(self, q, k, v, dropout_p=0.0, scale=None):
        layout = self.layout(q.shape[-2], q.device, _groups(q, k))
        return blocked_attention(q, k, v, layout, dropout_p=dropout_p, scale=scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tile={self.tile}"


class FlexSparseKernel(SparseKernel):
    """``flex_attention`` with a block mask cached per (T, device); CUDA only.

    ``flex_attention`` is compiled once per process: eager mode falls back to a
    dense reference that materialises the scores. No attention dropout (FlexAttention
    has none): ``auto`` then uses the blocked kernel.
    """

    impl = "flex"

    def attend(self, q, k, v, dropout_p=0.0, scale=None):
        if dropout_p > 0:
            raise ConfigError("FlexAttention has no attention dropout; set the model's attention "
                              "dropout to 0 or attention.impl=blocked")
        block_mask = _flex_block_mask(self.spec, q.shape[-2], q.device)
        return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale,
                                enable_gqa=_groups(q, k) > 1)


class AutoSparseKernel(SparseKernel):
    """FlexAttention for CUDA tensors, the blocked kernel otherwise (flex cannot train on
    CPU), and also while attention dropout is active (flex has no dropout)."""

    impl = "auto"

    def __init__(self, pattern: Pattern, tile: int = 64, dropout: float = 0.0) -> None:
        super().__init__(pattern, dropout)
        self.blocked = BlockedSparseKernel(pattern, tile, dropout)
        self.flex = FlexSparseKernel(pattern, dropout)

    def attend(self, q, k, v, dropout_p=0.0, scale=None):
        use_flex = q.is_cuda and dropout_p == 0
        return (self.flex if use_flex else self.blocked).attend(q, k, v, dropout_p, scale)


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


# --- Hugging Face models: transformers' attention interface -----------------------------

def hf_attention_name(kernel: SparseKernel) -> str:
    """The name a kernel is registered under: pattern, its parameters, impl and tile,
    e.g. ``tfx_sliding_window_window256_auto_tile64``."""
    spec = kernel.spec
    params = "_".join(f"{f.name}{getattr(spec, f.name)}" for f in fields(spec))
    tile = getattr(kernel, "tile", None) or getattr(getattr(kernel, "blocked", None), "tile", None)
    return f"tfx_{spec.name}_{params}_{kernel.impl}" + (f"_tile{tile}" if tile else "")


def register_hf_attention(kernel: SparseKernel) -> str:
    """Register ``kernel`` with transformers' ``AttentionInterface`` (the attention
    function) and ``AttentionMaskInterface`` (the mask builder) and return the name;
    ``model.set_attn_implementation(name)`` then routes every attention layer of a
    transformers model that uses the interface (Llama-like, GPT-2, ...) through it.

    The attention function receives transformers' ``(module, query, key, value,
    attention_mask, dropout, scaling, **kwargs)`` with ``query`` ``(B, Hq, T, D)`` and
    ``key``/``value`` ``(B, Hkv, T, D)`` (GQA: fewer KV heads; the kernel groups the
    query heads, see :meth:`SparseKernel.attend`) and returns ``(B, T, Hq, D)``. It
    uses the module's own ``scaling`` and attention dropout. The mask builder makes no
    mask (the pattern is the mask) and refuses inputs the pattern cannot express:
    padding, or a mask other than plain causal (packed sequences, a model's own sliding
    window). Decoding with a KV cache (fewer queries than keys) falls back to SDPA with
    the pattern's rows for the new positions, so ``generate`` stays correct."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = hf_attention_name(kernel)
    AttentionInterface.register(name, partial(_hf_attention, kernel))
    AttentionMaskInterface.register(name, partial(_hf_mask, kernel.spec))
    return name


def _hf_refuse(pattern: Pattern, what: str) -> ConfigError:
    return ConfigError(f"attention={pattern.name} on a Hugging Face model got {what}; tfx's sparse "
                       f"patterns replace plain causal attention on unpadded sequences (tfx trains on "
                       f"packed blocks): drop the padding or use the model's dense attention")


def _hf_mask(pattern: Pattern, attention_mask=None, mask_function=None, **_) -> None:
    from transformers.masking_utils import causal_mask_function

    if attention_mask is not None and not bool(attention_mask.all()):
        raise _hf_refuse(pattern, "an attention_mask with padding")
    if mask_function is not causal_mask_function:
        raise _hf_refuse(pattern, "a mask other than plain causal (packed sequences through "
                                  "position_ids, or a sliding window of the model's own)")
    return None


_HF_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias", "sliding_window")


def _hf_attention(kernel: SparseKernel, module, query, key, value, attention_mask,
                  dropout: float = 0.0, scaling: Optional[float] = None, **kwargs):
    pattern = kernel.spec
    if attention_mask is not None:
        raise _hf_refuse(pattern, "a prepared attention mask")
    extra = [k for k in _HF_UNSUPPORTED if kwargs.get(k) is not None]
    if extra:
        raise _hf_refuse(pattern, f"attention arguments it cannot honour ({', '.join(extra)})")
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if q_len == kv_len:
        out = kernel.attend(query, key, value, dropout_p=dropout, scale=scaling)
    else:  # decoding with a KV cache: the new queries are the last q_len positions
        q_idx = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
        kv_idx = torch.arange(kv_len, device=query.device)[None, :]
        mask = pattern.mask_mod(None, None, q_idx, kv_idx)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                             scale=scaling, enable_gqa=_groups(query, key) > 1)
    return out.transpose(1, 2).contiguous(), None
