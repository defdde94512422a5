"""Sharded (DCP) checkpoints: saved by N ranks, resumed by M (exact DDP resume is in
test_parallel.py, next to the DDP run it reuses)."""
from __future__ import annotations

import pytest

from parallel_utils import parallel_env, interrupt_after, assert_same_training, final_weights, run_single, run_workers  # noqa: F401 (fixture)


pytestmark = pytest.mark.usefixtures("parallel_env")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsdp")
    run_workers(run_dir, 2, "parallel=fsdp", "trainer.batch_size=2")
    return run_dir


def test_fsdp_checkpoint_is_complete_dcp(fsdp_run):
    ckpts = sorted(p.name for p in (fsdp_run / "checkpoints").iterdir())
    assert ckpts == ["step_00000002.dcp", "step_00000004.dcp"]  # no temporaries left
    assert (fsdp_run / "checkpoints" / "step_00000004.dcp" / "meta.pt").is_file()


def test_two_rank_checkpoint_resumes_in_one_process(fsdp_run, tmp_path):
    resumed = interrupt_after(fsdp_run, tmp_path / "resumed", 2)
    run_single(resumed, "trainer.batch_size=4", "resume=auto")
    assert_same_training(resumed, fsdp_run, steps={3, 4})


def test_one_process_checkpoint_resumes_on_two_ranks(fsdp_run, tmp_path):
    single = tmp_path / "single"
    run_single(single, "trainer.batch_size=4", "trainer.max_steps=4")
    resumed = interrupt_after(single, tmp_path / "resumed", 2)
    run_workers(resumed, 2, "parallel=fsdp", "trainer.batch_size=2", "resume=auto")
    assert_same_training(resumed, single, steps={3, 4})


def test_sharded_checkpoint_loads_for_evaluation(fsdp_run):
    from tfx.ckpt import load_run

    model, cfg = load_run(fsdp_run)
    assert not any(hasattr(p, "full_tensor") for p in model.parameters())
    assert final_weights(fsdp_run)["tok_emb.weight"].shape[0] == model.cfg.vocab_size
