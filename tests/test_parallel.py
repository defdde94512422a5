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


FP16_REFUSED = ("precision=fp16 does not combine with parallel", "bf16")


@pytest.mark.parametrize("overrides,world,needles", [
    # torch's pipeline schedule runs the backward: fp16's scaler never scales the loss
    (["precision=fp16", "parallel=pp"], 2, FP16_REFUSED),
    # GradScaler cannot unscale DTensor and plain gradients together
    (["precision=fp16", "parallel=tp"], 2, FP16_REFUSED),
    (["precision=fp16", "parallel=fsdp_tp"], 4, None),  # every parameter a DTensor: works
    (["precision=fp16", "parallel=fsdp"], 2, None),
    (["compression=[compressed_export]", "parallel=fsdp"], 2,
     ("writes the whole model from rank 0, but fsdp split",)),
    (["compression=[compressed_export]", "parallel=tp"], 2,
     ("writes the whole model from rank 0, but tp split",)),
    (["compression=[gptq]", "parallel=fsdp_tp"], 4,
     ("quantizes and exports whole layers in one process, but tp + fsdp split",)),
    (["compression=[gptq]", "parallel=pp"], 2, ("but pp split",)),
    (["compression=[nm]", "parallel=tp"], 2,
     ("torch.nn.utils.prune, whose hooks multiply a weight by a whole mask, but tp split",)),
    (["compression=[lowrank]", "parallel=tp"], 2,
     ("compression=lowrank replaces each block Linear by two factors",)),
    (["compression=[ptq]", "parallel=fsdp"], 2,
     ("compression=ptq quantizes a copy of the whole model at export, but fsdp split",)),
    (["compression=[qat]", "parallel=tp"], 2, ("compression=qat swaps whole nn.Linear layers",)),
    (["compression=[lowrank]", "parallel=fsdp"], 2, None),  # its export is a metric; factors shard
    (["compression=[gptq]", "parallel=ddp"], 2, None),
])
def test_pairs_that_crashed_in_the_workers_are_refused_in_validate(overrides, world, needles):
    """scripts/compat.py found these crashing in the workers (fp16's scaler under pp/tp,
    exports of DTensor shards, TP plans on factorised layers, prune hooks on TP shards);
    now one line in validate, before any spawn. ``needles`` None: the pair works."""
    from tfx.core import ConfigError
    from tfx.launch import check_plan

    cfg = make_cfg(Path("/nonexistent"), *overrides, "trainer.batch_size=4")
    if needles is None:
        check_plan(cfg, world)
        return
    with pytest.raises(ConfigError) as err:
        check_plan(cfg, world)
    assert "\n" not in str(err.value), err.value
    for needle in needles:
        assert needle in str(err.value), err.value
