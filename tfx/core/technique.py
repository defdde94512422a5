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
loss scaler and the FSDP mixed-precision policy) and uses stage ``PRECISION``.

Facts several techniques need are *declared* as typed class or instance fields on
the technique that owns them (``compute_dtype``, ``skips_nonfinite``,
``shards_parameters`` ...). :meth:`Plan.facts` gathers them once into a frozen
:class:`~tfx.core.context.Facts`, which every hook reads from ``ctx.facts``: no
technique searches the plan for another technique's class.

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

from tfx.core.context import Facts, RunContext, StepInfo
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


#: Stages that only decide how the model is laid out over ranks and how gradients
#: travel. A checkpoint may be resumed under a different layout (DCP reshards), so
#: these are left out when a resume compares technique orders.
LAYOUT_STAGES = (Stage.PIPELINE, Stage.TENSOR, Stage.DATA_PARALLEL, Stage.COMM)


def structural_order(order: Sequence[str]) -> List[str]:
    """``Pipeline.order()`` without the layout stages."""
    layout = {s.name.lower() for s in LAYOUT_STAGES}
    return [o for o in order if o.split(":", 1)[0] not in layout]


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

    # -- declared facts (gathered by Plan.facts into ctx.facts) ----------------------
    #: the autocast compute dtype this technique chooses (precision group); None = no say
    compute_dtype: Optional[torch.dtype] = None
    #: True if this technique decides itself whether a non-finite step is skipped
    #: (fp16's GradScaler); the loop then leaves non-finite steps to it
    skips_nonfinite: bool = False
    #: "ddp" or "fsdp" for the technique that replicates/shards over data-parallel ranks
    data_parallel: Optional[str] = None
    #: True if parameters become sharded DTensors (FSDP2, tensor parallel): module hooks
    #: that multiply a parameter by an unsharded tensor (torch.nn.utils.prune) and exports
    #: that read whole weights on rank 0 cannot work
    shards_parameters: bool = False
    #: True if DDP on gloo must put all gradients in one bucket (PowerSGD deadlocks otherwise)
    needs_single_ddp_bucket: bool = False
    #: True if some parameters may get no gradient in a step (DDP's find_unused_parameters)
    has_unused_parameters: bool = False
    #: a tfx run whose trained weights this technique starts from (compression methods'
    #: ``from_checkpoint``); loaded by the build order before SURGERY, not on resume
    from_checkpoint: Optional[str] = None

    # -- before any tensor exists -------------------------------------------------
    def validate(self, plan: "Plan") -> None:
        """Raise :class:`ConfigError` if this technique cannot work with ``plan``."""

    # -- building ------------------------------------------------------------------
    def device_mesh(self, ctx: RunContext) -> Any:
        """Return a ``DeviceMesh`` if this technique lays out the ranks (the first one
        returned is used by all). A dimension named ``"dp"`` holds the data-parallel
        replicas; without one every rank sees the same data."""
        return None

    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """Change or wrap the model. On a resume (``ctx.resuming``) the weights and this
        technique's state are loaded *after* every technique was applied, once; a
        structural decision made from data (ranks, kept heads) is rebuilt from
        ``ctx.structure_of(self)`` instead of being taken again."""
        return model

    def structure(self) -> Dict[str, Any]:
        """Decisions that fix the model's shapes (low-rank ranks, kept heads), stored in
        every checkpoint so a resume or ``load_run`` rebuilds the same shapes before the
        weights are loaded. Training state goes in :meth:`state_dict` instead."""
        return {}

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module,
                       ctx: RunContext) -> torch.optim.Optimizer:
        return optimizer

    # -- every micro-step ----------------------------------------------------------
    def step_context(self, model: nn.Module, info: StepInfo, ctx: RunContext) -> ContextManager:
        return contextlib.nullcontext()

    def backward_context(self, model: nn.Module, info: StepInfo, ctx: RunContext) -> ContextManager:
        """Entered around ``backward`` (e.g. tensor parallel's ``loss_parallel``, which
        must cover both the loss and its backward)."""
        return contextlib.nullcontext()

    def transform_loss(self, loss: torch.Tensor, batch: Dict[str, torch.Tensor],
                       outputs: Dict[str, torch.Tensor], info: StepInfo,
                       ctx: RunContext) -> torch.Tensor:
        """Return the loss to optimise (distillation adds its term here)."""
        return loss

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Return the tensor to call ``backward`` on (fp16 loss scaling)."""
        return loss

    #: True if this technique runs forward and backward itself (pipeline parallel:
    #: its schedule interleaves micro-batches across ranks). At most one may.
    owns_forward: bool = False

    def forward_backward(self, model: nn.Module, batch: Dict[str, torch.Tensor], norm: float,
                         loss_mult: float, info: StepInfo, ctx: RunContext) -> torch.Tensor:
        """Only if ``owns_forward``: run one micro-step (forward + backward of
        ``ce_sum / norm * loss_mult``) and return the detached ``ce_sum / norm`` of the
        batch (its share of the objective), identical on every rank."""
        raise NotImplementedError

    def eval_ce_sum(self, model: nn.Module, batch: Dict[str, torch.Tensor], ctx: RunContext) -> torch.Tensor:
        """Only if ``owns_forward``: summed cross-entropy of ``batch``, on every rank."""
        raise NotImplementedError

    # -- every optimizer step ------------------------------------------------------
    def before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                              info: StepInfo, ctx: RunContext) -> None:
        """Called after backward of the last micro-step, before clipping."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> Optional[torch.Tensor]:
        """Clip yourself and return the total norm, or return None for
        ``torch.nn.utils.clip_grad_norm_`` (pipeline parallel: the norm spans stages)."""
        return None

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> Optional[bool]:
        """Take the step yourself and return whether it was applied, or return None."""
        return None

    def after_optimizer_step(self, model: nn.Module, info: StepInfo, ctx: RunContext) -> None:
        """``info.step`` is the number of optimizer steps taken, this one included."""

    def metrics(self) -> Dict[str, float]:
        """Numbers to log with the training metrics and put in the summary
        (e.g. ``comm/bytes_per_step``)."""
        return {}

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
                 device_type: str = "cpu", accum_steps: int = 1, model: Any = None,
                 max_steps: Optional[int] = None, batch_size: Optional[int] = None) -> None:
        self.techniques: List[Technique] = sorted(techniques, key=lambda t: int(t.stage))
        self.world_size = world_size
        self.device_type = device_type
        self.accum_steps = accum_steps
        #: the ``model`` group's spec (no tensors), e.g. for ``spec_family(plan.model)``
        self.model = model
        #: ``trainer.max_steps``: schedules given as fractions resolve against it
        #: (:func:`tfx.core.schedule.resolve_step`); None outside a training run
        self.max_steps = max_steps
        #: ``trainer.batch_size`` (per rank, per micro-step); None outside a training run
        self.batch_size = batch_size

    def find(self, cls: type) -> Optional[Technique]:
        return next((t for t in self.techniques if isinstance(t, cls)), None)

    def find_all(self, cls: type) -> List[Technique]:
        return [t for t in self.techniques if isinstance(t, cls)]

    def has_stage(self, stage: Stage) -> bool:
        return any(t.stage == stage for t in self.techniques)

    def facts(self) -> Facts:
        """The declared facts of all techniques, checked for conflicts."""
        return gather_facts(self.techniques)


