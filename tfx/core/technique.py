"""The one interface every technique implements, and the pipeline that orders them.

A technique declares the :class:`Stage` it belongs to; :class:`Pipeline` applies
techniques in stage order, so the order lives here instead of at every call site:

========== ================================================ ==============================
stage      what happens                                     examples
========== ================================================ ==============================
SURGERY    change the model's structure                     low-rank, sparse attention,
                                                            pruning, QAT, distillation
PIPELINE   split into pipeline stages                       pipeline parallel
TENSOR     shard layers                                     tensor / sequence parallel
MEMORY     trade compute for memory                         activation checkpointing
COMPILE    torch.compile
DATA_PAR.  replicate or shard                               DDP, FSDP2
COMM       communication hooks                              PowerSGD, fp16/bf16 hooks
========== ================================================ ==============================

Precision sits outside the model-transform order (it only supplies autocast, a
loss scaler and the FSDP mixed-precision policy) and uses stage ``PRECISION``,
which is applied first so later stages can read its dtype from the plan.

Rules: all surgery happens before wrapping and before the optimizer exists;
incompatible combinations fail in :meth:`Technique.validate` with a sentence naming
the fix; the resolved order (:meth:`Pipeline.order`) is stored in every checkpoint.
"""
from __future__ import annotations

import contextlib
from enum import IntEnum
from typing import Any, ContextManager, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from tfx.core.context import RunContext, StepInfo
from tfx.core.errors import ConfigError


class Stage(IntEnum):
    PRECISION = 0
    SURGERY = 10
    PIPELINE = 20
    TENSOR = 30
    MEMORY = 40
    COMPILE = 50
    DATA_PARALLEL = 60
    COMM = 70


