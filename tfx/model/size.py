"""How big a model is: parameters (tied weights once) and bytes on disk."""
from __future__ import annotations

import io

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    """Parameters, counting tied weights (head/embedding) once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes ``torch.save(model.state_dict())`` takes: the model's size on disk."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def weight_flops(m: nn.Module, forward_only: bool = False) -> float:
    """Training FLOPs per token per weight of matmul ``m``: 2 forward, 2 input gradient,
    2 weight gradient, none of the last for a frozen weight (LoRA's base layers);
    2 when only the forward counts (what activation checkpointing runs again)."""
    return 2.0 if forward_only else (6.0 if m.weight.requires_grad else 4.0)