def _one(techniques: Sequence[Technique], field: str) -> Any:
    """The value of a field at most one technique may declare (or all agree on)."""
    values = {getattr(t, field) for t in techniques if getattr(t, field) is not None}
    if len(values) > 1:
        owners = [t.key for t in techniques if getattr(t, field) is not None]
        raise ConfigError(f"{owners} disagree on {field} ({sorted(map(str, values))}); pick one")
    return next(iter(values), None)


def gather_facts(techniques: Sequence[Technique]) -> Facts:
    return Facts(compute_dtype=_one(techniques, "compute_dtype"),
                 skips_nonfinite=any(t.skips_nonfinite for t in techniques),
                 data_parallel=_one(techniques, "data_parallel"),
                 shards_parameters=any(t.shards_parameters for t in techniques),
                 needs_single_ddp_bucket=any(t.needs_single_ddp_bucket for t in techniques),
                 has_unused_parameters=any(t.has_unused_parameters for t in techniques),
                 needs_hidden=any(t.needs_hidden for t in techniques),
                 from_checkpoint=_one(techniques, "from_checkpoint"))


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

    def device_mesh(self, ctx: RunContext) -> Any:
        return next((m for m in (t.device_mesh(ctx) for t in self.techniques) if m is not None), None)

    def forward_owner(self) -> Optional[Technique]:
        owners = [t for t in self.techniques if t.owns_forward]
        if len(owners) > 1:
            raise ConfigError(f"{[t.key for t in owners]} each run forward/backward themselves; pick one")
        return owners[0] if owners else None

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

    def backward_context(self, model, info: StepInfo, ctx: RunContext) -> ContextManager:
        stack = contextlib.ExitStack()
        for t in self.techniques:
            stack.enter_context(t.backward_context(model, info, ctx))
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

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor:
        """Global gradient norm before clipping, as a 0-d tensor on the device (DTensor
        norms made plain). Not read here: the loop reads it with the loss, in one
        host-device synchronisation per optimizer step."""
        norm = next((n for n in (t.clip_grad_norm(model, max_norm) for t in self.techniques)
                     if n is not None), None)
        if norm is None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if not isinstance(norm, torch.Tensor):
            return torch.tensor(float(norm))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

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

    def metrics(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for t in self.techniques:
            out.update(t.metrics())
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {t.key: t.state_dict() for t in self.techniques}

    def structure(self) -> Dict[str, Any]:
        return {t.key: s for t in self.techniques if (s := t.structure())}

    def load_state_dict(self, states: Dict[str, Any]) -> None:
        for t in self.techniques:
            if t.key in states:
                t.load_state_dict(states[t.key])

    def export(self, model, out_dir, ctx) -> Dict[str, Any]:
        metrics: Dict[str, Any] = {}
        for t in self.techniques:
            metrics.update(t.export(model, out_dir, ctx) or {})
        return metrics
