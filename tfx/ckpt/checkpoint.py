"""Resumable checkpoints that a crash cannot corrupt.

A checkpoint is one ``step_XXXXXXXX.pt`` file in ``<run_dir>/checkpoints``. It is
written to a temporary name in the same directory, flushed to disk, and renamed:
``os.replace`` is atomic on POSIX, so a run killed at any moment (SIGKILL included)
leaves either the old set of checkpoints or the old set plus the new one, never a
half-written file that :func:`latest_checkpoint` would pick up.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from tfx.core.errors import CheckpointError

CKPT_GLOB = "step_*.pt"
_STEP_RE = re.compile(r"step_(\d+)\.pt$")
FORMAT_VERSION = 1


def checkpoint_step(path: Path) -> Optional[int]:
    m = _STEP_RE.search(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.pt"


def list_checkpoints(ckpt_dir: Path) -> List[Path]:
    """Complete checkpoints, oldest first (temporary files never match the glob)."""
    found = [p for p in Path(ckpt_dir).glob(CKPT_GLOB) if checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    found = list_checkpoints(ckpt_dir) if Path(ckpt_dir).is_dir() else []
    return found[-1] if found else None


def save_checkpoint(state: Dict[str, Any], ckpt_dir: Path, step: int) -> Path:
    """Atomically write ``state`` as the checkpoint of ``step``; return its path."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(ckpt_dir, step)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    state = {"format": FORMAT_VERSION, **state}
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


def prune_checkpoints(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (and stale temps)."""
    found = list_checkpoints(ckpt_dir)
    for old in found[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    for stale in Path(ckpt_dir).glob(".step_*.pt.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            stale.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Load a checkpoint file, turning I/O and unpickling failures into one line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, wrong file, ...
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(state, dict) or "model" not in state or "format" not in state:
        raise CheckpointError(f"{path} is not a tfx checkpoint (no 'model'/'format' entries)")
    return state


def capture_rng() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
