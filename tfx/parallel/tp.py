"""Tensor parallel + sequence parallel (Megatron-style) with ``parallelize_module``.

Attention q/k/v and MLP fc are split column-wise (each rank owns whole heads / a
slice of the hidden units), o_proj and proj row-wise. With sequence parallel the
norms and residual stream between blocks are sharded along the sequence, so the
all-reduces become reduce-scatter + all-gather and activation memory shrinks.
With loss parallel the head's output stays sharded along the vocabulary and the
cross-entropy is computed without gathering the logits.

Tied embeddings: ``tok_emb`` is sharded row-wise (along the vocabulary) and ``head``
column-wise, both ``Shard(0)`` of the same (vocab, d) matrix, so the tie is
restored after sharding and the two keep sharing one DTensor parameter.
"""
from __future__ import annotations

import contextlib
from typing import Optional

from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, loss_parallel, parallelize_module)

from tfx.core import ConfigError, RunContext, Stage
from tfx.model.anatomy import spec_family
from tfx.parallel.base import ParallelTechnique
from tfx.parallel.clip import clip_grad_norm


def _block_plan(sequence_parallel: bool) -> dict:
    resid = Shard(1) if sequence_parallel else Replicate()
    plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(), "attn.o_proj": RowwiseParallel(output_layouts=resid),
            "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel(output_layouts=resid)}
    if sequence_parallel:
        gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        plan.update({"ln1": SequenceParallel(), "ln2": SequenceParallel(), "attn": gather, "mlp": gather})
    return plan


def _root_plan(model: nn.Module, sequence_parallel: bool, loss_parallel_: bool) -> dict:
    plan = {}
    if model.tok_emb is not None:
        plan["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    first = next(iter(model.layers))
    if sequence_parallel:
        plan[f"layers.{first}"] = PrepareModuleInput(input_layouts=(Replicate(),),
                                                     desired_input_layouts=(Shard(1),),
                                                     use_local_output=True)
        if model.norm is not None:
            plan["norm"] = SequenceParallel()
    if model.head is not None:
        plan["head"] = ColwiseParallel(input_layouts=Shard(1) if sequence_parallel else Replicate(),
                                       output_layouts=Shard(-1) if loss_parallel_ else Replicate(),
                                       use_local_output=not loss_parallel_)
    return plan


def check_divisible(model: nn.Module, tp: int) -> None:
    cfg = model.cfg
    for what, n in (("model.n_head", cfg.n_head), ("model.d_ff", cfg.d_ff), ("vocab size", cfg.vocab_size)):
        if n % tp:
            raise ConfigError(f"tensor parallel degree {tp} does not divide {what}={n}; "
                              f"choose a tensor-parallel degree that divides it")


def apply_tp(model: nn.Module, mesh: DeviceMesh, sequence_parallel: bool = True,
             loss_parallel: bool = True) -> nn.Module:
    """Shard ``model`` (a GPT, possibly a pipeline stage) over the 1-D ``mesh``."""
    check_divisible(model, mesh.size())
    tied = model.tok_emb is not None and model.head is not None and model.head.weight is model.tok_emb.weight
    parallelize_module(model, mesh, _root_plan(model, sequence_parallel, loss_parallel))
    for block in model.layers.values():
        parallelize_module(block, mesh, _block_plan(sequence_parallel))
    if tied:
        model.head.weight = model.tok_emb.weight
    return model


class TensorParallel(ParallelTechnique):
    stage = Stage.TENSOR
    name = "tp"

    def __init__(self, nproc_per_node: Optional[int] = None, degree: Optional[int] = None,
                 sequence_parallel: bool = True, loss_parallel: bool = True) -> None:
        super().__init__(nproc_per_node)
        if degree is not None and degree < 1:
            raise ConfigError(f"parallel.degree={degree} must be >= 1 (null: all ranks)")
        self.degree = degree
        self.sequence_parallel = sequence_parallel
        self.loss_parallel = loss_parallel

    def validate(self, plan) -> None:
        super().validate(plan)
        family = spec_family(plan.model)
        if plan.model is not None and family != "tfx_gpt":
            raise ConfigError(f"parallel=tp has a sharding plan for tfx's own GPT only; "
                              f"{family or type(plan.model).__name__} models are not supported "
                              f"yet: use parallel=fsdp or parallel=ddp")
        tp = self.degree or plan.world_size
        if plan.world_size % tp:
            raise ConfigError(f"parallel tp degree={tp} does not divide the world size {plan.world_size}; "
                              f"set the degree to a divisor of {plan.world_size}")
        if plan.world_size // tp > 1 and plan.facts().data_parallel != "fsdp":
            raise ConfigError(f"{plan.world_size} processes with tensor-parallel degree {tp} leave "
                              f"{plan.world_size // tp} data-parallel replicas but no data-parallel "
                              f"technique; use parallel=fsdp_tp or set degree={plan.world_size}")

    def device_mesh(self, ctx: RunContext):
        tp = self.degree or ctx.world_size
        dp = ctx.world_size // tp
        if dp == 1:
            return init_device_mesh(ctx.device_type, (tp,), mesh_dim_names=("tp",))
        return init_device_mesh(ctx.device_type, (dp, tp), mesh_dim_names=("dp", "tp"))

    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return apply_tp(model, ctx.mesh["tp"], self.sequence_parallel, self.loss_parallel)

    def _loss_context(self):
        return loss_parallel() if self.loss_parallel else contextlib.nullcontext()

    def step_context(self, model, info, ctx: RunContext):
        stack = contextlib.ExitStack()
        stack.enter_context(super().step_context(model, info, ctx))
        stack.enter_context(self._loss_context())
        return stack

    def backward_context(self, model, info, ctx: RunContext):
        stack = contextlib.ExitStack()
        stack.enter_context(super().backward_context(model, info, ctx))
        stack.enter_context(self._loss_context())
        return stack

    def clip_grad_norm(self, model, max_norm: float):
        return clip_grad_norm(model.parameters(), max_norm)
