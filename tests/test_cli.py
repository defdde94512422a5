"""train.py / evaluate.py as a user runs them (subprocesses)."""
from __future__ import annotations

import json

import pytest

from conftest import ROOT, TINY, run_cli


def test_multirun_writes_two_summaries_and_two_wandb_runs(tmp_path):
    sweep = tmp_path / "sweep"
    logger = [a for a in TINY if not a.startswith("logger=")]
    res = run_cli(["train.py", "-m", *logger, "trainer.max_steps=2", "precision=fp32,bf16",
                   f"hydra.sweep.dir={sweep}"], env={"WANDB_MODE": "offline"})
    assert res.returncode == 0, res.stderr[-3000:]
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2
    names = [json.loads(p.read_text())["run_name"] for p in summaries]
    assert "precision=fp32" in names[0] and "precision=bf16" in names[1]
    runs = sorted(sweep.glob("*/wandb/offline-run-*"))
    assert len(runs) == 2 and runs[0].parent.parent != runs[1].parent.parent


def test_evaluate_writes_eval_json(tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli(["train.py", *TINY, "trainer.max_steps=2", f"hydra.run.dir={run_dir}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "val loss" in res.stdout and "tokens/s" in res.stdout and str(run_dir) in res.stdout
    ev = run_cli(["evaluate.py", f"run={run_dir}", "max_batches=2", "speed_batches=2",
                  f"hydra.run.dir={tmp_path / 'eval'}"])
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads((run_dir / "eval.json").read_text())
    for key in ("val_loss", "val_ppl", "test_loss", "test_ppl", "inference_tokens_per_sec",
                "latency_ms_per_batch", "params", "size_on_disk_bytes"):
        assert key in result, key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["params"] == summary["params"]


def test_user_errors_are_one_line(tmp_path):
    res = run_cli(["train.py", *TINY, "memory=activation_ckpt", "memory.mode=fast",
                   f"hydra.run.dir={tmp_path}"])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == "error: memory.mode='fast'; choose 'full' or 'selective'"
    assert "Traceback" not in res.stderr

    res = run_cli(["train.py", *TINY, "data=files", "data.data_files=/nonexistent/*.txt",
                   f"hydra.run.dir={tmp_path}"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("error:")

    res = run_cli(["evaluate.py", f"run={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'e'}"])
    assert res.returncode == 2 and "no checkpoint found" in res.stderr


@pytest.mark.parametrize("override,message", [
    ("trainer.max_steps=lots", "error: Error merging override trainer.max_steps=lots (Value 'lots' of type "
                               "'str' could not be converted to Integer)"),
    ("trainer.max_stepz=5", "error: Could not override 'trainer.max_stepz'."),
    ("precision=bf17", "error: In 'train': Could not find 'precision/bf17'; choose one of "
                       "['bf16', 'fp16', 'fp32', 'fp8']"),
    ("trainer.target_loss=abc", "error: Error merging override trainer.target_loss=abc"),
    ("optim.betas=[0.9", "error: cannot parse the override 'optim.betas=[0.9': no viable alternative"),
    ("seed=1 seed=2", "error: seed is given twice (seed=1 and seed=2); for one run per seed use -m seed=1,2"),
    ("seed=1,2", "error: Ambiguous value for argument 'seed=1,2'"),  # a sweep without -m or a preset
])
def test_train_composition_errors_are_one_line_exit_2(override, message, tmp_path):
    """Hydra answers these in several lines with exit 1; train.py's preflight in one."""
    res = run_cli(["train.py", *override.split(), f"hydra.run.dir={tmp_path / 'run'}"])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), res.stderr
    assert not (tmp_path / "run").exists()


def test_a_sweeping_preset_takes_comma_lists_without_m(monkeypatch):
    """experiment=memory sets hydra.mode=MULTIRUN, so `seed=1,2` is a sweep Hydra runs, not
    an ambiguous value: the preflight leaves it to Hydra (it refused it before)."""
    from tfx.cli import preflight
    from tfx.config import register_configs

    register_configs()  # the typed schemas, as train.py registers them before its preflight
    monkeypatch.setattr("tfx.cli.fail", lambda err: pytest.fail(f"refused: {err}"))
    preflight(["experiment=memory", "trainer.max_steps=30", "seed=1337,1,2"], ROOT / "conf")


def test_exported_variants_keep_the_runs_sparse_attention(tmp_path, pydocs_data):
    """A variant rebuilt from an exported file gets the run's attention kernel: with the
    pruned weights round-tripped exactly, its loss equals the run's."""
    from conftest import tiny
    from tfx.eval_run import evaluate_run
    from tfx.train.run import train

    cfg = tiny("trainer.max_steps=2", "attention=sliding_window", "attention.window=8",
               "compression=[prune]", "compression.prune.schedule=oneshot", "compression.prune.sparsity=0.5")
    train(cfg, tmp_path, data=pydocs_data)
    result = evaluate_run(str(tmp_path), batch_size=4, max_batches=2, speed_batches=1, splits=["validation"],
                          progress=False)
    assert result["variants"]["sparse (model_sparse.tfxs)"]["val_loss"] == result["val_loss"]


def test_evaluate_reports_exported_compression_variants(tmp_path, pydocs_data):
    from conftest import tiny
    from tfx.eval_run import evaluate_run
    from tfx.train.run import train

    cfg = tiny("trainer.max_steps=2", "compression=[prune,compressed_export]",
               "compression.prune.schedule=oneshot", "compression.prune.sparsity=0.8")
    train(cfg, tmp_path, data=pydocs_data)
    result = evaluate_run(str(tmp_path), batch_size=4, max_batches=2, speed_batches=1,
                          splits=["validation"])
    sparse = result["variants"]["sparse (model_sparse.tfxs)"]
    assert sparse["val_loss"] == result["val_loss"]  # exact round trip of the pruned weights
    assert sparse["size_on_disk_bytes"] < result["size_on_disk_bytes"]  # embeddings stay dense
    assert "compressed (model.tfxz)" in result["variants"]
