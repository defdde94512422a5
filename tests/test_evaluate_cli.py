"""evaluate.py as a user runs it: the printed summary (its numbers are eval.json's), the
progress bar on a terminal, and bad input (one ``error:`` line, exit 2, nothing written)."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
import torch

from conftest import CONF, ROOT, run_cli, tiny

SEQ_LEN, BATCH, MAX_BATCHES = 32, 4, 2  # TINY's data.seq_len; evaluate.py's batch_size, max_batches
EVAL = ["max_batches=2", "speed_batches=1", "batch_size=4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, pydocs_data):
    from tfx.train.run import train

    path = tmp_path_factory.mktemp("run")
    train(tiny("trainer.max_steps=2"), path, data=pydocs_data)
    return path


def table_rows(stdout: str):
    """{(model, split): (loss, ppl, bpb, tokens)} from the summary's quality table."""
    rows = {}
    for line in stdout.splitlines():
        m = re.fullmatch(r"(\S+)\s+(validation|test)\s+(\S+)\s+(\S+)\s+(\S+)\s+([\d,]+)", line.strip())
        if m:
            rows[m.group(1), m.group(2)] = (float(m.group(3)), float(m.group(4)), float(m.group(5)),
                                            int(m.group(6).replace(",", "")))
    return rows


def test_summary_prints_eval_json_numbers(run_dir, tmp_path):
    out = tmp_path / "elsewhere"
    res = run_cli(["evaluate.py", f"run={run_dir}", *EVAL, f"out={out}", f"hydra.run.dir={tmp_path / 'h'}"])
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    assert not (run_dir / "eval.json").exists()  # out= moved it
    # tokens evaluated, by hand: max_batches full batches of batch_size blocks of seq_len tokens
    assert result["val_tokens"] == result["test_tokens"] == MAX_BATCHES * BATCH * SEQ_LEN
    rows = table_rows(res.stdout)
    assert set(rows) == {("trained", "validation"), ("trained", "test")}, res.stdout
    for split, key in (("validation", "val"), ("test", "test")):
        loss, ppl, bpb, tokens = rows["trained", split]
        assert loss == pytest.approx(result[f"{key}_loss"], abs=5.1e-5)
        assert ppl == pytest.approx(result[f"{key}_ppl"], abs=5.1e-3)
        assert bpb == pytest.approx(result[f"{key}_bpb"], abs=5.1e-5)
        assert tokens == result[f"{key}_tokens"]
    lines = {ln.split()[0]: ln for ln in res.stdout.splitlines() if ln.strip()}
    assert f"{result['checkpoint']} (step 2)" in lines["evaluated"]
    assert "pydocs" in lines["data"] and f"seq_len {SEQ_LEN}" in lines["data"]
    seconds = float(re.search(r"time\s+([\d.]+) s", res.stdout).group(1))
    assert seconds == pytest.approx(result["eval_seconds"], abs=0.051)
    assert lines["wrote"].split(None, 1)[1] == str(out / "eval.json")
    speed = re.search(r"^trained\s+([\d,]+)\s+([\d.]+)\s+([\d,]+)\s+([\d.]+)$", res.stdout, re.M)
    assert speed, res.stdout
    assert int(speed.group(3).replace(",", "")) == result["params"]
    assert float(speed.group(4)) == pytest.approx(result["size_on_disk_bytes"] / 2 ** 20, abs=0.0051)


