"""Sparse attention as a SURGERY technique: swap every block's ``attn.kernel`` (tfx's
GPT), or switch a Hugging Face model's attention implementation to the same kernel
registered with transformers' ``AttentionInterface`` (Llama-like models and GPT-2; see
:func:`tfx.attention.kernels.register_hf_attention`).

Only the kernel changes, never a parameter, so a checkpoint trained with sparse
attention loads into a dense model and back. A resume, ``load_run`` and evaluate.py
re-apply the technique (it is SURGERY) before loading, so they rebuild the same
attention. Constructor arguments are the yaml keys
of ``conf/attention/*.yaml``. Values are checked in :meth:`SparseAttention.validate`
(not in ``__init__``), so a bad value reaches the user as a :class:`ConfigError`
rather than wrapped in Hydra's instantiation error.
"""
from __future__ import annotations

from typing import Union

from torch import nn

from tfx.attention.kernels import IMPLS, SparseKernel, make_kernel, register_hf_attention
from tfx.attention.patterns import FixedBlockSparse, GlobalLocal, Pattern, SlidingWindow, _check_int
from tfx.core.context import RunContext
from tfx.model.anatomy import spec_family, unwrap
from tfx.core.errors import ConfigError
from tfx.core.technique import Plan, Stage, Technique
from tfx.model.attention import AttentionKernel


#: model families whose attention the technique reaches (tests/test_hf_attention.py)
FAMILIES = ("tfx_gpt", "hf_llama", "hf_gpt2")


def apply_sparse_attention(model: nn.Module, kernel_or_pattern: Union[AttentionKernel, Pattern],
                           impl: str = "auto", tile: int = 64) -> nn.Module:
    """Make every attention layer of ``model`` use the sparse kernel, in place.

    Pass a ready kernel, or a :class:`Pattern` to get ``make_kernel(pattern, impl, tile)``
    (with the model's attention dropout, for tfx's GPT). tfx's GPT: one kernel instance
    replaces every block's ``attn.kernel`` (kernels hold no parameters, and sharing
    keeps one cache of layouts). A transformers model (also inside tfx's
    :class:`~tfx.model.hf.CausalLM` wrapper): the kernel is registered with
    ``AttentionInterface`` and set with ``set_attn_implementation``; the model's own
    attention modules then pass their q, k, v (GQA included), scaling and dropout to it.
    """
    lm = unwrap(model)
    if callable(getattr(lm, "set_attn_implementation", None)):
        kernel = kernel_or_pattern
        if isinstance(kernel, Pattern):
            kernel = make_kernel(kernel, impl, tile)
        if not isinstance(kernel, SparseKernel):
            raise ConfigError(f"{type(kernel).__name__} is not a tfx sparse kernel; Hugging Face "
                              "models take a Pattern or a kernel from tfx.attention.make_kernel")
        lm.set_attn_implementation(register_hf_attention(kernel))
        # for FLOPs per token (the pattern's density); kept out of the module tree
        lm.__dict__["tfx_attention_kernel"] = kernel
        return model
    owners = [m for m in model.modules() if isinstance(getattr(m, "kernel", None), AttentionKernel)]
    if not owners:
        raise ConfigError(f"{type(model).__name__} has no attention layer with a `kernel` "
                          "to replace; sparse attention needs tfx.model.GPT blocks or a "
                          "transformers model")
    kernel = kernel_or_pattern
    if isinstance(kernel, Pattern):
        dropout = getattr(owners[0].kernel, "dropout", 0.0)
        kernel = make_kernel(kernel, impl, tile, dropout)
    for owner in owners:
        owner.kernel = kernel
    return model


def hf_attention_conflict(config) -> str:
    """Why a transformers config's own attention pattern clashes with a tfx pattern
    ('' when it does not): sliding-window or other non-full layers of its own."""
    types = sorted(set(getattr(config, "layer_types", None) or ()) - {"full_attention"})
    if types:
        return f"layer_types {types}"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        return f"sliding_window={window}"
    return ""


class SparseAttention(Technique):
    """Base technique; subclasses only say which :class:`Pattern` they build."""

    stage = Stage.SURGERY

    def __init__(self, tile: int, impl: str) -> None:
        self.tile = tile
        self.impl = impl

    def pattern(self) -> Pattern:
        raise NotImplementedError

    def validate(self, plan: Plan) -> None:
        family = spec_family(plan.model)
        if plan.model is not None and family not in FAMILIES:
            raise ConfigError(f"attention={self.key} reaches the attention of {', '.join(FAMILIES)} "
                              f"models; {family or type(plan.model).__name__} is not one of them: "
                              f"use attention=dense")
        clash = hf_attention_conflict(getattr(plan.model, "config", None)) if family != "tfx_gpt" else ""
        if clash:
            raise ConfigError(f"attention={self.key}: the model already restricts its attention "
                              f"({clash}); use attention=dense to keep the model's own pattern")
        self.pattern()  # raises ConfigError naming the bad key
        _check_int(self.key, "tile", self.tile, 1)
        if self.impl not in IMPLS:
            raise ConfigError(f"attention.impl={self.impl!r} is unknown; choose one of {', '.join(IMPLS)}")
        if self.impl == "flex" and plan.device_type != "cuda":
            raise ConfigError("attention.impl=flex needs a CUDA device (FlexAttention has no "
                              f"backward on {plan.device_type}); use attention.impl=auto or blocked")

    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return apply_sparse_attention(model, self.pattern(), self.impl, self.tile)


class SlidingWindowAttention(SparseAttention):
    """Query ``i`` attends to keys ``(i - window, i]``; see :class:`SlidingWindow`."""

    name = "sliding_window"

    def __init__(self, window: int = 256, tile: int = 64, impl: str = "auto") -> None:
        super().__init__(tile, impl)
        self.window = window

    def pattern(self) -> Pattern:
        return SlidingWindow(self.window)


class BlockSparseAttention(SparseAttention):
    """Sparse Transformer "fixed": local blocks plus summary columns; see :class:`FixedBlockSparse`."""

    name = "block_sparse"

    def __init__(self, block: int = 64, stride: int = 64, tile: int = 64, impl: str = "auto") -> None:
        super().__init__(tile, impl)
        self.block = block
        self.stride = stride

    def pattern(self) -> Pattern:
        return FixedBlockSparse(self.block, self.stride)


class GlobalLocalAttention(SparseAttention):
    """First ``n_global`` tokens global, plus a sliding window; see :class:`GlobalLocal`."""

    name = "global_local"

    def __init__(self, window: int = 256, n_global: int = 16, tile: int = 64,
                 impl: str = "auto") -> None:
        super().__init__(tile, impl)
        self.window = window
        self.n_global = n_global

    def pattern(self) -> Pattern:
        return GlobalLocal(self.window, self.n_global)
