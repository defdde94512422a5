"""Optimizers and learning-rate schedules (optim group)."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from tfx.core import ConfigError


def param_groups(model: nn.Module, weight_decay: float):
    """Decay matrices only (GPT-2/nanoGPT convention): no decay on norms, biases, 1-D."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, name: str = "adamw", lr: float = 1e-3,
                    weight_decay: float = 0.1, betas: Iterable[float] = (0.9, 0.95),
                    eps: float = 1e-8, momentum: float = 0.9) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ConfigError(f"optim.name={name!r}; choose 'adamw' or 'sgd'")


def lr_lambda(schedule: str, warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """Multiplier of the base lr at optimizer step ``s`` (linear warmup, then decay)."""
    if schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"optim.schedule={schedule!r}; choose cosine, linear or constant")

    def f(s: int) -> float:
        if warmup_steps and s < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup_steps) / max(1, max_steps - warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * decay

    return f


def build_scheduler(optimizer, schedule: str, warmup_steps: int, max_steps: int,
                    min_lr_ratio: float = 0.1):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(schedule, warmup_steps, max_steps, min_lr_ratio))
