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
from tfx.train.build import Job, build, config_dict, resolve_device

__all__ = ["Job", "build", "print_summary", "train"]

NOT_REACHED = "not reached"


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
    state = trainer.state
    trainer.note_eval(val["loss"])  # the final evaluation may be the first to reach the target
    summary = {
        "run_name": run_name or job.run_dir.name,
        "val_loss": val["loss"], "val_ppl": val["ppl"],
        "val_bpb": val.get("bpb"), "val_bits_per_token": val.get("bits_per_token"),
        "tokens_per_sec": tps,
        "step_time_ms": 1000 * tokens_per_step / tps if tps else float("nan"),
        "peak_mem_mb": peak_memory_mb(ctx.device),
        "params": count_params(job.model),
        "step": state.step, "max_steps": loop.max_steps,
        "tokens_seen": state.tokens_seen, "skipped_steps": state.skipped_steps,
        "stop_reason": result["stop_reason"],
        "train_seconds": state.train_seconds,
        **_target_fields(trainer),
        "techniques": job.pipeline.order(),
        "stopped_early": result["stopped"],
        "world_size": ctx.world_size, "dp_size": ctx.dp_size, "device": str(ctx.device),
        **job.pipeline.metrics(),
        "wall_time_s": wall_s,
        "run_dir": str(job.run_dir),
    }
    if trainer.flops is not None:
        flops = trainer.flops.remeasured() if ctx.is_main else trainer.flops  # best of start and end
        summary.update(flops.summary())
        summary.update(flops.utilization(tps))
    if ctx.is_main and result["stop_reason"] != "signal":  # an interrupted run is not exported
        summary.update(job.pipeline.export(job.model, job.run_dir, ctx))
        summary.update(export_hf(job.model, job.run_dir))  # HF models: hf_model/ (save_pretrained)
    if ctx.is_main:
        trainer.metrics.log({f"val/{k}": v for k, v in val.items()}, trainer.state.step)
        trainer.metrics.write_summary(summary)
    return summary


def _target_fields(trainer) -> Dict[str, Any]:
    """``tokens_to_target``/``seconds_to_target``/``steps_to_target``: where the first
    evaluation at or below ``trainer.target_loss`` was ("not reached" otherwise)."""
    target = trainer.loop.target_loss
    if target is None:
        return {}
    rec = trainer.target_record()
    if rec is None:
        return {"target_loss": target, "tokens_to_target": NOT_REACHED, "seconds_to_target": NOT_REACHED,
                "steps_to_target": NOT_REACHED}
    return {"target_loss": target, "tokens_to_target": rec["tokens"], "seconds_to_target": rec["seconds"],
            "steps_to_target": rec["step"]}


def print_summary(summary: Dict[str, Any]) -> None:
    mfu = f" | MFU {summary['mfu']:.1%}" if summary.get("mfu") is not None else ""
    lines = [
        f"val loss {summary['val_loss']:.4f} | val ppl {summary['val_ppl']:.2f}"
        + (f" | val bits/byte {summary['val_bpb']:.4f}" if summary.get("val_bpb") is not None else ""),
        f"tokens/s {summary['tokens_per_sec']:,.0f}{mfu} | peak mem {summary['peak_mem_mb']:,.0f} MB"
        f" | params {summary['params']:,} | steps {summary['step']}",
        f"techniques: {', '.join(summary['techniques']) or 'none'}",
        f"run dir: {summary['run_dir']}",
    ]
    reason = summary.get("stop_reason")
    if reason in ("budget_tokens", "budget_seconds", "target_loss"):
        lines.insert(0, f"stopped by trainer.{reason} at step {summary['step']} "
                        f"({summary['tokens_seen']:,} tokens, {summary['train_seconds']:,.1f} s of training)")
    if summary.get("target_loss") is not None:
        reached = summary["tokens_to_target"] != NOT_REACHED
        lines.insert(0, f"target loss {summary['target_loss']}: " + (
            f"reached after {summary['tokens_to_target']:,} tokens, {summary['seconds_to_target']:,.1f} s "
            f"(step {summary['steps_to_target']})" if reached else NOT_REACHED))
    if summary.get("stopped_early"):
        lines.insert(0, f"stopped early ({summary['stopped_early']}); checkpoint saved: "
                        f"resume with resume=auto hydra.run.dir={summary['run_dir']}")
    print("\n".join(lines))
