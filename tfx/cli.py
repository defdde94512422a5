"""What train.py and evaluate.py do once Hydra has composed the config.

User errors (:class:`tfx.core.TfxError`) are printed as one line, without a
traceback, and exit with status 2.
"""
from __future__ import annotations

import contextlib
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
from tfx.eval_run import (check_args, check_run, eval_json_path, evaluate_pretrained, evaluate_run,
                          format_summary)
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
    """train.py's command line, checked before Hydra starts: overrides that do not parse,
    misspelled keys, wrong types and unknown options (which Hydra reports in several
    lines, exit 1) become one ``error:`` line, exit 2. Flags (``-m``, ``--cfg ...``) leave
    the composition to Hydra (a sweep's comma lists are not one config)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    try:
        check_group_overrides(args, conf_dir)
        if any(a.startswith("-") for a in args):
            return
        parser = OverridesParser.create()
        given: Dict[str, str] = {}
        sweeps = []
        for arg in args:
            try:
                parsed = parser.parse_override(arg)
            except HydraException as err:
                raise ConfigError(f"cannot parse the override {arg!r}: {_hydra_error(err)}") from None
            key = parsed.key_or_group
            if parsed.is_sweep_override():
                sweeps.append(arg)
            # seed=1 seed=2 reads like two runs but Hydra silently trains the last one. (A
            # later override of any other key replacing an earlier one is how scripts
            # layer settings on a base list, so only the seed is refused.)
            if key == "seed" and key in given:
                raise ConfigError(f"seed is given twice ({given[key]} and {arg}); for one run per "
                                  f"seed use -m seed=1,2")
            given[key] = arg
        try:
            with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
                if sweeps:  # a preset that sets hydra.mode=MULTIRUN sweeps them without -m
                    rest = [a for a in args if a not in sweeps]
                    cfg = compose("train", overrides=rest, return_hydra_config=True)
                    if cfg.hydra.mode == RunMode.MULTIRUN:
                        return
                compose("train", overrides=list(args), return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as err:
            raise _hydra_error(err) from None
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


#: evaluate.py's keys (conf/evaluate.yaml) besides the model and data groups
EVALUATE_KEYS = ("run", "out", "batch_size", "speed_batches", "max_batches", "device", "splits", "progress",
                 "compile")


def _hydra_error(err: Exception) -> ConfigError:
    """A Hydra composition error (several lines, a hint, a search path) as one line."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    cause = err.__cause__
    if cause is not None and str(cause).strip() not in ("", "None"):
        text += f" ({str(cause).strip().splitlines()[0]})"
    options = getattr(err, "options", None)
    if options:
        text += f"; choose one of {sorted(options)}"
    return ConfigError(text)


def _group_overrides(overrides, group: str) -> list:
    """The command-line overrides that set ``group`` or one of its keys (``+``/``~`` too)."""
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~").split(".")[0] == group]


def check_evaluate_config(cfg: DictConfig, overrides=()) -> None:
    """What evaluate.py is asked to do, checked before anything is loaded or written:
    evaluate.py's own keys (:func:`tfx.eval_run.check_args`), run= or model= (one of
    them), a run that holds a checkpoint, data=... only with model=, no unknown keys."""
    # optim: in the defaults only because model=hf presets pick the training optimizer
    unknown = sorted(k for k in cfg if k not in EVALUATE_KEYS + ("model", "data", "optim", "hydra"))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; evaluate.py takes {list(EVALUATE_KEYS)} and the "
                          f"model/data groups")
    optim = _group_overrides(overrides, "optim")
    if optim:
        raise ConfigError(f"{optim[0]} does not apply to evaluate.py: it trains nothing")
    run, model = cfg.get("run"), cfg.get("model")
    check_args(cfg.get("batch_size"), cfg.get("device"), cfg.get("max_batches"),
               cfg.get("speed_batches"), cfg.get("splits"), cfg.get("out"), cfg.get("progress"),
               cfg.get("compile", False))
    if run and model:
        raise ConfigError("give run=<run directory> or model=<pretrained model>, not both "
                          "(a run evaluates the model it trained)")
    if run:
        check_run(run)
        data = _group_overrides(overrides, "data")
        if data:
            raise ConfigError(f"{data[0]} does not apply to run=: a run is measured on the data it "
                              f"trained on (its checkpoint's config); drop it, or use model=... instead")
    elif not model:
        raise ConfigError("nothing to evaluate: give run=<run directory or checkpoint> or "
                          "model=<pretrained model>, e.g. model=smollm2")


