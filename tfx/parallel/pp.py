"""Pipeline parallel with ``torch.distributed.pipelining``: GPipe, 1F1B and
interleaved 1F1B schedules over the transformer blocks.

Every rank builds the full GPT (same seed, so the same weights), keeps the blocks
of its stage(s) and drops the rest; parameter names stay those of the full model,
so checkpoints load into any layout. The first stage keeps the embeddings, the last
the final norm and head. Interleaved 1F1B gives each rank ``stages_per_rank``
non-adjacent stages (looped placement: rank r holds stages r, r+pp, ...).

Tied embeddings: the input embedding lives on the first stage and the head on the
last, as two copies of one matrix that start equal. After backward their
gradients are summed across the two ranks (Megatron's embedding group), so both
copies take identical optimizer steps and stay equal: training is exactly the tied
model's. Gradient clipping counts the tied matrix once, over all stages.

The schedule owns forward and backward of a micro-step (``owns_forward``): the loss
function is the loop's ``ce_sum / norm * loss_mult``, ``scale_grads=False`` because
the loop's normaliser already averages over the whole batch.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                          ScheduleInterleaved1F1B)

from tfx.core import ConfigError, RunContext, Stage
from tfx.model.anatomy import spec_family
from tfx.parallel.base import ParallelTechnique
from tfx.parallel.clip import clip_grad_norm
from tfx.core.loss import IGNORE_INDEX, ce_sum

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def split_layers(keys: List[str], n_stages: int) -> List[List[str]]:
    """Contiguous, as even as possible (earlier stages take the remainder)."""
    if len(keys) < n_stages:
        raise ConfigError(f"{n_stages} pipeline stages need at least {n_stages} layers, the model has "
                          f"{len(keys)}; raise model.n_layer or lower stages_per_rank / the world size")
    base, extra = divmod(len(keys), n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (1 if s < extra else 0)
        out.append(keys[start:start + n])
        start += n
    return out


def stage_view(model: nn.Module, layer_keys: List[str], first: bool, last: bool) -> nn.Module:
    """A GPT sharing ``model``'s submodules but running only one stage. Built without
    ``__init__`` so no parameters are allocated; several views of one rank model
    (interleaved schedules) share its parameters and optimizer."""
    view = type(model).__new__(type(model))
    nn.Module.__init__(view)
    view.cfg, view.drop = model.cfg, model.drop
    view.tok_emb = model.tok_emb if first else None
    view.pos_emb = model.pos_emb if first else None
    view.layers = nn.ModuleDict({k: model.layers[k] for k in layer_keys})
    view.norm = model.norm if last else None
    view.head = model.head if last else None
    return view


def stage_ids(rank: int, pp: int, stages_per_rank: int) -> List[int]:
    return [rank + i * pp for i in range(stages_per_rank)]


class PipelineParallel(ParallelTechnique):
    stage = Stage.PIPELINE
    name = "pp"
    owns_forward = True

    def __init__(self, nproc_per_node: Optional[int] = None, schedule: str = "1f1b",
                 n_microbatches: int = 4, stages_per_rank: Optional[int] = None) -> None:
        super().__init__(nproc_per_node)
        if schedule not in SCHEDULES:
            raise ConfigError(f"parallel.schedule={schedule!r}; choose one of {list(SCHEDULES)}")
        if not _is_int(n_microbatches) or n_microbatches < 1:
            raise ConfigError(f"parallel.n_microbatches={n_microbatches!r} must be an integer >= 1 "
                              f"that divides trainer.batch_size")
        if stages_per_rank is not None and (not _is_int(stages_per_rank) or stages_per_rank < 1):
            raise ConfigError(f"parallel.stages_per_rank={stages_per_rank!r} must be an integer >= 1 "
                              f"(null: 1, 2 for interleaved_1f1b)")
        self.schedule_name, self.n_microbatches = schedule, n_microbatches
        self.stages_per_rank = stages_per_rank or (2 if schedule == "interleaved_1f1b" else 1)
        if self.stages_per_rank > 1 and schedule != "interleaved_1f1b":
            raise ConfigError(f"stages_per_rank={self.stages_per_rank} needs schedule=interleaved_1f1b")
        self._scale = 1.0

    def validate(self, plan) -> None:
        super().validate(plan)
        family = spec_family(plan.model)
        if plan.model is not None and family != "tfx_gpt":
            tp = ", or parallel=tp" if family == "hf_llama" else ""
            raise ConfigError(f"parallel=pp splits tfx's own GPT only (its stages are views over the "
                              f"GPT's layers; a transformers model runs all its layers in one forward "
                              f"call); {family or type(plan.model).__name__} models are not "
                              f"supported: use parallel=fsdp or parallel=ddp{tp}")
        others = [t.key for t in plan.techniques if t.stage in (Stage.TENSOR, Stage.DATA_PARALLEL)]
        if others:
            raise ConfigError(f"parallel=pp does not combine with {others} yet; use one of them alone")
        if plan.facts().skips_nonfinite:
            raise ConfigError("precision=fp16 does not combine with parallel=pp: torch's pipeline "
                              "schedule runs the backward itself, so fp16's GradScaler never scales "
                              "the loss; use precision=bf16 or fp32")
        self._validate_stages(plan)

    def _validate_stages(self, plan) -> None:
        """What torch's schedules and :func:`split_layers` would refuse only once the
        model is built: micro-batches that do not split the batch, fewer micro-batches
        than stages (1F1B), an interleaved count torch cannot split into rounds, more
        stages than layers."""
        n, pp = self.n_microbatches, plan.world_size
        n_stages = pp * self.stages_per_rank
        batch = plan.batch_size  # trainer.batch_size: sequences per micro-step
        if batch is not None and batch % n:
            raise ConfigError(f"parallel.n_microbatches={n} must divide trainer.batch_size={batch} "
                              f"(each micro-step's batch is split into n_microbatches); choose a "
                              f"divisor of {batch} or change trainer.batch_size")
        if self.schedule_name == "1f1b" and n < n_stages:
            raise ConfigError(f"parallel.n_microbatches={n} must be >= the {n_stages} pipeline stages "
                              f"for schedule=1f1b (torch's Schedule1F1B); raise it or use schedule=gpipe")
        rounds = max(1, n // pp)
        if self.schedule_name == "interleaved_1f1b" and n % rounds:
            raise ConfigError(f"parallel.n_microbatches={n} does not fit schedule=interleaved_1f1b on "
                              f"{pp} ranks: torch runs n_microbatches // {pp} = {rounds} rounds and needs "
                              f"n_microbatches to be a multiple of that; use a multiple of {pp} (e.g. "
                              f"{rounds * pp}) or fewer than {pp}")
        n_layer = getattr(plan.model, "n_layer", None)  # tfx's GPT spec (GPTConfig)
        if isinstance(n_layer, int) and n_layer < n_stages:
            raise ConfigError(f"{n_stages} pipeline stages ({pp} ranks x stages_per_rank="
                              f"{self.stages_per_rank}) need model.n_layer >= {n_stages}, got {n_layer}; "
                              f"raise model.n_layer or lower stages_per_rank / the number of ranks")

    def device_mesh(self, ctx: RunContext):
        return init_device_mesh(ctx.device_type, (ctx.world_size,), mesh_dim_names=("pp",))

    # -- building -----------------------------------------------------------------------
    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        pp, rank = ctx.mesh.size(), ctx.mesh.get_local_rank()
        n_stages = pp * self.stages_per_rank
        mine = stage_ids(rank, pp, self.stages_per_rank)
        split = split_layers(list(model.layers.keys()), n_stages)
        self._tied = model.head is not None and model.head.weight is model.tok_emb.weight
        views = [stage_view(model, split[s], s == 0, s == n_stages - 1) for s in mine]
        self._first, self._last = 0 in mine, n_stages - 1 in mine
        keep = {k for s in mine for k in split[s]}
        for k in [k for k in model.layers if k not in keep]:
            del model.layers[k]
        if not self._first:
            model.tok_emb = model.pos_emb = None
        if not self._last:
            model.norm = model.head = None
        self._group = ctx.mesh.get_group()
        # both ends of the tied matrix: the rank of stage 0 and the rank of the last stage
        self._embed_group = dist.new_group([0, (n_stages - 1) % pp]) if self._tied else None
        stages = [PipelineStage(v, s, n_stages, ctx.device, group=self._group) for v, s in zip(views, mine)]
        cls = SCHEDULES[self.schedule_name]
        stage_arg = stages if self.stages_per_rank > 1 or cls is ScheduleInterleaved1F1B else stages[0]
        self._schedule = cls(stage_arg, n_microbatches=self.n_microbatches, loss_fn=self._loss,
                             scale_grads=False)
        return model

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ce_sum(logits, labels) * self._scale

    # -- every micro-step -------------------------------------------------------------
    def _run(self, fn, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the schedule (``step`` or ``eval``) and return the batch's summed
        cross-entropy on every rank (only the last stage computes it)."""
        ids, labels = batch["input_ids"], batch["labels"]
        if ids.shape[0] % self.n_microbatches:
            raise ConfigError(f"batch of {ids.shape[0]} sequences is not divisible into "
                              f"parallel.n_microbatches={self.n_microbatches}; change trainer.batch_size")
        losses: List[torch.Tensor] = []
        kwargs = {"target": labels, "losses": losses} if self._last else {}
        fn(*((ids,) if self._first else ()), **kwargs)
        s = torch.stack(losses).sum().detach().float() / self._scale if losses else torch.zeros(())
        dist.all_reduce(s, group=self._group)
        return s

    def forward_backward(self, model, batch, norm, loss_mult, info, ctx) -> torch.Tensor:
        self._scale = loss_mult / norm
        return self._run(self._schedule.step, batch) / norm

    def eval_ce_sum(self, model, batch, ctx) -> torch.Tensor:
        self._scale = 1.0
        return self._run(self._schedule.eval, self._pad(batch))

    def _pad(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Pad a short last evaluation batch with ignored rows: the stages expect the
        micro-batch shape they were built with."""
        n = batch["input_ids"].shape[0]
        want = -(-n // self.n_microbatches) * self.n_microbatches
        want = max(want, getattr(self, "_eval_rows", want))
        self._eval_rows = want
        if n == want:
            return batch
        pad = want - n
        return {"input_ids": torch.cat([batch["input_ids"], batch["input_ids"][:1].expand(pad, -1)]),
                "labels": torch.cat([batch["labels"], torch.full_like(batch["labels"][:1], IGNORE_INDEX)
                                     .expand(pad, -1)])}

    # -- every optimizer step ------------------------------------------------------------
    def before_optimizer_step(self, model, optimizer, info, ctx) -> None:
        """Sum the two halves of the tied embedding gradient (see module docstring)."""
        super().before_optimizer_step(model, optimizer, info, ctx)
        if self._embed_group is None:
            return
        ends = [m.weight for m in (model.tok_emb, model.head) if m is not None]
        for w in ends[:1]:  # a rank holding both ends shares one Parameter
            dist.all_reduce(w.grad, group=self._embed_group)

    def clip_grad_norm(self, model, max_norm: float):
        uncounted = [model.head.weight] if (self._tied and model.head is not None and not self._first) else []
        return clip_grad_norm(model.parameters(), max_norm, pp_group=self._group, uncounted=uncounted)
