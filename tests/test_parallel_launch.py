"""Launching: self-launch from train.py, fail-fast on a crashed worker, torchrun
detection, and the Slurm launcher config."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallel_utils import CONF, TINY, make_cfg, shared_cache
from tfx.parallel import DDP
from tfx.launch import WorkerFailed, launch, needs_launch, requested_workers

ROOT = Path(__file__).resolve().parents[1]


class CrashOnRank1(DDP):
    """DDP whose rank 1 raises after its first optimizer step."""

    def after_optimizer_step(self, model, info, ctx):
        super().after_optimizer_step(model, info, ctx)
        if ctx.rank == 1:
            raise RuntimeError("deliberate crash in rank 1")


@pytest.fixture
def env(tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TFX_CACHE_DIR", str(shared_cache(tmp_path_factory)))
    monkeypatch.setenv("WANDB_MODE", "offline")
    for k in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID", "RANK"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


def test_self_launch_e2e_writes_one_summary_from_rank0(env):
    run_dir = env / "run"
    cmd = [sys.executable, "train.py", "parallel=ddp", *TINY, "trainer.batch_size=2",
           "trainer.max_steps=2", f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = list(run_dir.rglob("summary.json"))
    assert summaries == [run_dir / "summary.json"]
    summary = json.loads(summaries[0].read_text())
    assert summary["world_size"] == 2 and summary["run_dir"] == str(run_dir)
    steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in l]
    assert steps == [1, 2]  # written once (by rank 0), not once per rank
    assert out.stdout.count("val loss") == 1


def test_crashing_worker_fails_fast_with_its_error(env):
    cfg = make_cfg(env / "run", "parallel=ddp", "trainer.batch_size=2", "trainer.max_steps=50")
    cfg.parallel._target_ = f"{__name__}.CrashOnRank1"
    t0 = time.monotonic()
    with pytest.raises(WorkerFailed) as err:
        launch(cfg, env / "run", nproc=2)
    assert err.value.rank == 1
    assert "deliberate crash in rank 1" in str(err.value)
    assert time.monotonic() - t0 < 60


def test_no_launch_under_torchrun(env, monkeypatch):
    cfg = make_cfg(env, "parallel=ddp")
    assert requested_workers(cfg) == 2 and needs_launch(cfg)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert not needs_launch(cfg)
    assert requested_workers(make_cfg(env, "parallel=single")) == 1
    assert requested_workers(make_cfg(env, "parallel=fsdp_tp")) == 4


def test_2d_degree_mismatch_is_a_config_error(env):
    from tfx.core import ConfigError
    from tfx.launch import check_plan

    cfg = make_cfg(env, "parallel=fsdp_tp", "parallel.tp.degree=3")
    with pytest.raises(ConfigError, match="does not divide the world size 4"):
        check_plan(cfg, 4)


def test_submitit_slurm_launcher_composes():
    from hydra import compose, initialize_config_dir

    from tfx.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("train", overrides=["hydra/launcher=submitit_slurm", "parallel=ddp"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == 1 and launcher.max_num_timeout == 3
