"""Mixed precision: fp32, bf16 autocast, fp16 autocast with dynamic loss scaling.

The technique supplies the autocast context for each micro-step and, for fp16, owns
the optimizer step through ``torch.amp.GradScaler`` (whose state is checkpointed).
It declares ``compute_dtype`` (read by FSDP2's ``MixedPrecisionPolicy`` and by
distillation's teacher through ``ctx.facts``) and, for fp16, ``skips_nonfinite``.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from tfx.core import ConfigError, RunContext, Stage, Technique

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision(Technique):
    stage = Stage.PRECISION

    def __init__(self, dtype: str = "fp32", init_scale: float = 2.0 ** 16,
                 growth_interval: int = 2000) -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"precision.dtype={dtype!r}; choose one of {list(DTYPES)}")
        if not 0 < init_scale <= torch.finfo(torch.float32).max:  # NaN and inf too
            raise ConfigError(f"precision.init_scale={init_scale} must be a finite number > 0 "
                              f"(default 65536)")
        if growth_interval < 1:
            raise ConfigError(f"precision.growth_interval={growth_interval} must be >= 1")
        self.dtype_name = dtype
        self.name = dtype
        self.init_scale = init_scale
        self.growth_interval = growth_interval
        # declared facts: the autocast dtype (None = full fp32) and who skips inf/nan steps
        self.compute_dtype: Optional[torch.dtype] = None if dtype == "fp32" else DTYPES[dtype]
        self.skips_nonfinite = dtype == "fp16"
        self.scaler: Optional[torch.amp.GradScaler] = None

    def apply_to_model(self, model, ctx: RunContext):
        if self.skips_nonfinite:
            # GradScaler works on CPU too (torch>=2.3); on CPU it exercises the same path.
            self.scaler = torch.amp.GradScaler(ctx.device_type, init_scale=self.init_scale,
                                               growth_interval=self.growth_interval)
        return model

    def step_context(self, model, info, ctx: RunContext):
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(ctx.device_type, dtype=self.compute_dtype)

    def scale_loss(self, loss):
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def before_optimizer_step(self, model, optimizer, info, ctx):
        if self.scaler is not None:  # so clipping sees true gradients
            self.scaler.unscale_(optimizer)

    def optimizer_step(self, optimizer) -> Optional[bool]:
        if self.scaler is None:
            return None
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        # The scaler lowers its scale exactly when it skipped the step (inf/nan grads).
        return self.scaler.get_scale() >= scale

    def state_dict(self):
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state):
        # called once, after apply_to_model made the scaler
        if state.get("scaler") and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
