"""The build order, written once: every entry point (train.py, the launcher's
workers, tests, notebooks) builds a job through :func:`build`.

1. compose (Hydra) and instantiate what holds no tensors: loop config, techniques,
   optimizer and scheduler factories (typos and bad values fail here, before work);
2. ``validate`` every technique against the plan (pure: reads, never mutates);
3. data; then the checkpoint to resume from, read once (its meta says how the
   techniques rebuild the model's structure: ``ctx.resuming``/``ctx.structure``);
4. the model; trained weights a technique starts from (``from_checkpoint``, fresh
   runs only); every technique's ``apply_to_model`` in stage order;
5. the optimizer (``wrap_optimizer``) and scheduler;
6. the trainer, whose :class:`~tfx.ckpt.CheckpointManager` loads every stateful part
   of the checkpoint exactly once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import io
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from tfx.ckpt import load_weights_from_run, resolve_and_load, saved_structure
from tfx.config import (TrainerConfig, build_loop, build_model, build_techniques, check_choices,
                        model_spec, optimizer_factory, scheduler_factory, use_model_tokenizer)
from tfx.core import CheckpointError, ConfigError, Pipeline, Plan, RunContext, Technique, distributed
from tfx.core.technique import Stage, structural_order
from tfx.data import BlockLoader, TokenData, prepare_data
from tfx.flops import Flops, flops_fn, peak_flops, recompute_flops_per_token, run_dtype
from tfx.log import MetricsWriter
from tfx.model.anatomy import anatomy_of
from tfx.train.trainer import Trainer


@dataclass
class Job:
    """Everything :func:`build` made; ``trainer.fit()`` runs it."""
    cfg: DictConfig
    ctx: RunContext
    data: TokenData
    model: torch.nn.Module
    pipeline: Pipeline
    trainer: Trainer
    run_dir: Path
    ckpt_dir: Path
    resumed_from: Optional[Path]

    @property
    def loop(self) -> TrainerConfig:
        return self.trainer.loop


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ConfigError(f"trainer.device={spec!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={spec} but CUDA is not available; use trainer.device=auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def config_dict(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def _prepare_data(cfg: DictConfig, is_main: bool) -> TokenData:
    # Rank 0 builds the cache; the others then read it instead of all building it.
    if is_main:
        data = prepare_data(cfg.data)
    distributed.barrier()
    if is_main:
        return data
    with contextlib.redirect_stdout(io.StringIO()):  # one "data: ..." line per job, not per rank
        return prepare_data(cfg.data)


#: Settings a resume may change; they apply from the resumed step on (``fnmatch`` patterns).
#: A changed ``trainer.max_steps`` re-stretches the schedule: the scheduler is built with
#: the new value and only its position (``last_epoch``) is loaded, so warm-up/decay then
#: end at the new last step. ``trainer.batch_size`` may change only with the number of
#: data-parallel ranks, keeping ``batch_size x ranks`` (the data position) the same.
#: Any other change (``optim.*``, ``scheduler.*``, ``seed``, ``trainer.batch_size``/
#: ``accum_steps``/``grad_clip``, ``data.*``, techniques ...) is refused with the diff.
RESUME_MAY_CHANGE = (
    "trainer.max_steps", "trainer.eval_every", "trainer.eval_batches", "trainer.final_eval_batches",
    "trainer.log_every", "trainer.ckpt_every", "trainer.keep_last", "trainer.progress",
    "trainer.device", "trainer.max_bad_steps", "trainer.max_scaler_skips", "trainer.deterministic",
    "trainer.budget_tokens", "trainer.budget_seconds", "trainer.target_loss", "trainer.peak_tflops",
    "logger", "logger.*", "resume", "run_dir", "experiment", "hydra", "hydra.*", "data.cache_dir",
    "parallel", "parallel.*",
)
RESUMES_LOG = "resumes.jsonl"  # one line per resume: checkpoint, step, applied changes
_UNSET = object()


def _config_diff(old: Any, new: Any, prefix: str = "") -> List[tuple]:
    """``(key, old, new)`` for every leaf (or whole subtree present on one side only)
    that differs; ``_UNSET`` marks a side that lacks the key."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: List[tuple] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _config_diff(old.get(k, _UNSET), new.get(k, _UNSET), f"{prefix}{k}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def _show(value: Any) -> str:
    text = "(unset)" if value is _UNSET else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _resume_changes(state: Dict[str, Any], cfg: DictConfig, path: Path, dp_size: int) -> Dict[str, list]:
    """Compare this run's resolved config with the checkpoint's: refuse (one line, the
    diff) unless every change is in :data:`RESUME_MAY_CHANGE`; return the applied ones."""
    old = state.get("config") or {}
    if not old:  # written without a config (tests, old tfx): nothing to compare
        return {}
    diffs = _config_diff(old, config_dict(cfg))
    applied, refused = {}, []
    for key, before, after in diffs:
        if any(fnmatch.fnmatchcase(key, pat) for pat in RESUME_MAY_CHANGE):
            applied[key] = [None if before is _UNSET else before, None if after is _UNSET else after]
        elif key == "trainer.batch_size" and state.get("global_batch") == after * dp_size:
            applied[key] = [before, after]  # another data-parallel layout, same global batch
        else:
            refused.append(f"{key}: {_show(before)} -> {_show(after)}")
    if refused:
        more = f" and {len(refused) - 8} more" if len(refused) > 8 else ""
        raise CheckpointError(
            f"{path} was trained with other settings ({'; '.join(refused[:8])}{more}); a resume may "
            f"change only trainer cadence/limits (max_steps, eval_*, log_every, ckpt_every, keep_last, "
            f"...), device, logger and parallel layout: rerun with the checkpoint's values, or start "
            f"fresh with resume=never")
    return applied


