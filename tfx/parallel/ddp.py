"""Distributed data parallel: one full replica per rank, gradients all-reduced.

``no_sync`` skips the all-reduce on all but the last micro-step of gradient
accumulation; gradients accumulate locally and the last backward reduces their sum,
which (with the loop's global token normaliser) equals the large-batch gradient.
"""
from __future__ import annotations

import contextlib
from typing import Optional

from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from tfx.core import ConfigError, RunContext, Stage
from tfx.parallel.base import ParallelTechnique

#: DDP bucket size that makes one bucket of any model we train (PowerSGD on gloo).
SINGLE_BUCKET_MB = 1e6


def apply_ddp(model: nn.Module, ctx: RunContext, bucket_cap_mb: Optional[float] = None,
              gradient_as_bucket_view: bool = True) -> DistributedDataParallel:
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    kwargs = {} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}
    return DistributedDataParallel(model, device_ids=device_ids,
                                   gradient_as_bucket_view=gradient_as_bucket_view,
                                   find_unused_parameters=ctx.facts.has_unused_parameters, **kwargs)


class DDP(ParallelTechnique):
    stage = Stage.DATA_PARALLEL
    name = "ddp"
    data_parallel = "ddp"

    def __init__(self, nproc_per_node: Optional[int] = None, bucket_cap_mb: Optional[float] = None,
                 gradient_as_bucket_view: bool = True) -> None:
        super().__init__(nproc_per_node)
        if bucket_cap_mb is not None and not 0 < bucket_cap_mb <= 1e6:  # NaN and inf too
            raise ConfigError(f"parallel.bucket_cap_mb={bucket_cap_mb} must be in (0, 1e6] "
                              f"(null: DDP's default, 25)")
        self.bucket_cap_mb = bucket_cap_mb
        self.gradient_as_bucket_view = gradient_as_bucket_view

    def bucket_cap(self, ctx: RunContext) -> Optional[float]:
        """The configured cap, raised to one bucket when a comm hook on gloo needs it."""
        if not (ctx.facts.needs_single_ddp_bucket and ctx.device_type == "cpu"):
            return self.bucket_cap_mb
        if self.bucket_cap_mb is not None and self.bucket_cap_mb < SINGLE_BUCKET_MB and ctx.is_main:
            print(f"parallel.bucket_cap_mb={self.bucket_cap_mb} raised to {SINGLE_BUCKET_MB:g}: "
                  f"PowerSGD on gloo needs one bucket")
        return SINGLE_BUCKET_MB

    def device_mesh(self, ctx: RunContext):
        return init_device_mesh(ctx.device_type, (ctx.world_size,), mesh_dim_names=("dp",))

    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return apply_ddp(model, ctx, self.bucket_cap(ctx), self.gradient_as_bucket_view)

    def step_context(self, model, info, ctx: RunContext):
        stack = contextlib.ExitStack()
        stack.enter_context(super().step_context(model, info, ctx))
        if not info.is_last_micro and isinstance(model, DistributedDataParallel):
            stack.enter_context(model.no_sync())
        return stack
