"""Every parallel mode reproduces single-process training on the same global batch.

Workers are started through tfx's own launcher (torch's elastic agent, gloo on
localhost). Tolerances are float32 round-off: the loss, the gradient norm of every
step and the final weights after four AdamW steps must agree.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from parallel_utils import (parallel_env, interrupt_after, assert_same_training, make_cfg,  # noqa: F401 (fixture)
                            run_single, run_workers, train_log)



pytestmark = pytest.mark.usefixtures("parallel_env")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, global batch 4."""
    run_dir = tmp_path_factory.mktemp("single")
    run_single(run_dir, "trainer.batch_size=4")
    return run_dir


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp")
    summary = run_workers(run_dir, 2, "parallel=ddp", "trainer.batch_size=2")
    return run_dir, summary


def test_ddp_matches_single(reference, ddp_run):
    run_dir, summary = ddp_run
    assert summary["world_size"] == 2 and summary["dp_size"] == 2
    assert summary["comm/bytes_per_step"] > 0
    assert_same_training(run_dir, reference)


def test_ddp_resume_equals_uninterrupted(ddp_run, tmp_path):
    full, _ = ddp_run
    resumed = interrupt_after(full, tmp_path / "resumed", 2)  # as if killed after step 2
    run_workers(resumed, 2, "parallel=ddp", "trainer.batch_size=2", "resume=auto")
    assert_same_training(resumed, full, steps={3, 4}, atol=0, rtol=0)


def test_ddp_accumulation_matches_large_batch(reference, tmp_path):
    # 2 ranks x 2 micro-steps x batch 1 = the reference's batch of 4
    run_workers(tmp_path, 2, "parallel=ddp", "trainer.batch_size=1", "trainer.accum_steps=2")
    assert_same_training(tmp_path, reference)


def test_fsdp_matches_single(reference, tmp_path):
    run_workers(tmp_path, 2, "parallel=fsdp", "trainer.batch_size=2")
    assert_same_training(tmp_path, reference)


def test_tp_matches_single(reference, tmp_path):
    # every tensor-parallel rank sees the whole batch
    run_workers(tmp_path, 2, "parallel=tp", "trainer.batch_size=4")
    assert_same_training(tmp_path, reference)


def test_fsdp_tp_2d_matches_single(reference, tmp_path):
    summary = run_workers(tmp_path, 4, "parallel=fsdp_tp", "trainer.batch_size=2")
    assert summary["dp_size"] == 2
    assert_same_training(tmp_path, reference)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pp_matches_single(reference, tmp_path, schedule):
    run_workers(tmp_path, 2, "parallel=pp", f"parallel.schedule={schedule}", "trainer.batch_size=4")
    assert_same_training(tmp_path, reference)


def test_pp_interleaved_matches_single(tmp_path):
    # 2 ranks x 2 stages each need 4 blocks
    run_single(tmp_path / "ref", "trainer.batch_size=4", "model.n_layer=4")
    run_workers(tmp_path / "pp", 2, "parallel=pp", "parallel.schedule=interleaved_1f1b",
                "trainer.batch_size=4", "model.n_layer=4")
    assert_same_training(tmp_path / "pp", tmp_path / "ref")


@pytest.mark.parametrize("hook", ["bf16_comm", "powersgd"])
def test_comm_hooks_train_and_report_bytes(tmp_path, hook):
    summary = run_workers(tmp_path, 2, "parallel=ddp", f"compression=[{hook}]", "trainer.batch_size=2",
                          "trainer.max_steps=8", "trainer.ckpt_every=0", "optim.lr=1e-2",
                          "compression.powersgd.warmup_steps=2" if hook == "powersgd" else "seed=1337")
    log = train_log(tmp_path)
    assert log[-1]["train/loss"] < log[0]["train/loss"] - 0.1  # it learns
    fp32_bytes = 4 * summary["params"]
    ratio = summary["comm/hook_bytes_per_step"] / fp32_bytes
    assert ratio == pytest.approx(0.5, abs=0.01) if hook == "bf16_comm" else ratio < 0.1


@pytest.mark.parametrize("parallel,world,refused", [
    ("pp", 2, True),        # torch's schedule runs the backward: the scaler never scales the loss
    ("tp", 2, True),        # GradScaler cannot unscale DTensor and plain gradients together
    ("fsdp_tp", 4, False),  # every parameter a DTensor: works (scripts/compat.py)
    ("fsdp", 2, False),
])
def test_fp16_with_pp_or_tp_alone_is_refused_in_validate(parallel, world, refused):
    """scripts/compat.py found both crashing in the workers; now one line before any spawn."""
    from tfx.core import ConfigError
    from tfx.launch import check_plan

    cfg = make_cfg(Path("/nonexistent"), "precision=fp16", f"parallel={parallel}", "trainer.batch_size=4")
    if not refused:
        check_plan(cfg, world)
        return
    with pytest.raises(ConfigError, match="precision=fp16 does not combine with parallel") as err:
        check_plan(cfg, world)
    assert "\n" not in str(err.value) and "bf16" in str(err.value)


@pytest.mark.parametrize("compression,parallel,world,needle", [
    ("[compressed_export]", "fsdp", 2, "writes the whole model from rank 0, but fsdp split"),
    ("[compressed_export]", "tp", 2, "writes the whole model from rank 0, but tp split"),
    ("[gptq]", "fsdp_tp", 4, "quantizes and exports whole layers in one process, but tp + fsdp split"),
    ("[gptq]", "pp", 2, "but pp split"),
    ("[nm]", "tp", 2, "torch.nn.utils.prune, whose hooks multiply a weight by a whole mask, but tp split"),
    ("[lowrank]", "tp", 2, "compression=lowrank replaces each block Linear by two factors"),
    ("[ptq]", "fsdp", 2, "compression=ptq quantizes a copy of the whole model at export, but fsdp split"),
    ("[qat]", "tp", 2, "compression=qat swaps whole nn.Linear layers"),
    ("[lowrank]", "fsdp", 2, None),  # works: its export is a metric, the factors shard like Linears
    ("[gptq]", "ddp", 2, None),
])
def test_compression_needing_whole_weights_refuses_split_parameters(compression, parallel, world, needle):
    """scripts/compat.py found these crashing in the workers (export of DTensor shards, TP
    plans on factorised layers, prune hooks on TP shards); now one line in validate."""
    from tfx.core import ConfigError
    from tfx.launch import check_plan

    cfg = make_cfg(Path("/nonexistent"), f"compression={compression}", f"parallel={parallel}",
                   "trainer.batch_size=4")
    if needle is None:
        check_plan(cfg, world)
        return
    with pytest.raises(ConfigError) as err:
        check_plan(cfg, world)
    assert needle in str(err.value) and "\n" not in str(err.value), err.value