def _record_resume(run_dir: Path, path: Path, state: Dict[str, Any], applied: Dict[str, list]) -> None:
    """Print the applied changes once and append them to ``run_dir/resumes.jsonl``."""
    if applied:
        changes = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in applied.items())
        print(f"resume: applying changed settings from {path.name}: {changes} "
              f"(recorded in {run_dir / RESUMES_LOG})")
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": str(path),
             "step": state.get("step"), "changes": applied}
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / RESUMES_LOG, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
    except OSError as err:  # the checkpoint writes will say what is wrong with the directory
        print(f"warning: could not record the resume in {run_dir / RESUMES_LOG}: {err}", file=sys.stderr)


def _check_resumable(state: Dict[str, Any], pipeline: Pipeline, cfg: DictConfig, data: TokenData,
                     path: Path, run_dir: Optional[Path] = None, dp_size: int = 1,
                     is_main: bool = True) -> None:
    """Refuse, in one line, a checkpoint whose shapes, techniques or hyperparameters
    differ from this run; print and record (``run_dir/resumes.jsonl``) the settings a
    resume may change (:data:`RESUME_MAY_CHANGE`) that did."""
    saved, now = state.get("technique_order", []), pipeline.order()
    if structural_order(saved) != structural_order(now):  # parallel layouts may differ
        raise CheckpointError(f"{path} was trained with techniques {saved} but this run has {now}; "
                              f"resume with the same techniques, or start fresh with resume=never")
    # model.* and data.* (shapes, seq_len) are refused by the config diff below; the data
    # itself can differ under the same config (another tokenizer build, files changed)
    diffs = []
    if state.get("vocab_size") not in (None, data.vocab_size):
        diffs.append(f"vocabulary: {state['vocab_size']} -> {data.vocab_size} tokens")
    elif state.get("tokenizer_id") not in (None, data.cache_path.name):
        diffs.append(f"tokenizer/data: {state['tokenizer_id']} -> {data.cache_path.name}")
    if diffs:
        raise CheckpointError(f"{path} does not fit this run ({'; '.join(diffs)}); resume with the "
                              f"settings it was trained with, or start fresh with resume=never")
    applied = _resume_changes(state, cfg, path, dp_size)
    if is_main and run_dir is not None:
        _record_resume(Path(run_dir), path, state, applied)