def _writable(directory: Path, what: str, fix: str, create: bool) -> None:
    """``directory`` can take a file (``create``: make it now; otherwise check its
    nearest existing ancestor, leaving nothing behind): else one line, ``what`` and ``fix``."""
    directory = Path(directory).expanduser()
    probe = directory
    if not create:
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
    try:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        if not probe.is_dir():
            raise NotADirectoryError(20, f"{probe} is a file, not a directory")
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise ConfigError(f"cannot write {what}{directory} ({err.strerror or type(err).__name__}); "
                          f"{fix}") from err


def _check_eval_json_dir(directory: Path, run, out, create: bool) -> None:
    if out:
        _writable(directory, "to out=", "set out to a writable directory", create)
    elif run:
        _writable(directory, "eval.json into the run directory ", "pass out=<writable directory>", create)
    else:
        _writable(directory, "to the output directory ", "set hydra.run.dir or out to a writable "
                  "directory", create)


def evaluate_preflight(args, conf_dir) -> None:
    """evaluate.py's command line, checked before Hydra starts (and writes its output
    directory): overrides that do not parse or compose, bad values, a missing run, an
    output directory that cannot be written. Each ends in one ``error:`` line, exit 2,
    with nothing written. Flags (``-m``, ``--cfg ...``) leave it all to Hydra and to
    :func:`evaluate_job`."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if any(a.startswith("-") for a in args):
        return
    try:
        check_group_overrides(args, conf_dir)
        parser = OverridesParser.create()
        for arg in args:
            try:
                parser.parse_override(arg)
            except HydraException as err:
                raise ConfigError(f"cannot parse the override {arg!r}: {_hydra_error(err)}") from None
        try:
            with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
                cfg = compose("evaluate", overrides=list(args), return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as err:
            raise _hydra_error(err) from None
        hydra_dir = cfg.hydra.run.dir
        with open_dict(cfg):
            del cfg["hydra"]
        check_evaluate_config(cfg, args)
        run, out = cfg.get("run"), cfg.get("out")
        _check_eval_json_dir(eval_json_path(run, out, hydra_dir).parent, run, out, create=False)
        _writable(Path(hydra_dir), "to the output directory ", "set hydra.run.dir to a writable "
                  "directory", create=False)
    except TfxError as err:
        fail(err)


def evaluate_job(cfg: DictConfig) -> Dict[str, Any]:
    """``run=<dir>``: a trained run (eval.json in the run, or ``out``); ``model=<name>``
    without a run: a pretrained model as it is, on ``data=...`` (eval.json in Hydra's
    output dir, or ``out``). Prints a progress bar (stderr, on a terminal) and a summary."""
    from hydra.core.hydra_config import HydraConfig

    hydra_dir = HydraConfig.get().runtime.output_dir
    kwargs = dict(batch_size=cfg.get("batch_size"), device=cfg.get("device"),
                  max_batches=cfg.get("max_batches"), speed_batches=cfg.get("speed_batches"),
                  splits=cfg.get("splits"), progress=cfg.get("progress", True),
                  compile=cfg.get("compile", False))
    try:
        check_evaluate_config(cfg, HydraConfig.get().overrides.task)
        kwargs["splits"] = list(kwargs["splits"])
        run, out = cfg.get("run"), cfg.get("out")
        path = eval_json_path(run, out, hydra_dir)
        _check_eval_json_dir(path.parent, run, out, create=True)
        if run:
            result = evaluate_run(run, out=out, **kwargs)
        else:
            result = evaluate_pretrained(cfg, path.parent, **kwargs)
    except TfxError as err:
        fail(err)
    print(format_summary(result, path))
    return result
