"""Budgets and a target loss, through the real loop: the run stops at whichever of
trainer.max_steps, trainer.budget_tokens, trainer.budget_seconds and
trainer.target_loss comes first, and says which in summary.json."""
from __future__ import annotations

import math

import pytest

from conftest import TINY, run_cli, tiny
from parallel_utils import parallel_env  # noqa: F401 (fixture)
from tfx.ckpt import latest_checkpoint, load_checkpoint
from tfx.config import TrainerConfig
from tfx.core import ConfigError
from tfx.log import read_jsonl
from tfx.train import run as run_module
from tfx.train.run import build, train

TOKENS_PER_STEP = 4 * 32  # TINY: batch_size 4 x seq_len 32, every label a target


@pytest.fixture
def exports(monkeypatch):
    """Records whether the run was exported (normal end) or not (interrupted)."""
    calls = []

    def spy(model, run_dir):
        calls.append(run_dir)
        return {}
    monkeypatch.setattr(run_module, "export_hf", spy)
    return calls


def test_token_budget_stops_at_the_step_that_reaches_it(tmp_path, pydocs_data, exports):
    budget = 2 * TOKENS_PER_STEP + 1  # reached by step 3, not 2
    summary = train(tiny(f"trainer.budget_tokens={budget}"), tmp_path, data=pydocs_data)
    assert summary["stop_reason"] == "budget_tokens" and summary["stopped_early"] is None
    assert summary["step"] == math.ceil(budget / TOKENS_PER_STEP) == 3
    assert summary["tokens_seen"] == 3 * TOKENS_PER_STEP
    assert exports == [tmp_path]  # a normal end: exported, final evaluation in the summary
    assert math.isfinite(summary["val_loss"])
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000003.pt"
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]


def test_max_steps_comes_first_when_the_budget_is_larger(tmp_path, pydocs_data):
    summary = train(tiny("trainer.budget_tokens=1000000", "trainer.max_steps=2"), tmp_path, data=pydocs_data)
    assert summary["stop_reason"] == "max_steps" and summary["step"] == 2
    assert "tokens_to_target" not in summary  # no target set


def _val_losses(tmp_path, data, steps):
    """Validation loss after every step of an uninterrupted run (the reference)."""
    job = build(tiny(f"trainer.max_steps={steps}", "trainer.eval_every=1"), tmp_path, data=data)
    job.trainer.fit()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    return [r["val/loss"] for r in rows if "val/loss" in r]  # steps 1 .. steps-1


def test_target_loss_stops_at_the_first_evaluation_at_or_below_it(tmp_path, pydocs_data, exports):
    losses = _val_losses(tmp_path / "ref", pydocs_data, 6)
    target = losses[2]  # reached at step 3 at the latest
    first = next(i for i, loss in enumerate(losses) if loss <= target) + 1
    summary = train(tiny("trainer.max_steps=6", "trainer.eval_every=1", f"trainer.target_loss={target!r}"),
                    tmp_path / "run", data=pydocs_data)
    assert summary["stop_reason"] == "target_loss" and summary["step"] == first
    assert summary["steps_to_target"] == first
    assert summary["tokens_to_target"] == first * TOKENS_PER_STEP
    assert 0 < summary["seconds_to_target"] <= summary["train_seconds"]
    assert exports == [tmp_path / "run"]


def test_target_not_reached_is_said(tmp_path, pydocs_data):
    summary = train(tiny("trainer.max_steps=2", "trainer.eval_every=1", "trainer.target_loss=0.01"),
                    tmp_path, data=pydocs_data)
    assert summary["stop_reason"] == "max_steps"
    assert summary["tokens_to_target"] == summary["seconds_to_target"] == "not reached"