class Technique:
    """Base class: every hook does nothing by default.

    Subclasses set ``stage`` and override only the hooks they need. ``name`` is the
    short name used in logs, W&B tags and checkpoints (defaults to the class name).
    """

    stage: Stage = Stage.SURGERY
    name: Optional[str] = None
    #: SURGERY techniques are re-applied to a fresh model before a checkpoint's
    #: weights are loaded (resume, evaluate.py, tfx.ckpt.load_run). Set False for
    #: training-only techniques that leave the model's structure alone (distillation).
    reapply_on_load: bool = True
    #: True if ``transform_loss`` needs ``outputs["hidden"]`` (the final hidden state).
    needs_hidden: bool = False

    # -- before any tensor exists -------------------------------------------------
    def validate(self, plan: "Plan") -> None:
        """Raise :class:`ConfigError` if this technique cannot work with ``plan``."""

    # -- building ------------------------------------------------------------------
    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module,
                       ctx: RunContext) -> torch.optim.Optimizer:
        return optimizer

    # -- every micro-step ----------------------------------------------------------
    def step_context(self, model: nn.Module, info: StepInfo, ctx: RunContext) -> ContextManager:
        return contextlib.nullcontext()

    def transform_loss(self, loss: torch.Tensor, batch: Dict[str, torch.Tensor],
                       outputs: Dict[str, torch.Tensor], info: StepInfo,
                       ctx: RunContext) -> torch.Tensor:
        """Return the loss to optimise (distillation adds its term here)."""
        return loss

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Return the tensor to call ``backward`` on (fp16 loss scaling)."""
        return loss

    # -- every optimizer step ------------------------------------------------------
    def before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                              info: StepInfo, ctx: RunContext) -> None:
        """Called after backward of the last micro-step, before clipping."""

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> Optional[bool]:
        """Take the step yourself and return whether it was applied, or return None."""
        return None

    def after_optimizer_step(self, model: nn.Module, info: StepInfo, ctx: RunContext) -> None:
        """``info.step`` is the number of optimizer steps taken, this one included."""

    # -- resume and export ---------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def export(self, model: nn.Module, out_dir, ctx: RunContext) -> Dict[str, Any]:
        """Write post-training artefacts; return metrics to add to the summary."""
        return {}

    # -- misc ----------------------------------------------------------------------
    @property
    def key(self) -> str:
        return self.name or type(self).__name__

    def describe(self) -> str:
        return f"{self.stage.name.lower()}:{self.key}"

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"{type(self).__name__}({self.key})"


class Plan:
    """The techniques chosen for a run, before anything is built.

    ``validate`` hooks receive it to look at the other techniques, e.g.
    ``plan.find(FSDP)`` or ``plan.has_stage(Stage.PIPELINE)``.
    """

    def __init__(self, techniques: Iterable[Technique], world_size: int = 1,
                 device_type: str = "cpu", accum_steps: int = 1) -> None:
        self.techniques: List[Technique] = sorted(techniques, key=lambda t: int(t.stage))
        self.world_size = world_size
        self.device_type = device_type
        self.accum_steps = accum_steps

    def find(self, cls: type) -> Optional[Technique]:
        return next((t for t in self.techniques if isinstance(t, cls)), None)

    def find_all(self, cls: type) -> List[Technique]:
        return [t for t in self.techniques if isinstance(t, cls)]

    def has_stage(self, stage: Stage) -> bool:
        return any(t.stage == stage for t in self.techniques)


class Pipeline:
    """Applies techniques in stage order and fans every hook out to all of them."""

    def __init__(self, techniques: Sequence[Technique]) -> None:
        # sorted() is stable: techniques of one stage keep the order they were given.
        self.techniques: List[Technique] = sorted(techniques, key=lambda t: int(t.stage))
        keys = [t.key for t in self.techniques]
        dupes = {k for k in keys if keys.count(k) > 1}
        if dupes:
            raise ConfigError(f"technique(s) {sorted(dupes)} chosen twice; pick each once")

    def order(self) -> List[str]:
        """The resolved order, e.g. ``['precision:bf16', 'memory:activation_ckpt']``."""
        return [t.describe() for t in self.techniques]

    def validate(self, plan: Plan) -> None:
        for t in self.techniques:
            t.validate(plan)

    def find(self, cls: type) -> Optional[Technique]:
        return next((t for t in self.techniques if isinstance(t, cls)), None)

    def apply_to_model(self, model: nn.Module, ctx: RunContext,
                       stages: Optional[Iterable[Stage]] = None) -> nn.Module:
        wanted = None if stages is None else set(stages)
        for t in self.techniques:
            if wanted is None or t.stage in wanted:
                model = t.apply_to_model(model, ctx)
        return model

    def wrap_optimizer(self, optimizer, model, ctx):
        for t in self.techniques:
            optimizer = t.wrap_optimizer(optimizer, model, ctx)
        return optimizer

    def step_context(self, model, info: StepInfo, ctx: RunContext) -> ContextManager:
        stack = contextlib.ExitStack()
        for t in self.techniques:
            stack.enter_context(t.step_context(model, info, ctx))
        return stack

    def transform_loss(self, loss, batch, outputs, info, ctx):
        for t in self.techniques:
            loss = t.transform_loss(loss, batch, outputs, info, ctx)
        return loss

    def scale_loss(self, loss):
        for t in self.techniques:
            loss = t.scale_loss(loss)
        return loss

    def before_optimizer_step(self, model, optimizer, info, ctx):
        for t in self.techniques:
            t.before_optimizer_step(model, optimizer, info, ctx)

    def optimizer_step(self, optimizer) -> bool:
        """Let one technique own the step (e.g. GradScaler); otherwise step plainly."""
        for t in self.techniques:
            applied = t.optimizer_step(optimizer)
            if applied is not None:
                return applied
        optimizer.step()
        return True

    def after_optimizer_step(self, model, info, ctx):
        for t in self.techniques:
            t.after_optimizer_step(model, info, ctx)

    def state_dict(self) -> Dict[str, Any]:
        return {t.key: t.state_dict() for t in self.techniques}

    def load_state_dict(self, states: Dict[str, Any]) -> None:
        for t in self.techniques:
            if t.key in states:
                t.load_state_dict(states[t.key])

    def export(self, model, out_dir, ctx) -> Dict[str, Any]:
        metrics: Dict[str, Any] = {}
        for t in self.techniques:
            metrics.update(t.export(model, out_dir, ctx) or {})
        return metrics
