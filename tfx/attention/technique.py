"""Sparse attention as a SURGERY technique: swap every block's ``attn.kernel``.

Only the kernel changes, never a parameter, so a checkpoint trained with sparse
attention loads into a dense model and back. Constructor arguments are the yaml keys
of ``conf/attention/*.yaml``. Values are checked in :meth:`SparseAttention.validate`
(not in ``__init__``), so a bad value reaches the user as a :class:`ConfigError`
rather than wrapped in Hydra's instantiation error.
"""
from __future__ import annotations

from typing import Union

from torch import nn

from tfx.attention.kernels import IMPLS, make_kernel
from tfx.attention.patterns import FixedBlockSparse, GlobalLocal, Pattern, SlidingWindow, _check_int
from tfx.core.context import RunContext
from tfx.model.anatomy import require_own_gpt
from tfx.core.errors import ConfigError
from tfx.core.technique import Plan, Stage, Technique
from tfx.model.attention import AttentionKernel


def apply_sparse_attention(model: nn.Module, kernel_or_pattern: Union[AttentionKernel, Pattern],
                           impl: str = "auto", tile: int = 64) -> nn.Module:
    """Replace the attention kernel of every attention layer of ``model`` in place.

    Pass a ready kernel, or a :class:`Pattern` to get ``make_kernel(pattern, impl, tile)``
    with the model's attention dropout. One kernel instance is shared by all layers:
    kernels hold no parameters, and sharing keeps one cache of layouts.
    """
    owners = [m for m in model.modules() if isinstance(getattr(m, "kernel", None), AttentionKernel)]
    if not owners:
        raise ConfigError(f"{type(model).__name__} has no attention layer with a `kernel` "
                          "to replace; sparse attention needs tfx.model.GPT blocks")
    kernel = kernel_or_pattern
    if isinstance(kernel, Pattern):
        dropout = getattr(owners[0].kernel, "dropout", 0.0)
        kernel = make_kernel(kernel, impl, tile, dropout)
    for owner in owners:
        owner.kernel = kernel
    return model


class SparseAttention(Technique):
    """Base technique; subclasses only say which :class:`Pattern` they build."""

    stage = Stage.SURGERY

    def __init__(self, tile: int, impl: str) -> None:
        self.tile = tile
        self.impl = impl

    def pattern(self) -> Pattern:
        raise NotImplementedError

    def validate(self, plan: Plan) -> None:
        require_own_gpt(plan, f"attention={self.key}", "replaces the attention kernel")
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
