"""Optimizers and learning-rate schedules (``optim`` and ``scheduler`` groups).

Each optimizer is a factory whose arguments are the group's config keys; Hydra makes
it a partial (``_partial_: true``) and the build order calls it with the model, so a
factory can split parameters however its method needs (see :mod:`tfx.optim.muon`).
"""
from __future__ import annotations

import math
from typing import Iterable, List

import torch
from torch import nn

from tfx.core import ConfigError

DECAYS = ("cosine", "linear", "constant")


def _check(name: str, lr: float, weight_decay: float) -> None:
    if not 0 < lr < math.inf:
        raise ConfigError(f"optim.lr={lr} must be > 0 (and finite)")
    if not 0 <= weight_decay < math.inf:
        raise ConfigError(f"optim.weight_decay={weight_decay} must be >= 0 (and finite)")


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
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


def adamw(model: nn.Module, lr: float = 1e-3, betas: Iterable[float] = (0.9, 0.95), eps: float = 1e-8,
          weight_decay: float = 0.1) -> torch.optim.AdamW:
    _check("adamw", lr, weight_decay)
    betas = tuple(betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas={list(betas)} must be two numbers in [0, 1)")
    if not 0 < eps < math.inf:
        raise ConfigError(f"optim.eps={eps} must be > 0 (and finite)")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


def sgd(model: nn.Module, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0) -> torch.optim.SGD:
    _check("sgd", lr, weight_decay)
    if not 0 <= momentum < 1:
        raise ConfigError(f"optim.momentum={momentum} must be in [0, 1)")
    return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum)


def lr_lambda(decay: str, warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """Multiplier of the base lr at optimizer step ``s`` (linear warmup, then decay)."""

    def f(s: int) -> float:
        if warmup_steps and s < warmup_steps:
            return (s + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        progress = min(1.0, (s - warmup_steps) / max(1, max_steps - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return f


class WarmupDecay:
    """``scheduler`` group: linear warm-up over ``warmup_steps``, then ``decay`` to
    ``min_lr_ratio * lr`` at the run's last step. One multiplier for every parameter
    group (Muon's and AdamW's alike). Called with ``(optimizer, max_steps)``."""

    def __init__(self, decay: str = "cosine", warmup_steps: int = 20, min_lr_ratio: float = 0.1) -> None:
        if decay not in DECAYS:
            raise ConfigError(f"scheduler.decay={decay!r}; choose one of {list(DECAYS)}")
        if warmup_steps < 0:
            raise ConfigError(f"scheduler.warmup_steps={warmup_steps} must be >= 0")
        if not 0 <= min_lr_ratio <= 1:
            raise ConfigError(f"scheduler.min_lr_ratio={min_lr_ratio} must be in [0, 1]")
        self.decay, self.warmup_steps, self.min_lr_ratio = decay, warmup_steps, min_lr_ratio

    def __call__(self, optimizer: torch.optim.Optimizer, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(self.decay, self.warmup_steps, max_steps, self.min_lr_ratio))
