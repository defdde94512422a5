"""FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over
the data-parallel ranks, each transformer block its own all-gather unit.

The mixed-precision policy comes from the ``precision`` group so there is one
switch for it: bf16 compute means bf16 parameters in forward/backward and fp32
gradient reduction (torchtitan's default). Under gradient accumulation the
reduce-scatter is skipped on all but the last micro-step (FSDP2's ``no_sync``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from tfx.core import RunContext, Stage
from tfx.model.anatomy import anatomy_of
from tfx.parallel.base import ParallelTechnique
from tfx.parallel.clip import clip_grad_norm


def mixed_precision_policy(compute_dtype: Optional[torch.dtype]) -> Optional[MixedPrecisionPolicy]:
    """bf16/fp16 parameters for compute, fp32 gradient reduction; None for fp32."""
    if compute_dtype is None:
        return None
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, mp_policy: Optional[MixedPrecisionPolicy] = None,
               cpu_offload: bool = False, reshard_after_forward: bool = True) -> nn.Module:
    """Shard every decoder layer (from the model's anatomy: tfx GPT, HF Llama-like, HF
    GPT-2), then the root (embeddings, final norm, head: one unit, so a tied head stays
    tied)."""
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if cpu_offload:  # pinned memory needs a GPU; on a CPU-only machine it fails
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in anatomy_of(model).decoder_layers(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def dp_mesh(ctx: RunContext) -> DeviceMesh:
    """The data-parallel sub-mesh (the ``"dp"`` dimension of a 2-D mesh)."""
    return ctx.mesh["dp"] if "dp" in (ctx.mesh.mesh_dim_names or ()) else ctx.mesh


class FSDP(ParallelTechnique):
    stage = Stage.DATA_PARALLEL
    name = "fsdp"

    data_parallel = "fsdp"
    shards_parameters = True

    def __init__(self, nproc_per_node: Optional[int] = None, reshard_after_forward: bool = True,
                 cpu_offload: bool = False, mixed_precision: bool = True) -> None:
        super().__init__(nproc_per_node)
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload
        self.mixed_precision = mixed_precision

    def device_mesh(self, ctx: RunContext):
        return init_device_mesh(ctx.device_type, (ctx.world_size,), mesh_dim_names=("dp",))

    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        dtype = ctx.facts.compute_dtype if self.mixed_precision else None
        return apply_fsdp(model, dp_mesh(ctx), mixed_precision_policy(dtype),
                          self.cpu_offload, self.reshard_after_forward)

    def clip_grad_norm(self, model, max_norm: float):
        return clip_grad_norm(model.parameters(), max_norm)

    def step_context(self, model, info, ctx: RunContext):
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(info.is_last_micro)
        return super().step_context(model, info, ctx)
