"""Checkpoints: exact resume, crash safety, clear errors."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, run_cli, tiny
from tfx.ckpt import latest_checkpoint, load_checkpoint
from tfx.core import CheckpointError
from tfx.train.run import build


def params(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_resume_equals_uninterrupted_run(tmp_path, pydocs_data):
    overrides = ("trainer.max_steps=6", "trainer.ckpt_every=0")
    full = build(tiny(*overrides), tmp_path / "full", data=pydocs_data)
    full.trainer.fit()

    first = build(tiny(*overrides), tmp_path / "cut", data=pydocs_data)
    first.trainer.callbacks.append(lambda t: t.state.step == 3 and t.request_stop("test"))
    first.trainer.fit()
    assert latest_checkpoint(first.ckpt_dir).name == "step_00000003.pt"

    second = build(tiny(*overrides, "resume=auto"), tmp_path / "cut", data=pydocs_data)
    assert second.resumed_from is not None and second.trainer.state.step == 3
    second.trainer.fit()

    a, b = params(full.model), params(second.model)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    assert full.trainer.loader.state_dict() == second.trainer.loader.state_dict()


def test_resume_refuses_other_techniques(tmp_path, pydocs_data):
    job = build(tiny("trainer.max_steps=1"), tmp_path, data=pydocs_data)
    job.trainer.fit()
    with pytest.raises(CheckpointError, match=r"trained with techniques \['precision:fp32'\].*resume=never"):
        build(tiny("precision=bf16"), tmp_path, data=pydocs_data)
    build(tiny("precision=bf16", "resume=never"), tmp_path, data=pydocs_data)  # explicit fresh start


def test_missing_and_corrupt_checkpoints(tmp_path, pydocs_data):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        build(tiny(f"resume={tmp_path / 'nowhere'}"), tmp_path, data=pydocs_data)
    bad = tmp_path / "checkpoints" / "step_00000001.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        load_checkpoint(bad)


def test_checkpoint_keeps_last_k(tmp_path, pydocs_data):
    job = build(tiny("trainer.max_steps=6", "trainer.ckpt_every=1", "trainer.keep_last=2"),
                tmp_path, data=pydocs_data)
    job.trainer.fit()
    names = sorted(p.name for p in job.ckpt_dir.iterdir())
    assert names == ["step_00000005.pt", "step_00000006.pt"]
    state = load_checkpoint(job.ckpt_dir / names[-1])
    for key in ("model", "optimizer", "scheduler", "rng", "loader", "techniques", "technique_order",
                "config", "step", "vocab_size", "tokenizer_id"):
        assert key in state, key


WRITER = """
import sys, torch
from tfx.ckpt import save_checkpoint
save_checkpoint({"model": {"w": torch.ones(3)}}, sys.argv[1], 1)
print("first done", flush=True)
save_checkpoint({"model": {"w": torch.zeros(64, 2**20)}}, sys.argv[1], 2)  # 256 MB: slow to write
"""


def test_kill_during_checkpoint_write_leaves_previous_loadable(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(ckpt_dir)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first done"
    deadline = time.time() + 60
    while not list(ckpt_dir.glob(".step_00000002.pt.tmp-*")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpt_dir / "step_00000002.pt").exists(), "kill came too late to test anything"
    latest = latest_checkpoint(ckpt_dir)
    assert latest.name == "step_00000001.pt"
    assert torch.equal(load_checkpoint(latest)["model"]["w"], torch.ones(3))


def test_sigterm_saves_and_resume_auto_continues(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train.py", *TINY, "trainer.max_steps=400", "trainer.log_every=1", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped early (received SIGTERM)" in out
    stopped_at = latest_checkpoint(run_dir / "checkpoints")
    assert stopped_at is not None

    resume_to = int(stopped_at.stem.split("_")[1]) + 2
    done = run_cli(["train.py", *TINY, f"trainer.max_steps={resume_to}", f"hydra.run.dir={run_dir}"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {stopped_at}" in done.stdout