def test_seconds_budget_stops_and_spans_resumes(tmp_path, pydocs_data):
    # an interrupted run keeps its elapsed training time in the checkpoint ...
    first = build(tiny(), tmp_path, data=pydocs_data)
    first.trainer.callbacks.append(lambda t: t.state.step == 2 and t.request_stop("test"))
    result = first.trainer.fit()
    assert result["stop_reason"] == "signal" and result["stopped"] == "test"
    spent = first.trainer.state.train_seconds
    saved = load_checkpoint(latest_checkpoint(first.ckpt_dir))["loop"]
    assert saved["step"] == 2 and saved["train_seconds"] == spent > 0
    # ... and a resume starts from it: a budget it already used up ends the run at once
    second = build(tiny(f"trainer.budget_seconds={spent!r}"), tmp_path, data=pydocs_data)
    assert second.trainer.state.train_seconds == spent
    result = second.trainer.fit()
    assert result["stop_reason"] == "budget_seconds" and second.trainer.state.step == 2
    # a larger budget continues and keeps counting on top of it
    third = build(tiny(f"trainer.budget_seconds={1e6}", "trainer.max_steps=3"), tmp_path, data=pydocs_data)
    third.trainer.fit()
    assert third.trainer.state.step == 3 and third.trainer.state.train_seconds > spent


def test_tiny_seconds_budget_stops_after_one_step(tmp_path, pydocs_data):
    summary = train(tiny("trainer.budget_seconds=1e-6"), tmp_path, data=pydocs_data)
    assert summary["stop_reason"] == "budget_seconds" and summary["step"] == 1


@pytest.mark.parametrize("kwargs,match", [
    ({"budget_tokens": 0}, r"trainer.budget_tokens=0 must be an integer > 0"),
    ({"budget_tokens": -5}, r"trainer.budget_tokens=-5 must be an integer > 0"),
    ({"budget_tokens": 2.5}, r"trainer.budget_tokens=2.5 must be an integer > 0"),
    ({"budget_seconds": 0.0}, r"trainer.budget_seconds=0.0 must be a finite number > 0"),
    ({"budget_seconds": float("inf")}, r"trainer.budget_seconds=inf must be a finite number > 0"),
    ({"target_loss": float("nan")}, r"trainer.target_loss=nan must be a finite number > 0"),
    ({"target_loss": "low"}, r"trainer.target_loss='low' must be a finite number > 0"),
    ({"target_loss": True}, r"trainer.target_loss=True must be a finite number > 0"),
    ({"target_loss": 2.0, "eval_every": 0}, r"trainer.target_loss=2.0 .* trainer.eval_every=0; set "
                                            r"trainer.eval_every > 0"),
    ({"peak_tflops": -1.0}, r"trainer.peak_tflops=-1.0 must be a finite number > 0"),
])
def test_bad_values_are_refused_in_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        TrainerConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_token_budget_may_be_written_as_a_float():
    from tfx.config import build_loop

    assert build_loop(tiny("trainer.budget_tokens=5e7")).budget_tokens == 50_000_000
    assert build_loop(tiny("trainer.budget_tokens=50_000_000")).budget_tokens == 50_000_000
    with pytest.raises(ConfigError, match=r"trainer.budget_tokens=0 must be an integer > 0"):
        build_loop(tiny("trainer.budget_tokens=0"))


def test_bad_value_through_the_cli_is_one_line_exit_2(tmp_path):
    out = run_cli(["train.py", *TINY, "trainer.target_loss=nan", f"hydra.run.dir={tmp_path / 'run'}"])
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "trainer.target_loss=nan must be a finite number > 0" in lines[0]


def test_budget_stop_through_the_cli_exits_0(tmp_path):
    out = run_cli(["train.py", *TINY, f"trainer.budget_tokens={TOKENS_PER_STEP}",
                   f"hydra.run.dir={tmp_path / 'run'}"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"stopped by trainer.budget_tokens at step 1 ({TOKENS_PER_STEP} tokens" in out.stdout


def test_ranks_agree_on_the_stop(tmp_path, parallel_env):
    """The target (and the seconds budget) is agreed on by an all-reduce: both ranks
    stop after the same step, and the job ends normally."""
    from parallel_utils import run_workers

    summary = run_workers(tmp_path, 2, "parallel=ddp", "trainer.batch_size=2", "trainer.eval_every=1",
                          "trainer.target_loss=100.0")
    assert summary["stop_reason"] == "target_loss" and summary["step"] == 1
    assert summary["steps_to_target"] == 1 and summary["tokens_to_target"] == TOKENS_PER_STEP
