"""Resumable checkpoints that a crash cannot corrupt.

A checkpoint is one ``step_XXXXXXXX.pt`` file in ``<run_dir>/checkpoints``. It is
written to a temporary name in the same directory, flushed to disk, and renamed:
``os.replace`` is atomic on POSIX, so a run killed at any moment (SIGKILL included)
leaves either the old set of checkpoints or the old set plus the new one, never a
half-written file that :func:`latest_checkpoint` would pick up.
"""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from tfx.ckpt.lock import pid_alive as _pid_alive
from tfx.ckpt.sharded import load_meta
from tfx.core.errors import CheckpointError

CKPT_GLOB = "step_*.pt"
SHARDED_GLOB = "step_*.dcp"  # directories written by tfx.ckpt.sharded (multi-process runs)
_STEP_RE = re.compile(r"^step_(\d+)\.(pt|dcp)$")
FORMAT_VERSION = 1


def checkpoint_step(path: Path) -> Optional[int]:
    m = _STEP_RE.search(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.pt"


def list_checkpoints(ckpt_dir: Path) -> List[Path]:
    """Complete checkpoints, oldest first (temporary files never match the glob)."""
    found = [p for g in (CKPT_GLOB, SHARDED_GLOB) for p in Path(ckpt_dir).glob(g)
             if checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    found = list_checkpoints(ckpt_dir) if Path(ckpt_dir).is_dir() else []
    return found[-1] if found else None


def save_checkpoint(state: Dict[str, Any], ckpt_dir: Path, step: int) -> Path:
    """Atomically write ``state`` as the checkpoint of ``step``; return its path.

    A storage failure (disk full, read-only, no permission) removes the temporary file,
    leaves the previous checkpoints untouched and raises a one-line CheckpointError."""
    ckpt_dir = Path(ckpt_dir)
    final = checkpoint_path(ckpt_dir, step)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    state = {"format": FORMAT_VERSION, **state}
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except (OSError, RuntimeError) as err:
        reason = _storage_failure(err)
        if reason is None:
            raise
        raise CheckpointError(_storage_message(final, tmp, state, reason)) from err
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # must not hide the error above; clean_stale_temps retries later
            pass
    return final


# errno -> what the user is told; anything else is a bug, not the disk, and propagates
_STORAGE_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                   errno.EFBIG: "file too large for this file system",
                   errno.EROFS: "file system is read-only", errno.EACCES: "permission denied",
                   errno.EPERM: "permission denied", errno.EIO: "I/O error"}
_ADVICE = {"file system is read-only": "make {dir} writable or pick another hydra.run.dir",
           "permission denied": "make {dir} writable or pick another hydra.run.dir",
           "I/O error": "check that disk or pick another hydra.run.dir"}
_FULL_ADVICE = "free space on that disk or pick a hydra.run.dir on a larger one"
# torch.save's C++ writer reports a failed write as a RuntimeError, not an OSError
_TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "No space left")


def _storage_failure(err: BaseException) -> Optional[str]:
    if isinstance(err, OSError):
        return _STORAGE_ERRNOS.get(err.errno)
    text = str(err)
    if not any(marker in text for marker in _TORCH_WRITE_FAILURES):
        return None
    for marker, reason in (("Read-only", "file system is read-only"),
                           ("Permission denied", "permission denied")):
        if marker in text:
            return reason
    return "disk full"  # what a short write almost always means


def _storage_message(final: Path, tmp: Path, state: Dict[str, Any], reason: str) -> str:
    # Space needed: the previous checkpoint is the best estimate (same model, same
    # optimizer); without one, the larger of the bytes written and the tensor bytes.
    try:
        previous = latest_checkpoint(final.parent)
        need = _size(previous) if previous is not None else 0
        written = tmp.stat().st_size if tmp.is_file() else 0
        free = f", {shutil.disk_usage(final.parent).free / 1e6:.1f} MB free"
    except OSError:  # the directory may be unreadable too: say what we know
        previous, need, written, free = None, 0, 0, ""
    need = need or max(written, _tensor_bytes(state))
    advice = _ADVICE.get(reason, _FULL_ADVICE).format(dir=final.parent)
    kept = f"; {previous.name} is intact" if previous is not None else ""
    return (f"cannot write checkpoint {final}: {reason} (needs about "
            f"{max(need / 1e6, 0.1):.1f} MB{free}); {advice}, then rerun to resume{kept}")


def _size(path: Path) -> int:
    if path.is_dir():  # sharded checkpoint
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def prune_checkpoints(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (and stale temps)."""
    found = list_checkpoints(ckpt_dir)
    for old in found[:-keep_last] if keep_last > 0 else []:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    clean_stale_temps(ckpt_dir)


def clean_stale_temps(ckpt_dir: Path) -> List[Path]:
    """Remove temporary files left by crashed saves; return what was removed.

    ``.step_*.pt.tmp-<pid>`` files go when their writer is gone (a live pid may be
    saving right now); ``.step_*.dcp.tmp`` directories always go: sharded saves are
    collective, so none is in flight when rank 0 calls this between saves or at start."""
    removed = []
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return removed
    for stale in ckpt_dir.glob(".step_*.pt.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            stale.unlink(missing_ok=True)
            removed.append(stale)
    for stale in ckpt_dir.glob(".step_*.dcp.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    return removed


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Load a checkpoint file, turning I/O and unpickling failures into one line."""
    path = Path(path)
    if path.is_dir() and checkpoint_step(path) is not None:
        return {**load_meta(path), "sharded": str(path)}  # tensors are loaded in place later
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
