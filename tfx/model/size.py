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
