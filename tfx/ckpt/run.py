"""Finding checkpoints for a resume, and loading a finished run as a model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from omegaconf import DictConfig, OmegaConf
from torch import nn

from tfx.ckpt.checkpoint import latest_checkpoint, load_checkpoint
from tfx.core.errors import CheckpointError


def find_checkpoint(path) -> Path:
    """A checkpoint file, a ``checkpoints`` directory or a run directory -> newest file."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    for d in (path / "checkpoints", path):
        found = latest_checkpoint(d) if d.is_dir() else None
        if found is not None:
            return found
    raise CheckpointError(f"no checkpoint found at {path} (expected a step_*.pt file, or a run "
                          f"directory with checkpoints/step_*.pt)")


def resolve_resume(resume: str, ckpt_dir: Path) -> Optional[Path]:
    """``never`` -> None; ``auto`` -> newest complete checkpoint of this run, if any;
    anything else is a path that must hold a checkpoint."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(ckpt_dir) if Path(ckpt_dir).is_dir() else None
    return find_checkpoint(resume)


def load_run(path, device: str = "cpu", techniques: bool = True) -> Tuple[nn.Module, DictConfig]:
    """Rebuild the model of a tfx run (directory or checkpoint file) with its weights.

    The run's structural (SURGERY) techniques, e.g. low-rank factorisation or
    structured pruning, are re-applied before loading so the weights fit.
    Returns ``(model in eval mode, resolved run config)``.
    """
    from tfx.train.build import build_model, reapply_surgery

    ckpt_path = find_checkpoint(path)
    state = load_checkpoint(ckpt_path)
    cfg = OmegaConf.create(state["config"])
    model = build_model(cfg.model, vocab_size=state["vocab_size"], block_size=cfg.data.seq_len)
    if techniques:
        model = reapply_surgery(model, cfg, state)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt_path}: weights do not fit the rebuilt model "
                              f"({str(err).splitlines()[0]})") from err
    return model.to(device).eval(), cfg
