"""Technique schedules in steps or in fractions of the run.

A schedule position (pruning's ``start_step``/``end_step``, distillation's warm-up
...) is either an **int**: absolute optimizer steps, or a **float**: a fraction of
``trainer.max_steps`` (``0.8`` = 80% of the run, ``1.0`` = its end). Fractions are the
defaults, so a schedule stretches with the run instead of silently lying past its end.
"""
from __future__ import annotations

import math
from typing import Optional, Union

from tfx.core.errors import ConfigError

StepSpec = Union[int, float]


def resolve_step(value: StepSpec, max_steps: Optional[int], key: str) -> int:
    """``value`` as an absolute step. ``key`` names the config key in errors."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be an int (steps) or a float fraction of trainer.max_steps, "
                          f"got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}={value} as a fraction of trainer.max_steps must lie in [0, 1]; "
                              f"give an int for absolute steps")
        if max_steps is None:
            raise ConfigError(f"{key}={value} is a fraction of trainer.max_steps, which is not known here")
        return int(round(value * max_steps))
    if value < 0:
        raise ConfigError(f"{key}={value} must be >= 0")
    return int(value)


def check_within(key: str, step: int, max_steps: Optional[int], why: str = "") -> None:
    """Refuse a schedule position the run never reaches."""
    if max_steps is not None and step > max_steps:
        raise ConfigError(f"{key} resolves to step {step}, past trainer.max_steps={max_steps}"
                          f"{': ' + why if why else ''}; lower it or give a fraction of the run "
                          f"(e.g. 0.8)")
