"""Bad inputs and faults end in one line, never in a wrong result."""
from __future__ import annotations

import json
import os
import socket
import time

import pytest

from conftest import TINY, run_cli, tiny
from tfx.core import CheckpointError, DataError
from tfx.data import prepare_data
from tfx.train.run import build


def test_split_shorter_than_one_block_is_refused(pydocs_data):
    with pytest.raises(DataError, match=r"the validation split has 8,635 tokens, fewer than one block "
                                        r"of data.seq_len=9000"):
        prepare_data(tiny("data.seq_len=9000").data)


def test_resume_with_another_shape_names_what_differs(tmp_path, pydocs_data):
    job = build(tiny("trainer.max_steps=1"), tmp_path, data=pydocs_data)
    job.trainer.fit()
    with pytest.raises(CheckpointError, match=r"model.n_layer: 2 -> 3.*resume=never"):
        build(tiny("model.n_layer=3"), tmp_path, data=pydocs_data)
    with pytest.raises(CheckpointError, match=r"data.seq_len: 32 -> 16"):
        build(tiny("data.seq_len=16"), tmp_path, data=pydocs_data)


def test_second_run_on_a_locked_directory_refuses(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".tfx.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                    "started": time.time()}))
    out = run_cli(["train.py", *TINY, f"hydra.run.dir={run_dir}"])
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run directory") and f"pid {os.getpid()}" in last
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("override,match", [
    ("trainer.batch_size=0", "trainer.batch_size=0 must be > 0"),
    ("optim.lr=-1", "optim.lr=-1 must be > 0"),
    ("trainer.grad_clip=-1", "trainer.grad_clip=-1.0 must be > 0"),
    ("trainer.accum_steps=0", "trainer.accum_steps=0 must be > 0"),
    ("trainer.ckpt_every=-1", "trainer.ckpt_every=-1 must be >= 0"),
    ("trainer.log_every=0", "trainer.log_every=0 must be > 0"),
    ("optim.betas=[0.9]", r"optim.betas=\[0.9\] must be two numbers"),
])
def test_bad_values_are_one_line_through_the_cli(tmp_path, override, match):
    import re

    out = run_cli(["train.py", *TINY, override, f"hydra.run.dir={tmp_path / 'run'}"])
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(match, lines[0]), out.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- resume compares the config with the checkpoint's ------------------------------------

def test_resume_applies_allowed_changes_prints_and_records_them(tmp_path, pydocs_data, capsys):
    from tfx.optim import lr_lambda

    build(tiny("trainer.max_steps=3"), tmp_path, data=pydocs_data).trainer.fit()
    capsys.readouterr()
    job = build(tiny("trainer.max_steps=6", "trainer.log_every=2", "trainer.keep_last=3"), tmp_path,
                data=pydocs_data)
    out = capsys.readouterr().out
    assert out.count("resume: applying changed settings from step_00000003.pt") == 1
    assert "trainer.max_steps: 3 -> 6" in out and "trainer.log_every: 1 -> 2" in out
    records = [json.loads(line) for line in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["step"] == 3
    assert records[0]["changes"] == {"trainer.keep_last": [2, 3], "trainer.log_every": [1, 2],
                                     "trainer.max_steps": [3, 6]}
    # the schedule is rebuilt for the new last step, from the first resumed step on
    expected = 3e-3 * lr_lambda("cosine", 0, 6, 0.1)(3)
    assert [g["lr"] for g in job.trainer.optimizer.param_groups] == pytest.approx([expected] * 2)
    assert job.loop.max_steps == 6 and job.trainer.checkpoints.keep_last == 3
    job.trainer.fit()
    assert job.trainer.state.step == 6


def test_unchanged_resume_is_recorded_without_changes(tmp_path, pydocs_data, capsys):
    build(tiny("trainer.max_steps=2"), tmp_path, data=pydocs_data).trainer.fit()
    capsys.readouterr()
    build(tiny("trainer.max_steps=2"), tmp_path, data=pydocs_data)
    assert "applying changed settings" not in capsys.readouterr().out
    assert json.loads((tmp_path / "resumes.jsonl").read_text())["changes"] == {}


@pytest.mark.parametrize("override,diff", [
    ("optim.lr=1e-2", "optim.lr: 0.003 -> 0.01"),
    ("seed=1", "seed: 1337 -> 1"),
    ("scheduler.decay=linear", "scheduler.decay: 'cosine' -> 'linear'"),
    ("trainer.batch_size=8", "trainer.batch_size: 4 -> 8"),
    ("trainer.accum_steps=2", "trainer.accum_steps: 1 -> 2"),
    ("trainer.grad_clip=0.5", "trainer.grad_clip: 1.0 -> 0.5"),
    ("data.max_docs=40", "data.max_docs: None -> 40"),
])
def test_resume_refuses_other_changes_with_the_diff(tmp_path, pydocs_data, override, diff):
    build(tiny("trainer.max_steps=1"), tmp_path, data=pydocs_data).trainer.fit()
    with pytest.raises(CheckpointError) as err:
        build(tiny(override, "trainer.max_steps=4"), tmp_path, data=pydocs_data)
    msg = str(err.value)
    assert "\n" not in msg and diff in msg and "resume=never" in msg
    assert "trainer.max_steps" not in msg  # allowed changes are not part of the refusal
    assert not (tmp_path / "resumes.jsonl").exists()
    build(tiny(override, "resume=never"), tmp_path, data=pydocs_data)  # an explicit fresh start


def test_batch_size_may_change_with_the_data_parallel_ranks():
    from tfx.train.build import _resume_changes, config_dict

    cfg = tiny("trainer.batch_size=2")
    state = {"config": config_dict(tiny("trainer.batch_size=4")), "global_batch": 4}
    assert _resume_changes(state, cfg, "ckpt", dp_size=2) == {"trainer.batch_size": [4, 2]}
    with pytest.raises(CheckpointError, match=r"trainer.batch_size: 4 -> 2"):
        _resume_changes(state, cfg, "ckpt", dp_size=1)  # another global batch
    ddp = _resume_changes(state, tiny("trainer.batch_size=2", "parallel=ddp"), "ckpt", dp_size=2)
    assert ddp["trainer.batch_size"] == [4, 2] and any(k.startswith("parallel") for k in ddp)


def test_resume_through_the_cli_applies_or_refuses_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train.py", *TINY, f"hydra.run.dir={run_dir}"]
    assert run_cli([*args, "trainer.max_steps=2"]).returncode == 0
    refused = run_cli([*args, "trainer.max_steps=4", "optim.lr=1e-2"])
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "optim.lr: 0.003 -> 0.01" in lines[0]
    applied = run_cli([*args, "trainer.max_steps=4"])
    assert applied.returncode == 0, applied.stderr[-2000:]
    assert "trainer.max_steps: 2 -> 4" in applied.stdout
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 4
    assert json.loads((run_dir / "resumes.jsonl").read_text())["changes"] == {"trainer.max_steps": [2, 4]}


# -- fp16: skipped steps count, and stop the run ----------------------------------------

def test_fp16_divergence_stops_naming_the_last_good_checkpoint(tmp_path, pydocs_data):
    from tfx.ckpt.checkpoint import list_checkpoints
    from tfx.core import TrainingError

    job = build(tiny("precision=fp16", "optim.lr=1e4", "trainer.max_steps=30", "trainer.ckpt_every=1"),
                tmp_path, data=pydocs_data)
    with pytest.raises(TrainingError, match=r"non-finite for 3 consecutive steps.*last good "
                                            r"checkpoint: .*step_00000001.pt"):
        job.trainer.fit()
    assert [p.name for p in list_checkpoints(job.ckpt_dir)] == ["step_00000001.pt"]  # none in the streak


def test_fp16_consecutive_scaler_skips_stop_the_run(tmp_path, pydocs_data):
    from tfx.core import TrainingError

    # a finite loss whose scaled gradients overflow every step: only the scaler skips
    job = build(tiny("precision=fp16", "precision.init_scale=1e30", "trainer.max_scaler_skips=4",
                     "trainer.max_steps=30", "trainer.ckpt_every=1"), tmp_path, data=pydocs_data)
    with pytest.raises(TrainingError, match=r"fp16 loss scaler skipped 4 consecutive steps .* at step 4"
                                            r".*no checkpoint was written"):
        job.trainer.fit()
    assert job.trainer.state.bad_steps == 0 and job.trainer.state.skipped_steps == 4
    assert not list(job.ckpt_dir.glob("step_*"))


def test_fp16_divergence_through_the_cli(tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli(["train.py", *TINY, "precision=fp16", "optim.lr=1e4", "trainer.max_steps=30",
                   "trainer.ckpt_every=1", f"hydra.run.dir={run_dir}"])
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: loss was non-finite"), out.stderr[-2000:]
    assert "last good checkpoint" in lines[0] and not (run_dir / "summary.json").exists()


# -- bad input through the CLI: one line, exit 2 ------------------------------------------

def one_error_line(out) -> str:
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    return lines[0]


def test_unwritable_output_directory_is_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for run_dir in ("/proc/tfx_run", a_file / "run"):  # root ignores chmod: use paths no one can create
        line = one_error_line(run_cli(["train.py", *TINY, f"hydra.run.dir={run_dir}"]))
        assert f"cannot write to the output directory {run_dir}" in line and "hydra.run.dir" in line
    line = one_error_line(run_cli(["train.py", "-m", *TINY, f"hydra.sweep.dir={a_file / 'sweep'}"]))
    assert "hydra.sweep.dir" in line


def test_files_without_data_files_is_one_line(tmp_path):
    line = one_error_line(run_cli(["train.py", *TINY, "data=files", f"hydra.run.dir={tmp_path / 'run'}"]))
    assert "data=files needs data.data_files" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_cuda_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    line = one_error_line(run_cli(["train.py", *TINY, "trainer.device=cuda",
                                   f"hydra.run.dir={tmp_path / 'run'}"]))
    assert "trainer.device=cuda but CUDA is not available" in line


@pytest.mark.parametrize("override", ["experiment=0", "optim=null", "precision=[1]", "-m precision=fp32,1"])
def test_config_group_without_an_option_name_is_one_line(tmp_path, override):
    # Hydra 1.3 itself answers these with a traceback while composing
    out = run_cli(["train.py", *override.split(), *TINY, f"hydra.run.dir={tmp_path / 'run'}"])
    line = one_error_line(out)
    assert "takes an option name" in line and override.split()[-1] in line
    assert not (tmp_path / "run").exists()
