"""One run per run directory.

Two runs on the same ``hydra.run.dir`` would resume each other's checkpoints and
interleave their metrics, so the run takes ``<run_dir>/.tfx.lock`` before it writes
anything. The file is created with ``O_CREAT | O_EXCL`` (atomic: exactly one creator
wins) and holds ``{"pid", "host", "started"}`` so that a refusal can say who holds it
and a lock left by a killed run (same host, pid gone) can be taken over.

Only one process of a distributed run takes the lock (rank 0); the caller decides.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Optional

from tfx.core.errors import TfxError

LOCK_NAME = ".tfx.lock"


class RunLockedError(TfxError):
    """The run directory is locked by another run."""


def pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0, ...) would signal our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but belongs to another user
        return True
    except OSError:
        return False
    return True


class RunDirLock:
    """``with RunDirLock(run_dir): ...`` -- raises :class:`RunLockedError` if in use."""

    def __init__(self, run_dir) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._mine: Optional[Dict[str, Any]] = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "RunDirLock":
        for _ in range(5):  # only loops when a stale lock was just cleared
            if self._try_create():
                return self
            holder = self._read_holder()
            if holder is not None:
                self._refuse_or_clear(holder)
        raise RunLockedError(f"could not lock run directory {self.run_dir}: {self.path} keeps "
                             f"reappearing; another run is starting there, pick another hydra.run.dir")

    def release(self) -> None:
        """Remove the lock only if it is still ours (it may have been taken over)."""
        if self._mine is not None and self._read_holder(wait=False) == self._mine:
            self.path.unlink(missing_ok=True)
        self._mine = None

    def _try_create(self) -> bool:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise TfxError(f"cannot create {self.path}: {err.strerror}; make the run directory "
                           f"writable or pick another hydra.run.dir") from err
        try:
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
        except OSError as err:  # e.g. disk full: leave no empty lock behind
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise TfxError(f"cannot write {self.path}: {err.strerror}; free space on that disk "
                           f"or pick another hydra.run.dir") from err
        os.close(fd)
        self._mine = info
        return True

    def _read_holder(self, wait: bool = True) -> Optional[Dict[str, Any]]:
        """The holder's info; ``{}`` for a lock that stays unparseable (its writer died
        between create and write); None if the file vanished meanwhile."""
        for _ in range(10 if wait else 1):  # a creator writes right after O_EXCL: give it time
            try:
                info = json.loads(self.path.read_text())
                if isinstance(info, dict) and isinstance(info.get("pid"), int):
                    return info
            except FileNotFoundError:
                return None
            except (OSError, ValueError):
                pass
            if wait:
                time.sleep(0.05)
        return {}

    def _refuse_or_clear(self, holder: Dict[str, Any]) -> None:
        pid, host = holder.get("pid"), holder.get("host")
        since = holder.get("started", "an unknown time")
        if host and host != socket.gethostname():  # pid means nothing here: cannot tell if alive
            raise RunLockedError(
                f"run directory {self.run_dir} is locked by pid {pid}@{host} since {since}; wait "
                f"for that run, pick another hydra.run.dir, or delete {self.path} if {host} is gone")
        if pid is not None and pid_alive(pid):
            raise RunLockedError(
                f"run directory {self.run_dir} is in use by pid {pid}@{host} since {since}; wait "
                f"for that run to finish or pick another hydra.run.dir")
        if not self._take_over(holder):
            return  # another run got there first: the caller's next attempt will tell
        what = f"pid {pid}@{host}, not running" if pid is not None else "unreadable"
        print(f"warning: removed stale lock {self.path} ({what}, since {since})", file=sys.stderr)

    def _take_over(self, stale: Dict[str, Any]) -> bool:
        """Remove a stale lock without removing a fresh one another run just created:
        rename it aside (atomic), and put it back if it is not the one we judged stale."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:  # someone else cleared it first
            return False
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = {}
        if stale and moved != stale:  # a live run's lock: restore it unless another exists
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            except OSError:  # no hard links on this file system
                os.replace(aside, self.path)
                return False
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True
