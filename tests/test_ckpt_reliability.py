"""Run directory lock, storage errors while saving, stale temps, resume fallback."""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess

import pytest
import torch

from tfx.ckpt.checkpoint import (clean_stale_temps, list_checkpoints, load_checkpoint,
                                 save_checkpoint)
from tfx.ckpt.lock import LOCK_NAME, RunDirLock, RunLockedError
from tfx.ckpt.run import resolve_and_load, resolve_resume
from tfx.core.errors import CheckpointError, TfxError


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: the pid now belongs to no process
    return proc.pid


def write_lock(run_dir, pid, host=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-11-23T12:00:00+00:00"}
    (run_dir / LOCK_NAME).write_text(json.dumps(info))
    return info


def one_line(err) -> str:
    text = str(err)
    assert "\n" not in text and text
    return text


# -- run directory lock ------------------------------------------------------------

def test_lock_is_created_and_released(tmp_path):
    run_dir = tmp_path / "run"
    with RunDirLock(run_dir) as lock:
        info = json.loads(lock.path.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert info["started"]
    assert not (run_dir / LOCK_NAME).exists()


def test_second_lock_on_same_dir_refuses(tmp_path):
    with RunDirLock(tmp_path):
        with pytest.raises(RunLockedError) as exc:
            RunDirLock(tmp_path).acquire()
    msg = one_line(exc.value)
    assert f"pid {os.getpid()}@{socket.gethostname()}" in msg and "hydra.run.dir" in msg
    assert isinstance(exc.value, TfxError)


def test_live_holder_written_by_hand_refuses_and_is_kept(tmp_path):
    info = write_lock(tmp_path, os.getpid())
    with pytest.raises(RunLockedError, match="2026-11-23T12:00:00"):
        RunDirLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == info


def test_stale_lock_of_dead_pid_is_taken_over(tmp_path, capsys):
    pid = dead_pid()
    write_lock(tmp_path, pid)
    with RunDirLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stale lock" in err and f"pid {pid}@" in err
    assert not list(tmp_path.glob(LOCK_NAME + "*"))  # nothing left aside either


def test_unparseable_lock_is_taken_over(tmp_path, capsys):
    (tmp_path / LOCK_NAME).write_text("")  # its writer died between create and write
    with RunDirLock(tmp_path):
        pass
    assert "stale lock" in capsys.readouterr().err


def test_takeover_never_removes_a_lock_created_meanwhile(tmp_path):
    # Two runs judged the same lock stale; the first already replaced it with its own.
    stale = {"pid": dead_pid(), "host": socket.gethostname(), "started": "earlier"}
    fresh = write_lock(tmp_path, os.getpid())
    assert RunDirLock(tmp_path)._take_over(stale) is False
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == fresh
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]


def test_lock_from_another_host_refuses(tmp_path):
    write_lock(tmp_path, dead_pid(), host="some-other-node")
    with pytest.raises(RunLockedError) as exc:
        RunDirLock(tmp_path).acquire()
    msg = one_line(exc.value)
    assert "some-other-node" in msg and f"delete {tmp_path / LOCK_NAME}" in msg
    assert (tmp_path / LOCK_NAME).exists()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = RunDirLock(tmp_path).acquire()
    other = write_lock(tmp_path, 12345, host="some-other-node")  # taken over meanwhile
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == other


# -- storage errors while saving ----------------------------------------------------

def ckpt_state(n=4, fill=1.0):
    return {"model": {"w": torch.full((n,), fill)}, "optimizer": {"state": {}}, "step": 2}


def assert_previous_intact(ckpt_dir, previous):
    assert [p.name for p in list_checkpoints(ckpt_dir)] == [previous.name]
    assert torch.equal(load_checkpoint(previous)["model"]["w"], torch.full((4,), 1.0))
    assert not [p for p in ckpt_dir.iterdir() if ".tmp" in p.name], "temp file left behind"


def test_injected_enospc_keeps_previous_and_says_how_much(tmp_path, monkeypatch):
    previous = save_checkpoint(ckpt_state(), tmp_path, 2)

    def full_disk(obj, f, *a, **kw):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint(ckpt_state(fill=2.0), tmp_path, 4)
    monkeypatch.undo()
    msg = one_line(exc.value)
    assert "step_00000004.pt" in msg and "disk full" in msg and "about 0.1 MB" in msg
    assert "MB free" in msg and f"{previous.name} is intact" in msg
    assert_previous_intact(tmp_path, previous)


def test_real_enospc_from_dev_full(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    previous = save_checkpoint(ckpt_state(), tmp_path, 2)
    # The save's temp name is predictable: point it at a device that always fails with ENOSPC.
    (tmp_path / f".step_00000004.pt.tmp-{os.getpid()}").symlink_to("/dev/full")
    with pytest.raises(CheckpointError, match="disk full"):
        save_checkpoint(ckpt_state(fill=2.0), tmp_path, 4)
    assert_previous_intact(tmp_path, previous)


def test_torch_writer_runtime_error_is_a_storage_error(tmp_path, monkeypatch):
    previous = save_checkpoint(ckpt_state(), tmp_path, 2)

    def failing(*a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(CheckpointError, match="disk full"):
        save_checkpoint(ckpt_state(), tmp_path, 4)
    monkeypatch.undo()
    assert_previous_intact(tmp_path, previous)


@pytest.mark.parametrize("code, reason", [(errno.EROFS, "read-only"),
                                          (errno.EACCES, "permission denied"),
                                          (errno.EDQUOT, "quota")])
def test_injected_rename_failures(tmp_path, monkeypatch, code, reason):
    previous = save_checkpoint(ckpt_state(), tmp_path, 2)

    def failing_replace(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", failing_replace)  # root ignores chmod: inject instead
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint(ckpt_state(), tmp_path, 4)
    monkeypatch.undo()
    msg = one_line(exc.value)
    assert reason in msg and "step_00000004.pt" in msg and "about " in msg
    assert_previous_intact(tmp_path, previous)


def test_unrelated_errors_propagate_unchanged(tmp_path, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("cannot pickle 'generator' object")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="pickle"):
        save_checkpoint(ckpt_state(), tmp_path, 4)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs; skipped where mounting is not permitted (not root, containers)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_real_full_disk_on_small_tmpfs(small_tmpfs):
    ckpt_dir = small_tmpfs / "checkpoints"
    previous = save_checkpoint(ckpt_state(), ckpt_dir, 2)
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint(ckpt_state(n=250_000), ckpt_dir, 4)  # 1 MB of tensors
    msg = one_line(exc.value)
    assert "disk full" in msg and str(ckpt_dir / "step_00000004.pt") in msg
    assert_previous_intact(ckpt_dir, previous)


# -- stale temporary files -----------------------------------------------------------

def test_clean_stale_temps(tmp_path):
    keep = save_checkpoint(ckpt_state(), tmp_path, 2)
    dead = tmp_path / f".step_00000004.pt.tmp-{dead_pid()}"
    live = tmp_path / f".step_00000006.pt.tmp-{os.getpid()}"  # a save in flight
    dcp = tmp_path / ".step_00000008.dcp.tmp"
    for p in (dead, live):
        p.write_bytes(b"partial")
    (dcp / "shard").mkdir(parents=True)
    removed = clean_stale_temps(tmp_path)
    assert sorted(removed) == sorted([dead, dcp])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([keep.name, live.name])
    assert clean_stale_temps(tmp_path / "missing") == []


# -- resume=auto falls back over unreadable checkpoints -------------------------------

def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_auto_resume_falls_back_to_previous_intact(tmp_path, capsys):
    good = save_checkpoint(ckpt_state(), tmp_path, 2)
    bad = save_checkpoint(ckpt_state(fill=2.0), tmp_path, 4)
    truncate(bad)
    path, state = resolve_and_load("auto", tmp_path)
    assert path == good and torch.equal(state["model"]["w"], torch.full((4,), 1.0))
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and bad.name in err and "previous" in err
    # set aside, so it is neither retried nor kept by pruning over the intact one
    assert list_checkpoints(tmp_path) == [good]
    assert (tmp_path / (bad.name + ".unreadable")).exists()
    assert resolve_resume("auto", tmp_path) == good


def test_auto_resume_with_nothing_readable_stops(tmp_path):
    for step in (2, 4):
        truncate(save_checkpoint(ckpt_state(), tmp_path, step))
    with pytest.raises(CheckpointError) as exc:
        resolve_and_load("auto", tmp_path)
    msg = one_line(exc.value)
    assert "step_00000002.pt" in msg and "step_00000004.pt" in msg
    assert len(list_checkpoints(tmp_path)) == 2  # nothing renamed: the next try says the same


def test_explicit_corrupt_path_fails_hard(tmp_path):
    save_checkpoint(ckpt_state(), tmp_path, 2)
    bad = save_checkpoint(ckpt_state(), tmp_path, 4)
    truncate(bad)
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        resolve_and_load(str(bad), tmp_path)


def test_never_and_empty(tmp_path):
    save_checkpoint(ckpt_state(), tmp_path, 2)
    assert resolve_and_load("never", tmp_path) == (None, None)
    assert resolve_and_load("auto", tmp_path / "none") == (None, None)
    assert resolve_resume("never", tmp_path) is None