def run_on_terminal(args, env=None, timeout=120):
    """Run ``python args`` with stderr on a pseudo-terminal 120 columns wide (stdout a
    pipe); returns (returncode, stdout, what the terminal received)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=slave,
                            text=True, env={**os.environ, **(env or {})})
    os.close(slave)
    chunks = []

    def read():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO once the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stdout, _ = proc.communicate(timeout=timeout)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, stdout, b"".join(chunks).decode("utf-8", "replace")


def test_progress_bar_on_a_terminal_counts_the_batches(run_dir, tmp_path):
    from tfx.eval_run import n_batches

    code, stdout, term = run_on_terminal(["evaluate.py", f"run={run_dir}", *EVAL, f"out={tmp_path}",
                                          f"hydra.run.dir={tmp_path / 'h'}"])
    assert code == 0, term[-3000:]
    total = 2 * n_batches(10 ** 6, BATCH, MAX_BATCHES)  # both splits, each capped at max_batches
    assert total == 4
    assert re.search(rf"eval step_00000002\.pt:\s+100%.*\b{total}/{total}\b", term), term[-2000:]
    assert "evaluated" in stdout and "eval step_" not in stdout  # the bar is on stderr only


def test_n_batches_matches_eval_batches(pydocs_data):
    from tfx.data import eval_batches
    from tfx.eval_run import n_batches

    blocks = pydocs_data.test
    for batch_size, max_batches in ((4, None), (7, None), (len(blocks), None), (4, 3), (5, 10 ** 6)):
        assert n_batches(len(blocks), batch_size, max_batches) == \
            sum(1 for _ in eval_batches(blocks, batch_size, max_batches))


def test_compile_times_a_compiled_model_and_keeps_eager_quality(run_dir, tmp_path):
    """compile=true: the speed comes from torch.compile(model) (its forward runs compiled
    code), the quality numbers are the eager ones, eval.json says which."""
    from tfx.eval_run import evaluate_run

    kwargs = dict(batch_size=BATCH, max_batches=MAX_BATCHES, speed_batches=1, splits=["validation"],
                  progress=False)
    eager = evaluate_run(str(run_dir), out=str(tmp_path / "eager"), **kwargs)
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = evaluate_run(str(run_dir), out=str(tmp_path / "compiled"), compile=True, **kwargs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before  # something was compiled
    assert eager["compiled"] is False and compiled["compiled"] is True
    assert compiled["val_loss"] == eager["val_loss"] and compiled["val_tokens"] == eager["val_tokens"]
    assert compiled["inference_tokens_per_sec"] > 0


# -- bad input: one line, exit 2, nothing written ---------------------------------------

def preflight(args, capsys):
    """evaluate.py's check of its command line, in this process: (exit code, stderr)."""
    from tfx.cli import evaluate_preflight

    with pytest.raises(SystemExit) as exc:
        evaluate_preflight(args, CONF)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, expected", [
    (["batch_size=abc"], "error: batch_size='abc' must be an integer >= 1"),
    (["batch_size=0"], "error: batch_size=0 must be an integer >= 1"),
    (["batch_size=2.5"], "error: batch_size=2.5 must be an integer >= 1"),
    (["speed_batches=0"], "error: speed_batches=0 must be an integer >= 1"),
    (["max_batches=-1"], "error: max_batches=-1 must be an integer >= 1"),
    (["max_batches=0"], "error: max_batches=0 must be an integer >= 1"),
    (["splits=[validation,bogus]"], "error: splits=['validation', 'bogus'] must be a non-empty list"),
    (["splits=test"], "error: splits='test' must be a non-empty list"),
    (["splits=[]"], "error: splits=[] must be a non-empty list"),
    (["splits=[test,test]"], "error: splits=['test', 'test'] must be a non-empty list"),
    (["device=xyz"], "error: device='xyz' is not a device"),
    (["progress=maybe"], "error: progress='maybe' must be true or false"),
    (["compile=1"], "error: compile=1 must be true or false"),
    (["foo=1"], "error: Could not override 'foo'."),
    (["+foo=1"], "error: unknown key(s) ['foo']"),
    (["batch_size=["], "error: cannot parse the override 'batch_size=['"),
    (["model=nonexistent"], "error: In 'evaluate': Could not find 'model/nonexistent'; choose one of"),
    (["run=a,b"], "error: Ambiguous value for argument 'run=a,b'"),
    (["data=pydocs"], "error: data=pydocs does not apply to run="),
    (["optim=sgd"], "error: optim=sgd does not apply to evaluate.py"),
    (["model=smollm2"], "error: give run=<run directory> or model=<pretrained model>, not both"),
])
def test_bad_values_and_overrides(args, expected, run_dir, tmp_path, capsys):
    hydra_dir = tmp_path / "h"
    code, err = preflight([f"run={run_dir}", *args, f"hydra.run.dir={hydra_dir}"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(expected), err
    assert not hydra_dir.exists() and not (run_dir / "eval.json").exists()


def test_bad_paths(run_dir, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a checkpoint\n")
    hydra_dir = tmp_path / "h"
    cases = [
        ([f"run={tmp_path / 'missing'}", f"hydra.run.dir={hydra_dir}"], "error: no checkpoint found at"),
        ([f"run={a_file}", f"hydra.run.dir={hydra_dir}"],
         f"error: run={a_file} is a file but not a checkpoint"),
        ([f"run={run_dir}", f"out={a_file}/sub", f"hydra.run.dir={hydra_dir}"],
         f"error: cannot write to out={a_file}/sub ({a_file} is a file, not a directory); set out to a "
         f"writable directory"),
        ([f"run={run_dir}", f"hydra.run.dir={a_file}/x"],
         f"error: cannot write to the output directory {a_file}/x ({a_file} is a file, not a directory); "
         f"set hydra.run.dir"),
        (["model=smollm2", f"hydra.run.dir={a_file}/x"],
         f"error: cannot write to the output directory {a_file}/x ({a_file} is a file, not a directory); "
         f"set hydra.run.dir"),
    ]
    for args, expected in cases:
        code, err = preflight(args, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(expected), (args, err)
    # a run directory that cannot be written (root ignores permission bits: simulate EACCES)
    import tempfile

    real = tempfile.TemporaryFile

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == run_dir:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    code, err = preflight([f"run={run_dir}", f"hydra.run.dir={hydra_dir}"], capsys)
    assert code == 2 and err.strip() == (f"error: cannot write eval.json into the run directory {run_dir} "
                                         f"(Permission denied); pass out=<writable directory>")
    assert not hydra_dir.exists() and not (run_dir / "eval.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_bad_input_through_the_cli_exits_2_and_writes_nothing(run_dir, tmp_path):
    """The real command line: preflight errors and the bad-run error, nothing written."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for args, expected in [
        ([f"run={run_dir}", "batch_size=abc", f"hydra.run.dir={tmp_path / 'h'}"],
         "error: batch_size='abc' must be an integer >= 1"),
        ([f"run={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'h'}"], "error: no checkpoint found at"),
        ([f"run={run_dir}", f"hydra.run.dir={a_file}/x"], "error: cannot write to the output directory"),
    ]:
        res = run_cli(["evaluate.py", *args])
        assert res.returncode == 2, res.stderr[-2000:]
        assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith(expected), res.stderr
        assert res.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    assert not (run_dir / "eval.json").exists()
