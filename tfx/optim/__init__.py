"""Optimizers and learning-rate schedules (``optim`` and ``scheduler`` groups).

Each optimizer is a factory whose arguments are the group's config keys; Hydra makes
it a partial (``_partial_: true``) and the build order calls it with the model, so a
factory can split parameters however its method needs (see :mod:`tfx.optim.muon`).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, List, Optional

import torch
from torch import nn

from tfx.core import ConfigError

DECAYS = ("cosine", "linear", "constant")


def check_range(key: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = True, integer: bool = False, group: str = "optim") -> None:
    """Refuse, in one line naming ``<group>.<key>`` and the allowed range, a value that
    is not a number (a bool or a string included), not finite (NaN, inf), not an
    integer where one is needed, or outside ``[low, high)`` (``low_open``/``high_open``
    make either end open)."""
    if high == math.inf:
        where = f"{'>' if low_open else '>='} {low:g}"
    else:
        where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    allowed = (f"an integer {where}" if integer else f"{where} and finite" if high == math.inf
               else f"a number {where}")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and math.isfinite(value) and (not integer or isinstance(value, int))
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise ConfigError(f"{group}.{key}={value!r} must be {allowed}")


def check_betas(key: str, betas: Any) -> tuple:
    """Adam's ``(beta1, beta2)``: two finite numbers in [0, 1)."""
    if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.{key}={betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    return tuple(float(b) for b in betas)


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
          weight_decay: float = 0.1, fused: Optional[bool] = None) -> torch.optim.AdamW:
    """``fused``: torch's single-kernel AdamW (``True``; what ``transformers.Trainer``
    uses by default on torch >= 2.8), or ``None`` for torch's default (``foreach``).
    Same update rule, different rounding order: results agree to float round-off."""
    check_range("lr", lr, 0, low_open=True)
    betas = check_betas("betas", betas)
    check_range("eps", eps, 0, low_open=True)
    check_range("weight_decay", weight_decay, 0)
    if fused is not None and not isinstance(fused, bool):
        raise ConfigError(f"optim.fused={fused!r} must be true, false or null (torch's default)")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=fused)


def sgd(model: nn.Module, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0) -> torch.optim.SGD:
    check_range("lr", lr, 0, low_open=True)
    check_range("momentum", momentum, 0, 1)
    check_range("weight_decay", weight_decay, 0)
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
