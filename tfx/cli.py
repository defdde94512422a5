"""What train.py and evaluate.py do once Hydra has composed the config.

User errors (:class:`tfx.core.TfxError`) are printed as one line, without a
traceback, and exit with status 2.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

from tfx.core import ConfigError, TfxError
from tfx.eval_run import evaluate_pretrained, evaluate_run
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


def check_group_overrides(args, conf_dir) -> None:
    """A config group given something other than option names (``experiment=0``,
    ``precision=[1]``, ``optim=null``) makes Hydra 1.3 fail with a traceback while it
    composes: a :class:`ConfigError` instead, before Hydra starts."""
    parser = OverridesParser.create()
    for arg in args:
        if "=" not in arg or arg.startswith("-"):
            continue  # flags (-m, --cfg job ...)
        try:
            override = parser.parse_override(arg)
        except Exception:  # a syntax error: Hydra reports it itself
            continue
        group = Path(conf_dir) / override.key_or_group
        if override.is_delete() or not group.is_dir():
            continue
        value = override._value
        if isinstance(value, ChoiceSweep):
            value = value.list
        elif override.is_sweep_override():  # glob(...), range(...): Hydra checks those
            continue
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) and v for v in items):
            options = sorted(p.stem for p in group.glob("*.yaml"))
            raise ConfigError(f"{arg}: the config group {override.key_or_group} takes an option name "
                              f"(or a list of them); choose from {options}")


def preflight(args, conf_dir) -> None:
    """Checks of the command line Hydra would answer with a traceback (train.py)."""
    try:
        check_group_overrides(args, conf_dir)
    except TfxError as err:
        fail(err)


class OutputDirCheck(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/train.yaml): an output directory that
    cannot be created or written (read-only disk, a path under a file, no permission)
    ends in one ``error:`` line and exit 2 before Hydra writes its ``.hydra`` files."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable_dir(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable_dir(config.hydra.sweep.dir, "hydra.sweep.dir")


def check_writable_dir(path, key: str) -> None:
    directory = Path(path).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        fail(ConfigError(f"cannot write to the output directory {directory} "
                         f"({err.strerror or type(err).__name__}); set {key} to a writable directory"))


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
    """``run=<dir>``: a trained run (eval.json in the run); ``model=<name>`` without a
    run: a pretrained model as it is, on ``data=...`` (eval.json in Hydra's output dir)."""
    kwargs = dict(batch_size=cfg.batch_size, device=cfg.device, max_batches=cfg.max_batches,
                  speed_batches=cfg.speed_batches, splits=list(cfg.splits))
    run, model = cfg.get("run"), cfg.get("model")
    try:
        if run and model:
            raise ConfigError("give run=<run directory> or model=<pretrained model>, not both "
                              "(a run evaluates the model it trained)")
        if run:
            result = evaluate_run(run, **kwargs)
        elif model:
            from hydra.core.hydra_config import HydraConfig

            result = evaluate_pretrained(cfg, HydraConfig.get().runtime.output_dir, **kwargs)
        else:
            raise ConfigError("nothing to evaluate: give run=<run directory or checkpoint> or "
                              "model=<pretrained model>, e.g. model=smollm2")
    except TfxError as err:
        fail(err)
    print(json.dumps(result, indent=2))
    return result
