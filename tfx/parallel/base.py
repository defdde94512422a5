"""What every parallel mode shares: worker count, world-size checks, comm metering,
model-state bytes per rank (reported in metrics and summary.json)."""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Optional

import torch

from tfx.core import ConfigError, RunContext, Technique
from tfx.parallel.comm_meter import CommMeter
from tfx.parallel.memory import grad_bytes, optimizer_bytes, param_bytes

#: Steps metered at the start of a run. The pattern of collectives repeats every
#: step, and the Python dispatch mode costs time, so later steps run unmetered.
METERED_STEPS = 2


def max_nproc() -> int:
    """Workers one machine may start: its GPUs, or a few per CPU core (gloo tests
    oversubscribe small machines), never a runaway number of processes."""
    return max(torch.cuda.device_count(), 4 * (os.cpu_count() or 1), 8)


def default_nproc() -> int:
    """One worker per GPU; two on a CPU-only machine (enough to exercise every path)."""
    return torch.cuda.device_count() or 2


class ParallelTechnique(Technique):
    """Base of the ``parallel`` group. ``nproc_per_node`` is read by the launcher
    (:mod:`tfx.launch`) when train.py starts its own workers."""

    #: how many processes this mode needs at least
    min_world: int = 2

    def __init__(self, nproc_per_node: Optional[int] = None) -> None:
        if nproc_per_node is not None and not 1 <= nproc_per_node <= max_nproc():
            raise ConfigError(f"parallel.nproc_per_node={nproc_per_node} must be in [1, {max_nproc()}] "
                              f"on this machine ({torch.cuda.device_count()} GPUs, {os.cpu_count()} "
                              f"CPU cores); null: one per GPU, 2 on CPU")
        self.nproc_per_node = nproc_per_node or default_nproc()
        self._meter = CommMeter()
        self._metered = 0
        self._bytes_per_step: Optional[int] = None
        self._active = False
        self._optimizer = None
        self._mem: Dict[str, float] = {}

    def validate(self, plan) -> None:
        if plan.world_size < self.min_world:
            raise ConfigError(f"parallel={self.key} needs at least {self.min_world} processes but "
                              f"the run has {plan.world_size}; run `python train.py parallel={self.key}` "
                              f"(it starts parallel.nproc_per_node workers) or torchrun --nproc-per-node "
                              f"{self.min_world}, or use parallel=single")

    # -- communication metering -------------------------------------------------------
    def _metering(self) -> contextlib.AbstractContextManager:
        # Only training micro-steps (evaluation runs under no_grad) of the first steps.
        if self._metered >= METERED_STEPS or not torch.is_grad_enabled():
            return contextlib.nullcontext()
        self._active = True
        return self._meter

    def step_context(self, model, info, ctx: RunContext):
        return self._metering()

    def backward_context(self, model, info, ctx: RunContext):
        return self._metering()

    # -- model-state bytes per rank ------------------------------------------------------
    def wrap_optimizer(self, optimizer, model, ctx: RunContext):
        self._optimizer = optimizer
        return optimizer

    def before_optimizer_step(self, model, optimizer, info, ctx: RunContext) -> None:
        if not self._mem:
            self._mem = {"mem/grad_bytes": float(grad_bytes(model))}

    def after_optimizer_step(self, model, info, ctx: RunContext) -> None:
        if "mem/optim_bytes" not in self._mem and self._optimizer is not None:
            self._mem.update({"mem/param_bytes": float(param_bytes(model)),
                              "mem/optim_bytes": float(optimizer_bytes(self._optimizer))})
        if self._active:
            self._bytes_per_step, self._active = self._meter.total, False
            self._metered += 1
            self._meter.reset()

    def metrics(self) -> Dict[str, float]:
        out = dict(self._mem)
        if self._bytes_per_step is not None:
            out["comm/bytes_per_step"] = float(self._bytes_per_step)
        return out
