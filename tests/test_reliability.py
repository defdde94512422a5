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
