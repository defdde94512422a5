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
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from tfx.ckpt import load_weights_from_run, resolve_and_load, saved_structure
from tfx.config import (TrainerConfig, build_loop, build_model, build_techniques, check_choices,
                        optimizer_factory, scheduler_factory)
from tfx.core import CheckpointError, ConfigError, Pipeline, Plan, RunContext, Technique, distributed
from tfx.core.technique import structural_order
from tfx.data import BlockLoader, TokenData, prepare_data
from tfx.log import MetricsWriter
from tfx.train.trainer import Trainer

# bf16 dense peak of known accelerators, for MFU. CPUs: unknown (MFU not reported).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


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


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


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


def _check_resumable(state: Dict[str, Any], pipeline: Pipeline, cfg: DictConfig, data: TokenData,
                     path: Path) -> None:
    """Refuse, in one line, a checkpoint whose shapes or techniques differ from this run."""
    saved, now = state.get("technique_order", []), pipeline.order()
    if structural_order(saved) != structural_order(now):  # parallel layouts may differ
        raise CheckpointError(f"{path} was trained with techniques {saved} but this run has {now}; "
                              f"resume with the same techniques, or start fresh with resume=never")
    old = OmegaConf.create(state.get("config", {}))
    diffs = [f"model.{k}: {old.model.get(k)!r} -> {v!r}" for k, v in cfg.model.items()
             if "model" in old and old.model.get(k) != v]
    if old.get("data", {}).get("seq_len") not in (None, cfg.data.seq_len):
        diffs.append(f"data.seq_len: {old.data.seq_len} -> {cfg.data.seq_len}")
    if state.get("vocab_size") not in (None, data.vocab_size):
        diffs.append(f"vocabulary: {state['vocab_size']} -> {data.vocab_size} tokens")
    elif state.get("tokenizer_id") not in (None, data.cache_path.name):
        diffs.append(f"tokenizer/data: {state['tokenizer_id']} -> {data.cache_path.name}")
    if diffs:
        raise CheckpointError(f"{path} does not fit this run ({'; '.join(diffs)}); resume with the "
                              f"settings it was trained with, or start fresh with resume=never")


def build(cfg: DictConfig, run_dir, data: Optional[TokenData] = None,
          extra_techniques: Sequence[Technique] = ()) -> Job:
    """Build a job; ``extra_techniques`` (e.g. test probes) join the configured ones."""
    # 1. instantiate what holds no tensors
    check_choices(cfg)
    loop = build_loop(cfg)
    techniques = build_techniques(cfg) + list(extra_techniques)
    pipeline = Pipeline(techniques)
    make_optimizer, make_scheduler = optimizer_factory(cfg), scheduler_factory(cfg)
    device = resolve_device(loop.device)
    rank, local_rank, world = distributed.env_world()
    # 2. validate (pure)
    plan = Plan(techniques, world_size=world, device_type=device.type, accum_steps=loop.accum_steps)
    pipeline.validate(plan)
    facts = plan.facts()
    distributed.init_distributed(device)
    run_dir = Path(run_dir)
    ctx = RunContext(device=device, rank=rank, local_rank=local_rank, world_size=world, run_dir=run_dir,
                     facts=facts, seed=cfg.seed)
    mesh = pipeline.device_mesh(ctx)
    dp_rank, dp_size = distributed.dp_coords(mesh, rank, world)
    # 3. data, and the checkpoint to resume from (read once)
    data = data or _prepare_data(cfg, ctx.is_main)
    ckpt_dir = run_dir / "checkpoints"
    resume_path, state = resolve_and_load(cfg.resume, ckpt_dir)
    if state is not None:
        _check_resumable(state, pipeline, cfg, data, resume_path)
    ctx = dataclasses.replace(ctx, mesh=mesh, dp_rank=dp_rank, dp_size=dp_size,
                              vocab_size=data.vocab_size, tokenizer_id=data.cache_path.name,
                              train_data=data.train,
                              resuming=state is not None,
                              structure=saved_structure(state) if state is not None else {})
    # 4. model, trained weights to start from, techniques in stage order
    seed_everything(cfg.seed)  # same initial weights on every rank
    model = build_model(cfg, data.vocab_size, cfg.data.seq_len).to(ctx.device)
    if facts.from_checkpoint and not ctx.resuming:
        load_weights_from_run(model, facts.from_checkpoint)
    model = pipeline.apply_to_model(model, ctx)
    # 5. optimizer and scheduler
    optimizer = pipeline.wrap_optimizer(make_optimizer(model), model, ctx)
    scheduler = make_scheduler(optimizer, loop.max_steps)
    # 6. trainer; every stateful part loaded once
    loader = BlockLoader(data.train, loop.batch_size, seed=cfg.seed, rank=ctx.dp_rank, world_size=ctx.dp_size)
    fpt = flops_fn(model)
    meta = {"config": config_dict(cfg), "vocab_size": data.vocab_size, "tokenizer_id": ctx.tokenizer_id}
    trainer = Trainer(model, optimizer, scheduler, pipeline, loader, data.val, ctx, loop,
                      MetricsWriter(run_dir, enabled=ctx.is_main), ckpt_dir, checkpoint_meta=meta,
                      flops_per_token=fpt(cfg.data.seq_len) if fpt else 0.0, peak_flops=peak_flops(ctx.device))
    if state is not None:
        trainer.load_state(state)
    return Job(cfg, ctx, data, model, pipeline, trainer, run_dir, ckpt_dir, resume_path)


def flops_fn(model: torch.nn.Module):
    """The model's ``flops_per_token(seq_len)`` under any wrapper (DDP, FSDP, compile,
    pipeline stages), or None when the model does not say."""
    return next((m.flops_per_token for m in model.modules() if hasattr(m, "flops_per_token")), None)
