"""Bytes moved by collectives, measured rather than estimated.

Every ``torch.distributed`` collective (DDP's reducer, FSDP2's all-gather and
reduce-scatter, DTensor redistributions, pipeline send/recv, comm hooks) goes
through a dispatcher op in the ``c10d`` / ``_c10d_functional`` namespaces, so a
``TorchDispatchMode`` sees them all with their tensors. ``CommDebugMode`` only
counts calls, not bytes, hence this small mode.

A collective's size is its logical payload as nccl-tests reports it: the largest
tensor among its inputs and outputs (the gathered output of an all-gather, the full
input of a reduce-scatter, the buffer of an all-reduce).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_NAMESPACES = ("c10d", "_c10d_functional")
_NOT_COMM = ("wait", "_wrap_tensor_autograd", "barrier", "monitored_barrier")


class CommMeter(TorchDispatchMode):
    """Sum of collective payload bytes per op name while active (re-enterable)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: Dict[str, int] = defaultdict(int)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if func.namespace in _NAMESPACES and not name.startswith(_NOT_COMM):
            sizes = [t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out))
                     if isinstance(t, torch.Tensor)]
            self.bytes[name] += max(sizes, default=0)
        return out
