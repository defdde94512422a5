"""Bytes of model state a rank holds: parameters, gradients, optimizer state.

Counted from the tensors themselves (a DTensor counts its local shard), so the
numbers show what sharding actually saves rather than what it should.
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch
from torch.distributed.tensor import DTensor


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def _unique(params: Iterable[torch.nn.Parameter]):
    seen = set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def param_bytes(model: torch.nn.Module) -> int:
    return sum(local_bytes(p) for p in _unique(model.parameters()))


def grad_bytes(model: torch.nn.Module) -> int:
    return sum(local_bytes(p.grad) for p in _unique(model.parameters()) if p.grad is not None)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


def state_bytes(model, optimizer) -> Dict[str, int]:
    """Call between backward and ``zero_grad`` so gradients exist."""
    return {"mem/param_bytes": param_bytes(model), "mem/grad_bytes": grad_bytes(model),
            "mem/optim_bytes": optimizer_bytes(optimizer)}