def build(cfg: DictConfig, run_dir, data: Optional[TokenData] = None,
          extra_techniques: Sequence[Technique] = ()) -> Job:
    """Build a job; ``extra_techniques`` (e.g. test probes) join the configured ones."""
    # 1. instantiate what holds no tensors
    check_choices(cfg)
    loop = build_loop(cfg)
    techniques = build_techniques(cfg) + list(extra_techniques)
    pipeline = Pipeline(techniques)
    make_optimizer, make_scheduler = optimizer_factory(cfg), scheduler_factory(cfg)
    spec = model_spec(cfg)  # an HF spec reads its config: a bad name or no network fails here
    use_model_tokenizer(cfg, spec)  # an HF model's own tokenizer becomes cfg.data.tokenizer
    device = resolve_device(loop.device)
    rank, local_rank, world = distributed.env_world()
    # 2. validate (pure)
    plan = Plan(techniques, world_size=world, device_type=device.type, accum_steps=loop.accum_steps,
                model=spec, max_steps=loop.max_steps, batch_size=loop.batch_size)
    pipeline.validate(plan)
    facts = plan.facts()
    distributed.init_distributed(device)
    run_dir = Path(run_dir)
    ctx = RunContext(device=device, rank=rank, local_rank=local_rank, world_size=world, run_dir=run_dir,
                     facts=facts, seed=cfg.seed, max_steps=loop.max_steps)
    mesh = pipeline.device_mesh(ctx)
    dp_rank, dp_size = distributed.dp_coords(mesh, rank, world)
    # 3. data, and the checkpoint to resume from (read once)
    data = data or _prepare_data(cfg, ctx.is_main)
    ckpt_dir = run_dir / "checkpoints"
    resume_path, state = resolve_and_load(cfg.resume, ckpt_dir)
    if state is not None:
        _check_resumable(state, pipeline, cfg, data, resume_path, run_dir=run_dir, dp_size=dp_size,
                         is_main=ctx.is_main)
    ctx = dataclasses.replace(ctx, mesh=mesh, dp_rank=dp_rank, dp_size=dp_size,
                              vocab_size=data.vocab_size, tokenizer_id=data.cache_path.name,
                              train_data=data.train,
                              resuming=state is not None,
                              structure=saved_structure(state) if state is not None else {})
    # 4. model, trained weights to start from, techniques in stage order
    seed_everything(cfg.seed)  # same initial weights on every rank
    model = build_model(cfg, data.vocab_size, cfg.data.seq_len, spec=spec).to(ctx.device)
    if facts.from_checkpoint and not ctx.resuming:
        load_weights_from_run(model, facts.from_checkpoint)
    early = {t.stage for t in pipeline.techniques if t.stage < Stage.PIPELINE}
    model = pipeline.apply_to_model(model, ctx, stages=early)
    model_flops = _model_flops(model, cfg.data.seq_len)  # the whole model, before any split
    model = pipeline.apply_to_model(model, ctx, stages={t.stage for t in pipeline.techniques} - early)
    # 5. optimizer and scheduler
    optimizer = pipeline.wrap_optimizer(make_optimizer(model), model, ctx)
    scheduler = make_scheduler(optimizer, loop.max_steps)
    # 6. trainer; every stateful part loaded once
    loader = BlockLoader(data.train, loop.batch_size, seed=cfg.seed, rank=ctx.dp_rank, world_size=ctx.dp_size)
    meta = {"config": config_dict(cfg), "vocab_size": data.vocab_size, "tokenizer_id": ctx.tokenizer_id,
            "global_batch": loop.batch_size * ctx.dp_size}
    trainer = Trainer(model, optimizer, scheduler, pipeline, loader, data.val, ctx, loop,
                      MetricsWriter(run_dir, enabled=ctx.is_main), ckpt_dir, checkpoint_meta=meta,
                      flops=_flops(model, model_flops, cfg.data.seq_len, loop, ctx), tokenizer=data.tokenizer)
    if state is not None:
        trainer.load_state(state)
    if ctx.is_main:
        _note_budget(loop, cfg.data.seq_len * loop.batch_size * loop.accum_steps * ctx.dp_size)
    return Job(cfg, ctx, data, model, pipeline, trainer, run_dir, ckpt_dir, resume_path)


def _model_flops(model: torch.nn.Module, seq_len: int) -> Optional[tuple]:
    """(FLOPs per token, decoder layers) of the whole model after SURGERY, before
    pipeline stages drop layers; None when the model has no ``flops_per_token``."""
    fn = flops_fn(model)
    if fn is None:
        return None
    try:
        layers = len(anatomy_of(model).decoder_layers(model))
    except ConfigError:  # a model without a tfx anatomy: no pipeline stages either
        layers = None
    return fn(seq_len), layers


def _flops(model: torch.nn.Module, model_flops: Optional[tuple], seq_len: int, loop: TrainerConfig,
           ctx: RunContext) -> Optional[Flops]:
    """What MFU/HFU need; the peak only on rank 0 (the only rank that logs them; on a
    CPU it is measured, see :func:`tfx.flops.peak_flops`)."""
    if model_flops is None:
        return None
    per_token, layers = model_flops
    dtype = run_dtype(ctx.facts.compute_dtype, model)
    peak, source = peak_flops(ctx.device, dtype, loop.peak_tflops) if ctx.is_main else (None, "")
    hardware = per_token + recompute_flops_per_token(model, seq_len, total_layers=layers)
    return Flops(per_token, hardware, peak, ctx.world_size, source, dtype)


def _note_budget(loop: TrainerConfig, tokens_per_step: int) -> None:
    """The learning-rate schedule follows ``trainer.max_steps``: say so when the token
    budget ends the run well before it (the rate would still be high)."""
    if loop.budget_tokens is None:
        return
    steps = -(-loop.budget_tokens // tokens_per_step)
    if steps < loop.max_steps:
        print(f"note: trainer.budget_tokens={loop.budget_tokens} ends the run near step {steps} of "
              f"trainer.max_steps={loop.max_steps}; the learning-rate schedule follows max_steps "
              f"(set trainer.max_steps={steps} to finish its decay within the budget)")
