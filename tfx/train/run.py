"""One training job from a composed config: build, (resume,) train, evaluate, summarise.

``train.py`` is a thin Hydra wrapper around :func:`train`; tests and notebooks call
:func:`build` and :func:`train` directly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig

from tfx.ckpt import load_checkpoint, resolve_resume
from tfx.config import build_techniques, check_choices
from tfx.core import CheckpointError, Pipeline, Plan, RunContext, Technique
from tfx.core.technique import structural_order
from tfx.data import BlockLoader, TokenData, prepare_data
from tfx.evaluation import count_params
from tfx.log import MetricsWriter, WandbLogger, peak_memory_mb, reset_peak_memory
from tfx.optim import build_optimizer, build_scheduler
from tfx.train import distributed
from tfx.train.build import autocast_dtype, build_model, config_dict, resolve_device, seed_everything
from tfx.train.trainer import LoopConfig, Trainer

# bf16 dense peak of known accelerators, for MFU. CPUs: unknown (MFU not reported).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


@dataclass
class Job:
    """Everything :func:`build` made; ``trainer.fit`` runs it."""
    cfg: DictConfig
    ctx: RunContext
    data: TokenData
    model: torch.nn.Module
    pipeline: Pipeline
    trainer: Trainer
    run_dir: Path
    ckpt_dir: Path
    resumed_from: Optional[Path]


def _context(cfg: DictConfig, techniques, run_dir: Path, data: Optional[TokenData],
             mesh=None) -> RunContext:
    rank, local_rank, world = distributed.env_world()
    device = resolve_device(cfg.trainer.device)
    dp_rank, dp_size = distributed.dp_coords(mesh, rank, world)
    return RunContext(device=device, rank=rank, local_rank=local_rank, world_size=world,
                      run_dir=run_dir, autocast_dtype=autocast_dtype(techniques), seed=cfg.seed,
                      mesh=mesh, dp_rank=dp_rank, dp_size=dp_size,
                      vocab_size=data.vocab_size if data else None,
                      tokenizer_id=data.cache_path.name if data else None)


def _prepare_data(cfg: DictConfig, ctx: RunContext) -> TokenData:
    # Rank 0 builds the cache; the others then read it instead of all building it.
    if ctx.is_main:
        data = prepare_data(cfg.data)
    distributed.barrier()
    return data if ctx.is_main else prepare_data(cfg.data)


def build(cfg: DictConfig, run_dir, data: Optional[TokenData] = None,
          extra_techniques: Sequence[Technique] = ()) -> Job:
    """Build a job; ``extra_techniques`` (e.g. test probes) join the configured ones."""
    check_choices(cfg)
    run_dir = Path(run_dir)
    techniques = build_techniques(cfg) + list(extra_techniques)
    device = resolve_device(cfg.trainer.device)
    distributed.init_distributed(device)
    ctx = _context(cfg, techniques, run_dir, None)
    pipeline = Pipeline(techniques)
    pipeline.validate(Plan(techniques, world_size=ctx.world_size, device_type=device.type,
                           accum_steps=cfg.optim.accum_steps))
    data = data or _prepare_data(cfg, ctx)
    ctx = _context(cfg, techniques, run_dir, data, mesh=pipeline.device_mesh(ctx))

    ckpt_dir = run_dir / "checkpoints"
    resume_path = resolve_resume(cfg.resume, ckpt_dir)
    state = load_checkpoint(resume_path) if resume_path else None
    if state is not None:
        _check_resumable(state, pipeline, resume_path)
        pipeline.load_state_dict(state.get("techniques", {}))

    seed_everything(cfg.seed)  # same initial weights on every rank
    model = build_model(cfg.model, data.vocab_size, cfg.data.seq_len).to(ctx.device)
    model = pipeline.apply_to_model(model, ctx)
    optim = cfg.optim
    optimizer = build_optimizer(model, name=optim.name, lr=optim.lr, weight_decay=optim.weight_decay,
                                betas=optim.betas, eps=optim.eps, momentum=optim.momentum)
    optimizer = pipeline.wrap_optimizer(optimizer, model, ctx)
    scheduler = build_scheduler(optimizer, optim.schedule, optim.warmup_steps,
                                cfg.trainer.max_steps, optim.min_lr_ratio)
    loader = BlockLoader(data.train, cfg.trainer.batch_size, seed=cfg.seed,
                         rank=ctx.dp_rank, world_size=ctx.dp_size)
    t = cfg.trainer
    loop = LoopConfig(max_steps=t.max_steps, accum_steps=optim.accum_steps, grad_clip=optim.grad_clip,
                      log_every=t.log_every, eval_every=t.eval_every, eval_batches=t.eval_batches,
                      eval_batch_size=t.batch_size, ckpt_every=t.ckpt_every, keep_last=t.keep_last,
                      max_bad_steps=t.max_bad_steps, progress=t.progress)
    raw = _unwrapped_gpt(model)
    meta = {"config": config_dict(cfg), "vocab_size": data.vocab_size, "tokenizer_id": ctx.tokenizer_id}
    trainer = Trainer(model, optimizer, scheduler, pipeline, loader, data.val, ctx, loop,
                      MetricsWriter(run_dir, enabled=ctx.is_main), checkpoint_meta=meta,
                      flops_per_token=raw.flops_per_token(cfg.data.seq_len) if raw else 0.0,
                      peak_flops=peak_flops(ctx.device))
    if state is not None:
        trainer.load_state(state)
    return Job(cfg, ctx, data, model, pipeline, trainer, run_dir, ckpt_dir, resume_path)


def _unwrapped_gpt(model):
    from tfx.model import GPT

    return next((m for m in model.modules() if isinstance(m, GPT)), None)


def _check_resumable(state: Dict[str, Any], pipeline: Pipeline, path: Path) -> None:
    saved, now = state.get("technique_order", []), pipeline.order()
    if structural_order(saved) != structural_order(now):  # parallel layouts may differ
        raise CheckpointError(f"{path} was trained with techniques {saved} but this run has {now}; "
                              f"resume with the same techniques, or start fresh with resume=never")


def _throughput(step_times: List[float], tokens_per_step: int) -> float:
    """Tokens/s over the steady state (the first steps include warm-up and compilation)."""
    skip = min(5, len(step_times) // 5)
    times = step_times[skip:] or step_times
    return tokens_per_step * len(times) / sum(times) if times and sum(times) > 0 else 0.0


def train(cfg: DictConfig, run_dir, run_name: Optional[str] = None, group: Optional[str] = None,
          data: Optional[TokenData] = None) -> Dict[str, Any]:
    """Run one job; return (and on rank 0 write) the summary."""
    start = time.perf_counter()
    reset_peak_memory(resolve_device(cfg.trainer.device))  # multirun jobs share a process
    job = build(cfg, run_dir, data=data)
    ctx, trainer = job.ctx, job.trainer
    wandb = _start_wandb(cfg, job, run_name, group) if ctx.is_main else None
    trainer.wandb = wandb
    exit_code = 1
    try:
        if job.resumed_from is not None and ctx.is_main:
            print(f"resumed from {job.resumed_from} at step {trainer.state.step}")
        trainer.install_signal_handlers()
        result = trainer.fit(job.ckpt_dir)
        summary = _finish(job, result, run_name, time.perf_counter() - start)
        if wandb is not None:
            wandb.summary(summary)
        exit_code = 0
        return summary
    finally:
        trainer.metrics.close()
        if wandb is not None:
            wandb.finish(exit_code)  # always, so multirun jobs never merge into one W&B run


def _start_wandb(cfg, job: Job, run_name, group):
    lc = cfg.logger
    if lc.backend == "none":
        return None
    tags = list(lc.tags) + [t.key for t in job.pipeline.techniques]
    return WandbLogger(job.run_dir, project=lc.project, entity=lc.entity, name=run_name or job.run_dir.name,
                       group=lc.group or group, tags=tags, config=config_dict(cfg), mode=lc.mode)


def _finish(job: Job, result: Dict[str, Any], run_name, wall_s: float) -> Dict[str, Any]:
    cfg, ctx, trainer = job.cfg, job.ctx, job.trainer
    val = trainer.evaluate(max_batches=cfg.trainer.final_eval_batches)
    tokens_per_step = cfg.trainer.batch_size * cfg.optim.accum_steps * ctx.dp_size * cfg.data.seq_len
    tps = _throughput(result["step_times"], tokens_per_step)
    raw = _unwrapped_gpt(job.model)
    summary = {
        "run_name": run_name or job.run_dir.name,
        "val_loss": val["loss"], "val_ppl": val["ppl"],
        "tokens_per_sec": tps,
        "step_time_ms": 1000 * tokens_per_step / tps if tps else float("nan"),
        "peak_mem_mb": peak_memory_mb(ctx.device),
        "params": count_params(job.model),
        "step": trainer.state.step, "max_steps": cfg.trainer.max_steps,
        "tokens_seen": trainer.state.tokens_seen, "skipped_steps": trainer.state.skipped_steps,
        "techniques": job.pipeline.order(),
        "stopped_early": result["stopped"],
        "world_size": ctx.world_size, "dp_size": ctx.dp_size, "device": str(ctx.device),
        **job.pipeline.metrics(),
        "wall_time_s": wall_s,
        "run_dir": str(job.run_dir),
    }
    if raw is not None:
        achieved = raw.flops_per_token(cfg.data.seq_len) * tps
        summary["tflops"] = achieved / 1e12
        if trainer.peak_flops:
            summary["mfu"] = achieved / trainer.peak_flops
    if ctx.is_main and result["stopped"] is None:
        summary.update(job.pipeline.export(job.model, job.run_dir, ctx))
    if ctx.is_main:
        trainer.metrics.log({"val/loss": val["loss"], "val/ppl": val["ppl"]}, trainer.state.step)
        trainer.metrics.write_summary(summary)
    return summary


def print_summary(summary: Dict[str, Any]) -> None:
    lines = [
        f"val loss {summary['val_loss']:.4f} | val ppl {summary['val_ppl']:.2f}",
        f"tokens/s {summary['tokens_per_sec']:,.0f} | peak mem {summary['peak_mem_mb']:,.0f} MB"
        f" | params {summary['params']:,} | steps {summary['step']}",
        f"techniques: {', '.join(summary['techniques']) or 'none'}",
        f"run dir: {summary['run_dir']}",
    ]
    if summary.get("stopped_early"):
        lines.insert(0, f"stopped early ({summary['stopped_early']}); checkpoint saved: "
                        f"resume with resume=auto hydra.run.dir={summary['run_dir']}")
    print("\n".join(lines))
