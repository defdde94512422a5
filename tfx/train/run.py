"""One training job from a composed config: build, (resume,) train, evaluate, summarise.

``train.py`` is a thin Hydra wrapper around :func:`train`; tests and notebooks call
:func:`build` (the build order, :mod:`tfx.train.build`) and :func:`train` directly.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig

from tfx.ckpt import RunDirLock, clean_stale_temps
from tfx.core import TrainingError, distributed
from tfx.data import TokenData
from tfx.log import WandbLogger, peak_memory_mb, reset_peak_memory
from tfx.model import count_params, export_hf
from tfx.train.build import Job, build, config_dict, flops_fn, resolve_device

__all__ = ["Job", "build", "print_summary", "train"]


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
    lock = RunDirLock(run_dir) if distributed.env_world()[0] == 0 else None
    if lock is not None:
        lock.acquire()  # a second run on this directory refuses instead of interleaving
    try:
        return _train_locked(cfg, run_dir, run_name, group, data, start)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(cfg, run_dir, run_name, group, data, start) -> Dict[str, Any]:
    if distributed.env_world()[0] == 0:
        clean_stale_temps(Path(run_dir) / "checkpoints")  # left by crashed runs
    job = build(cfg, run_dir, data=data)
    ctx, trainer = job.ctx, job.trainer
    wandb = _start_wandb(cfg, job, run_name, group) if ctx.is_main else None
    trainer.wandb = wandb
    exit_code = 1
    try:
        if job.resumed_from is not None and ctx.is_main:
            print(f"resumed from {job.resumed_from} at step {trainer.state.step}")
        trainer.install_signal_handlers()
        result = trainer.fit()
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
    val = trainer.evaluate(max_batches=job.loop.final_eval_batches)
    if not math.isfinite(val["loss"]):  # never a summary (or an Optuna objective) of nan
        last = trainer.last_ckpt
        raise TrainingError(f"final validation loss is {val['loss']} after {trainer.state.step} steps; "
                            f"lower optim.lr or use precision=fp32"
                            + (f"; last checkpoint: {last}" if last else ""))
    loop = job.loop
    tokens_per_step = loop.batch_size * loop.accum_steps * ctx.dp_size * cfg.data.seq_len
    tps = _throughput(result["step_times"], tokens_per_step)
    fpt = flops_fn(job.model)
    summary = {
        "run_name": run_name or job.run_dir.name,
        "val_loss": val["loss"], "val_ppl": val["ppl"],
        "val_bpb": val.get("bpb"), "val_bits_per_token": val.get("bits_per_token"),
        "tokens_per_sec": tps,
        "step_time_ms": 1000 * tokens_per_step / tps if tps else float("nan"),
        "peak_mem_mb": peak_memory_mb(ctx.device),
        "params": count_params(job.model),
        "step": trainer.state.step, "max_steps": loop.max_steps,
        "tokens_seen": trainer.state.tokens_seen, "skipped_steps": trainer.state.skipped_steps,
        "techniques": job.pipeline.order(),
        "stopped_early": result["stopped"],
        "world_size": ctx.world_size, "dp_size": ctx.dp_size, "device": str(ctx.device),
        **job.pipeline.metrics(),
        "wall_time_s": wall_s,
        "run_dir": str(job.run_dir),
    }
    if fpt is not None:
        achieved = fpt(cfg.data.seq_len) * tps
        summary["tflops"] = achieved / 1e12
        if trainer.peak_flops:
            summary["mfu"] = achieved / trainer.peak_flops
    if ctx.is_main and result["stopped"] is None:
        summary.update(job.pipeline.export(job.model, job.run_dir, ctx))
        summary.update(export_hf(job.model, job.run_dir))  # HF models: hf_model/ (save_pretrained)
    if ctx.is_main:
        trainer.metrics.log({f"val/{k}": v for k, v in val.items()}, trainer.state.step)
        trainer.metrics.write_summary(summary)
    return summary


def print_summary(summary: Dict[str, Any]) -> None:
    lines = [
        f"val loss {summary['val_loss']:.4f} | val ppl {summary['val_ppl']:.2f}"
        + (f" | val bits/byte {summary['val_bpb']:.4f}" if summary.get("val_bpb") is not None else ""),
        f"tokens/s {summary['tokens_per_sec']:,.0f} | peak mem {summary['peak_mem_mb']:,.0f} MB"
        f" | params {summary['params']:,} | steps {summary['step']}",
        f"techniques: {', '.join(summary['techniques']) or 'none'}",
        f"run dir: {summary['run_dir']}",
    ]
    if summary.get("stopped_early"):
        lines.insert(0, f"stopped early ({summary['stopped_early']}); checkpoint saved: "
                        f"resume with resume=auto hydra.run.dir={summary['run_dir']}")
    print("\n".join(lines))
