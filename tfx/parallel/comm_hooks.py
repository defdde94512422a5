"""Gradient-communication compression as DDP comm hooks (stage COMM, after DDP).

* ``fp16``: torch's ``fp16_compress_hook`` (cast, all-reduce, cast back).
* ``bf16``: torch's ``bf16_compress_hook`` on NCCL; it refuses gloo, so on CPU a
  four-line cast hook of the same shape (:func:`bf16_cast_hook`) is used instead.
* ``powersgd``: torch's ``powerSGD_hook`` (low-rank P/Q all-reduces with error
  feedback) after ``warmup_steps`` of plain all-reduce. On gloo it deadlocks with
  more than one DDP bucket, so it asks DDP for a single bucket there.

Each hook reports the bytes it all-reduced per optimizer step
(``comm/hook_bytes_per_step``): the cast payload for the cast hooks, PowerSGD's own
``compression_stats`` accounting (P + Q + uncompressed tensors) for PowerSGD.

Resume: PowerSGD's error-feedback buffers are per rank and are not checkpointed
(the non-tensor checkpoint state is rank 0's); a resumed run starts a fresh
warm-up. The cast hooks are stateless, so their resumes are exact.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook as psgd
from torch.nn.parallel import DistributedDataParallel

from tfx.core import ConfigError, RunContext, Stage, Technique

def bf16_cast_hook(process_group: Optional[dist.ProcessGroup], bucket: dist.GradBucket) -> torch.futures.Future:
    """``bf16_compress_hook`` for backends whose check refuses it (gloo)."""
    group = process_group if process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(group.size())
    fut = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(f):
        buffer.copy_(f.value()[0])
        return buffer
    return fut.then(decompress)


class CommHook(Technique):
    """Base: register ``self.hook`` on the DDP model and count what it sends."""

    stage = Stage.COMM

    def __init__(self) -> None:
        self._bytes = 0
        self._last: Optional[int] = None

    def validate(self, plan) -> None:
        if plan.facts().data_parallel != "ddp":
            raise ConfigError(f"compression={self.key} compresses DDP's gradient all-reduce; add "
                              f"parallel=ddp (FSDP2 reduces in the precision group's dtype instead)")

    def hook_and_state(self, ctx: RunContext):
        raise NotImplementedError

    def payload_bytes(self, bucket: dist.GradBucket, state: Any) -> int:
        return bucket.buffer().numel() * bucket.buffer().element_size()

    def apply_to_model(self, model, ctx: RunContext):
        if not isinstance(model, DistributedDataParallel):
            raise ConfigError(f"compression={self.key} needs the model wrapped in DDP (parallel=ddp)")
        hook, state = self.hook_and_state(ctx)
        model.register_comm_hook(state, self._counted(hook))
        return model

    def _counted(self, hook: Callable) -> Callable:
        def counted(state, bucket):
            fut = hook(state, bucket)
            self._bytes += self.payload_bytes(bucket, state)
            return fut
        return counted

    def after_optimizer_step(self, model, info, ctx) -> None:
        if self._bytes:
            self._last, self._bytes = self._bytes, 0

    def metrics(self) -> Dict[str, float]:
        return {} if self._last is None else {"comm/hook_bytes_per_step": float(self._last)}


class CastCompression(CommHook):
    """All-reduce gradients in fp16 or bf16 (half the bytes of fp32)."""

    def __init__(self, dtype: str = "bf16") -> None:
        super().__init__()
        if dtype not in ("fp16", "bf16"):
            raise ConfigError(f"compression dtype={dtype!r}; choose fp16 or bf16")
        self.dtype, self.name = dtype, f"{dtype}_comm"

    def hook_and_state(self, ctx: RunContext):
        if self.dtype == "fp16":
            return default_hooks.fp16_compress_hook, None
        if dist.get_backend() == "nccl":
            return default_hooks.bf16_compress_hook, None
        return bf16_cast_hook, None

    def payload_bytes(self, bucket, state) -> int:
        return bucket.buffer().numel() * 2


class PowerSGD(CommHook):
    """Low-rank gradient compression (Vogels et al. 2019) with error feedback."""

    name = "powersgd"

    def __init__(self, rank: int = 2, warmup_steps: int = 10, min_compression_rate: float = 2.0,
                 use_error_feedback: bool = True, warm_start: bool = True) -> None:
        super().__init__()
        if rank < 1:
            raise ConfigError(f"compression.powersgd.rank={rank}; must be >= 1")
        if warmup_steps < 2:
            raise ConfigError("compression.powersgd.warmup_steps must be >= 2 (DDP rebuilds its buckets "
                              "after the first step; error feedback needs a warm-up)")
        if not 0 <= min_compression_rate < math.inf:
            raise ConfigError(f"compression.powersgd.min_compression_rate={min_compression_rate} "
                              f"must be a finite number >= 0")
        self.rank, self.warmup_steps = rank, warmup_steps
        self.min_compression_rate = min_compression_rate
        self.use_error_feedback, self.warm_start = use_error_feedback, warm_start
        self._before = 0

    #: gloo: more than one bucket deadlocks PowerSGD; DDP reads this from ctx.facts
    needs_single_ddp_bucket = True

    def hook_and_state(self, ctx: RunContext):
        state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=self.rank,
                                   start_powerSGD_iter=self.warmup_steps,
                                   min_compression_rate=self.min_compression_rate,
                                   use_error_feedback=self.use_error_feedback,
                                   warm_start=self.warm_start, random_seed=ctx.seed)
        self._state = state
        return psgd.powerSGD_hook, state

    def payload_bytes(self, bucket, state) -> int:
        after = state.total_numel_after_compression
        sent, self._before = after - self._before, after
        if sent == 0:  # warm-up: a plain all-reduce of the bucket
            return super().payload_bytes(bucket, state)
        return sent * bucket.buffer().element_size()
