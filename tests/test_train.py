"""Training loop: every precision/memory option trains; exact equivalences hold."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import GradRecorder, tiny
from tfx.core import Stage, Technique
from tfx.train.run import build, train


def first_grads(cfg, tmp_path, data):
    rec = GradRecorder()
    job = build(cfg, tmp_path, data=data, extra_techniques=[rec])
    job.trainer.train_step()
    return rec.grads[0]


def losses(tmp_path, data, *overrides):
    cfg = tiny(*overrides)
    job = build(cfg, tmp_path, data=data)
    return [job.trainer.train_step()["loss"] for _ in range(cfg.trainer.max_steps)]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precision_trains(precision, tmp_path, pydocs_data):
    steps = 3 if precision == "fp16" else 6  # fp16 on CPU is very slow
    out = losses(tmp_path, pydocs_data, f"precision={precision}", f"trainer.max_steps={steps}")
    assert all(math.isfinite(x) for x in out)
    assert out[-1] < out[0]


def test_fp16_scaler_state_is_checkpointed(tmp_path, pydocs_data):
    job = build(tiny("precision=fp16", "trainer.max_steps=1"), tmp_path, data=pydocs_data)
    job.trainer.train_step()
    state = job.trainer.checkpoint_state()["techniques"]["fp16"]
    assert state["scaler"]["scale"] > 0


@pytest.mark.parametrize("memory", ["activation_ckpt", "selective_ckpt"])
def test_memory_option_trains(memory, tmp_path, pydocs_data):
    out = losses(tmp_path, pydocs_data, f"memory={memory}")
    assert out[-1] < out[0]


def test_accumulation_equals_large_batch(tmp_path, pydocs_data):
    big = first_grads(tiny("trainer.batch_size=8"), tmp_path / "a", pydocs_data)
    acc = first_grads(tiny("trainer.batch_size=2", "trainer.accum_steps=4"), tmp_path / "b", pydocs_data)
    assert big.keys() == acc.keys()
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-5, atol=1e-7, msg=name)


def test_accumulation_trajectory_matches(tmp_path, pydocs_data):
    """Several optimizer steps, not just the first gradient."""
    a = losses(tmp_path / "a", pydocs_data, "trainer.batch_size=8", "trainer.max_steps=4")
    b = losses(tmp_path / "b", pydocs_data, "trainer.batch_size=2", "trainer.accum_steps=4",
               "trainer.max_steps=4")
    assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("memory", ["activation_ckpt", "selective_ckpt"])
def test_activation_checkpointing_same_gradients(memory, tmp_path, pydocs_data):
    ref = first_grads(tiny(), tmp_path / "ref", pydocs_data)
    ckpt = first_grads(tiny(f"memory={memory}"), tmp_path / "ac", pydocs_data)
    assert ref.keys() == ckpt.keys()
    for name in ref:
        torch.testing.assert_close(ckpt[name], ref[name], rtol=1e-6, atol=1e-8, msg=name)


def test_compile_trains(tmp_path, pydocs_data):
    pytest.importorskip("torch._inductor")
    out = losses(tmp_path, pydocs_data, "compile=true", "trainer.max_steps=3")
    assert out[-1] < out[0]


def test_summary_fields(tmp_path, pydocs_data):
    summary = train(tiny(), tmp_path, data=pydocs_data)
    for key in ("val_loss", "val_ppl", "tokens_per_sec", "peak_mem_mb", "params", "step", "techniques"):
        assert key in summary, key
    assert summary["step"] == 6 and summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "metrics.jsonl").is_file()
    assert (tmp_path / "checkpoints").is_dir()


class NaNLoss(Technique):
    """Test probe: makes the loss non-finite from step ``start`` on."""

    stage = Stage.SURGERY
    name = "nan_loss"

    def __init__(self, start):
        self.start = start

    def transform_loss(self, loss, batch, outputs, info, ctx):
        return loss * float("nan") if info.step >= self.start else loss


def test_nonfinite_loss_stops_with_last_good_checkpoint(tmp_path, pydocs_data):
    from tfx.ckpt import latest_checkpoint
    from tfx.core import TrainingError

    cfg = tiny("trainer.max_steps=20", "trainer.ckpt_every=2", "trainer.max_bad_steps=3")
    job = build(cfg, tmp_path, data=pydocs_data, extra_techniques=[NaNLoss(start=3)])
    with pytest.raises(TrainingError, match=r"non-finite for 3 consecutive steps.*last good checkpoint"):
        job.trainer.fit()
    assert latest_checkpoint(job.ckpt_dir).name == "step_00000002.pt"
    # the parameters are untouched by the skipped steps
    assert all(torch.isfinite(p).all() for p in job.model.parameters())


def test_fp16_scaler_skips_nonfinite_steps(tmp_path, pydocs_data):
    cfg = tiny("precision=fp16", "trainer.max_steps=2")
    job = build(cfg, tmp_path, data=pydocs_data, extra_techniques=[NaNLoss(start=1)])
    before = [p.detach().clone() for p in job.model.parameters()]
    job.trainer.train_step()
    after_good = [p.detach().clone() for p in job.model.parameters()]
    job.trainer.train_step()  # nan: the scaler skips it
    assert any(not torch.equal(a, b) for a, b in zip(before, after_good))
    assert all(torch.equal(a, p) for a, p in zip(after_good, job.model.parameters()))
    assert job.trainer.state.skipped_steps == 1


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="Linux only")
def test_peak_memory_is_per_job():
    """Multirun jobs share one process: each job's peak must not include the last one's."""
    from tfx.log import peak_memory_mb, reset_peak_memory

    cpu = torch.device("cpu")
    big = torch.ones(64 * 2**20 // 4 * 8)  # 512 MiB, touched
    del big
    high = peak_memory_mb(cpu)
    reset_peak_memory(cpu)
    assert peak_memory_mb(cpu) < high - 400
