"""Finding checkpoints for a resume, and loading a finished run as a model."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tfx.ckpt.checkpoint import checkpoint_step, latest_checkpoint, list_checkpoints, load_checkpoint
from tfx.ckpt.sharded import load_sharded
from tfx.config import build_model, build_techniques
from tfx.core import Pipeline, RunContext, Stage
from tfx.core.errors import CheckpointError


def find_checkpoint(path) -> Path:
    """A checkpoint file, a ``checkpoints`` directory or a run directory -> newest file."""
    path = Path(path).expanduser()
    if path.is_file() or (path.is_dir() and checkpoint_step(path) is not None):
        return path
    for d in (path / "checkpoints", path):
        found = latest_checkpoint(d) if d.is_dir() else None
        if found is not None:
            return found
    raise CheckpointError(f"no checkpoint found at {path} (expected a step_*.pt file or step_*.dcp "
                          f"directory, or a run directory with checkpoints/step_*)")


def resolve_resume(resume: str, ckpt_dir: Path) -> Optional[Path]:
    """``never`` -> None; ``auto`` -> newest readable checkpoint of this run, if any;
    anything else is a path that must hold a checkpoint.

    With ``auto`` this loads checkpoints to find a readable one: prefer
    :func:`resolve_and_load`, which hands back the loaded state too."""
    if resume == "auto":
        return resolve_and_load(resume, ckpt_dir)[0]
    return None if resume == "never" else find_checkpoint(resume)


def resolve_and_load(resume: str, ckpt_dir: Path) -> Tuple[Optional[Path], Optional[dict]]:
    """-> ``(path, state)`` of the checkpoint to resume from, or ``(None, None)``.

    ``auto`` tries this run's checkpoints newest first: one that cannot be read (a
    crash or a bad disk corrupted it) is skipped with a warning and, once an older one
    loads, renamed to ``*.unreadable`` so that pruning never keeps it over the intact
    ones; if none is readable the run stops. An explicit path must load, corrupt or not."""
    if resume == "never":
        return None, None
    if resume != "auto":
        path = find_checkpoint(resume)
        return path, load_checkpoint(path)
    found = list_checkpoints(ckpt_dir) if Path(ckpt_dir).is_dir() else []
    for i, path in enumerate(reversed(found)):
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            print(f"warning: {err}; trying the previous checkpoint", file=sys.stderr)
            continue
        for bad in found[len(found) - i:]:
            aside = _set_aside(bad)
            if aside is not None:
                print(f"warning: resuming from {path.name}; renamed unreadable {bad.name} to "
                      f"{aside.name}", file=sys.stderr)
        return path, state
    if found:
        names = ", ".join(p.name for p in found)
        raise CheckpointError(f"no readable checkpoint in {ckpt_dir} ({names} all unreadable); "
                              f"move them away to start over, or pick another hydra.run.dir")
    return None, None


def _set_aside(path: Path) -> Optional[Path]:
    # Renamed, not deleted: the file may still be worth inspecting. Only rank 0 renames
    # (a file one rank failed to read may be fine for the others); a read-only disk is fine.
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    aside = path.with_name(path.name + ".unreadable")
    try:
        path.rename(aside)
    except OSError:
        return None
    return aside


def saved_structure(state: Dict[str, Any]) -> Dict[str, Any]:
    """Structural decisions a checkpoint recorded per technique (older checkpoints kept
    them in the technique states, under the same names)."""
    return state.get("structure", state.get("techniques", {}))


def reapply_surgery(model: nn.Module, cfg: DictConfig, state: Dict[str, Any],
                    groups: Tuple[str, ...] = ("attention", "compression")) -> nn.Module:
    """Re-create a run's structural (SURGERY) changes on a fresh model, from the
    decisions its checkpoint recorded, before its weights are loaded. ``groups``:
    which config groups' techniques (e.g. only ``attention`` for a model that
    receives an exported compressed state dict)."""
    techs = [t for t in build_techniques(cfg, groups=groups)
             if t.stage == Stage.SURGERY and t.reapply_on_load]
    ctx = RunContext(vocab_size=state.get("vocab_size"), tokenizer_id=state.get("tokenizer_id"),
                     resuming=True, structure=saved_structure(state))
    return Pipeline(techs).apply_to_model(model, ctx)


def load_run_with_meta(path, device: str = "cpu", techniques: bool = True
                       ) -> Tuple[nn.Module, DictConfig, Dict[str, Any]]:
    """:func:`load_run` plus the checkpoint's non-tensor entries (vocab_size,
    tokenizer_id, technique order ...)."""
    ckpt_path = find_checkpoint(path)
    state = load_checkpoint(ckpt_path)
    cfg = OmegaConf.create(state["config"])
    if "_target_" not in cfg.get("model", {}):
        raise CheckpointError(f"{ckpt_path} was written by an older tfx (model config without "
                              f"_target_); retrain it with this version")
    model = build_model(cfg, vocab_size=state["vocab_size"], block_size=cfg.data.seq_len)
    if techniques:
        model = reapply_surgery(model, cfg, state)
    try:
        if "sharded" in state:  # written by a multi-process run: DCP reshards into one process
            load_sharded(model, None, Path(state["sharded"]))
        else:
            model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt_path}: weights do not fit the rebuilt model "
                              f"({str(err).splitlines()[0]})") from err
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
    return model.to(device).eval(), cfg, meta


def load_run(path, device: str = "cpu", techniques: bool = True) -> Tuple[nn.Module, DictConfig]:
    """Rebuild the model of a tfx run (directory or checkpoint file) with its weights.

    The run's structural (SURGERY) techniques, e.g. low-rank factorisation or
    structured pruning, are re-applied before loading so the weights fit.
    Returns ``(model in eval mode, resolved run config)``.
    """
    model, cfg, _ = load_run_with_meta(path, device, techniques)
    return model, cfg


def load_weights_from_run(model: nn.Module, path: str) -> nn.Module:
    """Copy the weights of a trained tfx run (directory or checkpoint file) into
    ``model``, so compression can start from a trained network (``from_checkpoint``)."""
    if not Path(path).exists():
        raise CheckpointError(f"from_checkpoint={path!r} does not exist; pass a tfx run "
                              "directory or a checkpoint file")
    src, _ = load_run(path)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); the model config must match the run it came from")
    return model
