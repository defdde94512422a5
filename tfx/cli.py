"""What train.py and evaluate.py do once Hydra has composed the config.

User errors (:class:`tfx.core.TfxError`) are printed as one line, without a
traceback, and exit with status 2.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import DictConfig, open_dict

from tfx.core import TfxError
from tfx.eval_run import evaluate_run
from tfx.log.console import tee_to
from tfx.launch import WorkerFailed, launch, needs_launch, rank0_run_dir
from tfx.train.run import print_summary, train


def _hydra_run_info() -> tuple[Path, Optional[str], Optional[str]]:
    """(output dir, run name from the overrides, W&B group = the sweep directory)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    name = hc.job.override_dirname or "default"
    group = None
    if hc.mode == RunMode.MULTIRUN:
        group = Path(hc.sweep.dir).as_posix().replace("/", "_").strip("_")
    return run_dir, name, group


def fail(err: Exception) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def train_job(cfg: DictConfig) -> float:
    run_dir, name, group = _hydra_run_info()
    run_dir = rank0_run_dir(cfg, run_dir)  # under torchrun: one directory for all ranks
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    is_main = int(os.environ.get("RANK", 0)) == 0
    with tee_to(run_dir / "train.log") if is_main else contextlib.nullcontext():
        try:
            if needs_launch(cfg):  # parallel=... without torchrun: start the workers here
                summary = launch(cfg, run_dir, run_name=name, group=group)
            else:
                summary = train(cfg, run_dir, run_name=name, group=group)
        except TfxError as err:
            fail(err)
        except WorkerFailed as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        if is_main:
            print_summary(summary)
    return float(summary["val_loss"])


def evaluate_job(cfg: DictConfig) -> Dict[str, Any]:
    try:
        result = evaluate_run(cfg.run, batch_size=cfg.batch_size, device=cfg.device,
                              max_batches=cfg.max_batches, speed_batches=cfg.speed_batches,
                              splits=list(cfg.splits))
    except TfxError as err:
        fail(err)
    print(json.dumps(result, indent=2))
    return result
