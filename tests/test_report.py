"""Sweeps and the comparison report: a real tiny multirun (joblib launcher), the table's
ratios recomputed from the summaries, failed jobs, differing settings warned about, presets
and sweeper/launcher configs. Seed statistics and plots: tests/test_report_stats.py.

The real runs use subprocesses; set TFX_SLOW_TESTS=1 to also run a 2-trial Optuna sweep.
"""
import csv
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tfx.report import JobRecord, ReportError, build_report, load_sweep
from tfx.report.wandb_source import load_wandb, split_override_dirname

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
TINY = ["model=tiny", "data=pydocs", "data.seq_len=32", "trainer.batch_size=2", "trainer.max_steps=3",
        "trainer.eval_batches=2", "trainer.final_eval_batches=2", "trainer.log_every=1",
        "trainer.ckpt_every=0", "trainer.progress=false", "logger=none", "optim=adamw"]
PNGS = ("ppl_vs_throughput.png", "ppl_vs_memory.png", "loss_curves.png")


def _train(args, tmp_root):
    env = dict(os.environ, TFX_CACHE_DIR=str(tmp_root / "cache"), WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two tiny jobs run side by side by the joblib launcher."""
    root = tmp_path_factory.mktemp("sweep")
    _train(["-m", "hydra/launcher=tfx_joblib", *TINY, "precision=fp32,bf16",
            f"hydra.sweep.dir={root / 'mr'}"], root)
    return root / "mr"


def _report(sweep_dir, *args):
    sys.path.insert(0, str(ROOT / "scripts"))
    import report as cli

    return cli.main([str(sweep_dir), *args])


def _rows(path):
    with open(path) as fh:
        return {r["variant"]: r for r in csv.DictReader(fh)}


def test_report_on_real_multirun(sweep, tmp_path):
    sweep_dir = tmp_path / "mr"
    shutil.copytree(sweep, sweep_dir)
    # A crashed job (Hydra wrote its overrides, it never wrote a summary) and an incomplete one.
    overrides = yaml.safe_load((sweep_dir / "0" / ".hydra" / "overrides.yaml").read_text())
    for num, prec in (("2", "fp16"), ("3", "fp16_incomplete")):
        (sweep_dir / num / ".hydra").mkdir(parents=True)
        (sweep_dir / num / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([o for o in overrides if not o.startswith("precision=")] + [f"precision={prec}"]))
    summary = json.loads((sweep_dir / "0" / "summary.json").read_text())
    (sweep_dir / "3" / "summary.json").write_text(json.dumps({**summary, "step": 1}))

    assert _report(sweep_dir) == 0
    rows = _rows(sweep_dir / "report.csv")
    fp32, bf16 = (json.loads((sweep_dir / n / "summary.json").read_text()) for n in ("0", "1"))
    assert rows["precision=fp32"]["baseline"] == "True"
    for key in ("val_ppl", "tokens_per_sec", "peak_mem_mb", "params"):
        assert float(rows["precision=bf16"][key]) == pytest.approx(bf16[key])
        assert float(rows["precision=bf16"][f"{key}_ratio"]) == pytest.approx(bf16[key] / fp32[key])
        assert float(rows["precision=fp32"][f"{key}_ratio"]) == pytest.approx(1.0)
    assert rows["precision=bf16"]["val_ppl_vs_base"] == "untested" and rows["precision=bf16"]["val_ppl_ci95"] == ""
    markdown = (sweep_dir / "report.md").read_text()
    assert "python scripts/report.py" in markdown and "UTC" in markdown.splitlines()[0]
    assert "One seed per variant: no confidence intervals" in markdown and "± n/a" in markdown
    assert markdown.index("`precision=fp32` (baseline)") < markdown.index("`precision=bf16`")
    assert "settings differ" not in markdown
    jobs = {j.name: j for j in load_sweep(sweep_dir)}
    assert jobs["0"].val_curve and jobs["0"].curve and jobs["0"].config["model"]["n_layer"] == 2
    failed = markdown.split("Failed / incomplete")[1]
    assert "precision=fp16" in failed and "no summary.json" in failed
    assert "precision=fp16_incomplete" in failed and "step 1 of 3" in failed
    for png in PNGS:
        assert (sweep_dir / png).stat().st_size > 1000


def test_baseline_option_and_out_dir(sweep, tmp_path):
    assert _report(sweep, "--baseline", "precision=bf16", "--out", str(tmp_path), "--no-plots") == 0
    rows = _rows(tmp_path / "report.csv")
    assert rows["precision=bf16"]["baseline"] == "True"
    assert float(rows["precision=bf16"]["tokens_per_sec_ratio"]) == pytest.approx(1.0)
    assert _report(sweep, "--baseline", "precision=fp8", "--out", str(tmp_path)) == 2


def _job(name, overrides, ppl, tps, **extra):
    summary = {"val_ppl": ppl, "tokens_per_sec": tps, "peak_mem_mb": 100.0, "params": 10,
               "step": 5, "max_steps": 5, "stopped_early": None, **extra}
    return JobRecord(name, overrides, summary=summary)


def test_differing_settings_warn(sweep, tmp_path, capsys):
    sweep_dir = tmp_path / "mr"
    shutil.copytree(sweep, sweep_dir)
    config = sweep_dir / "1" / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["max_steps"], cfg["model"]["n_layer"] = 7, 3
    config.write_text(yaml.safe_dump(cfg))
    assert _report(sweep_dir, "--no-plots") == 0
    err = capsys.readouterr().err
    assert "warning: settings differ between jobs" in err and "trainer.max_steps (3 vs 7)" in err
    markdown = (sweep_dir / "report.md").read_text()
    assert "`model.n_layer`: 2 in `precision=fp32` (job 0); 3 in `precision=bf16` (job 1)" in markdown


def test_seeds_are_averaged_and_baseline_is_fewest_overrides():
    jobs = [_job("0", ["a=1", "b=1", "seed=1"], 10.0, 100.0), _job("1", ["a=1", "b=1", "seed=2"], 12.0, 300.0),
            _job("2", ["a=1", "seed=1"], 20.0, 50.0),
            JobRecord("3", ["a=1", "b=2", "seed=1"], summary={"step": 2, "max_steps": 5, "stopped_early": "sigterm"})]
    report = build_report(jobs)
    by_label = {v.label: v for v in report.variants}
    assert report.common == ["a=1"] and report.baseline.label == "baseline"
    stat = by_label["b=1"].stats["val_ppl"]
    assert (stat.mean, stat.n) == (11.0, 2) and stat.std == pytest.approx(2 ** 0.5)
    assert stat.ci == pytest.approx(12.706204736174694 * 2 ** 0.5 / 2 ** 0.5)   # t(0.975, 1) * s / sqrt(n)
    assert by_label["b=1"].ratios["tokens_per_sec"] == pytest.approx(200.0 / 50.0)
    assert report.failed == [("3", "b=2", "stopped early: sigterm")]


def test_export_size_column_from_compression_summaries():
    jobs = [_job("0", ["c=none"], 10.0, 1.0),
            _job("1", ["c=prune"], 11.0, 1.0, **{"prune/sparse_bytes": 2 ** 20, "prune/dense_bytes": 2 ** 22,
                                                 "mem/grad_bytes": 10, "comm/bytes": 10})]
    report = build_report(jobs)
    assert report.variants[1].stats["export_mb"].mean == 1.0 and "export_mb" not in report.variants[0].stats


def test_wandb_summary_gets_the_report_columns():
    from types import SimpleNamespace
    from tfx.log import WandbLogger

    logger = WandbLogger.__new__(WandbLogger)
    logger.run = SimpleNamespace(summary={})
    logger.summary({"val_ppl": 3.0, "ptq/int8_dynamic/bytes": 2 ** 21, "prune/dense_bytes": 2 ** 23})
    assert logger.run.summary["export_mb"] == 2.0 and logger.run.summary["val_ppl"] == 3.0


def test_clear_errors(tmp_path):
    with pytest.raises(ReportError, match="not a directory"):
        load_sweep(tmp_path / "missing")
    with pytest.raises(ReportError, match="no Hydra jobs"):
        load_sweep(tmp_path)
    (tmp_path / ".hydra").mkdir()
    with pytest.raises(ReportError, match="single run"):
        load_sweep(tmp_path)


def test_wandb_source_offline_and_names(monkeypatch):
    assert split_override_dirname("a=1,compression=[prune,distill],b=x") == ["a=1", "compression=[prune,distill]", "b=x"]
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(ReportError, match="wandb sync"):
        load_wandb("entity/project")


def test_wandb_run_record_has_both_curves_and_config():
    from types import SimpleNamespace
    from tfx.report.wandb_source import _record

    history = [{"_step": 1, "train/loss": 3.0}, {"_step": 2, "train/loss": 2.5}, {"_step": 2, "val/loss": 2.7}]
    run = SimpleNamespace(id="abc", name="precision=bf16,seed=2", state="finished",
                          summary={"val_ppl": 9.0, "_runtime": 1}, config={"trainer": {"max_steps": 2}},
                          scan_history=lambda keys: [r for r in history if all(k in r for k in keys)])
    job = _record(run)
    assert job.overrides == ["precision=bf16", "seed=2"] and job.summary == {"val_ppl": 9.0}
    assert job.curve == [(1, 3.0), (2, 2.5)] and job.val_curve == [(2, 2.7)]
    assert job.config == {"trainer": {"max_steps": 2}}


# ---------------------------------------------------------------- presets and sweepers

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from tfx.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _group_choices(path):
    """(group, option) pairs a preset (or a variant file it sweeps over) needs."""
    cfg = yaml.safe_load(path.read_text()) or {}
    needs = []
    for entry in cfg.get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                group = key.replace("override ", "").strip("/ ")
                if not group.startswith("hydra") and value:
                    needs.append((group, value))
    params = (((cfg.get("hydra") or {}).get("sweeper") or {}).get("params") or {})
    for key, values in params.items():
        group = key.lstrip("+")
        if (CONF / group).is_dir() and "(" not in str(values):
            for value in str(values).split(","):
                needs += [(group, value)] + _group_choices(CONF / group / f"{value}.yaml") \
                    if group.startswith("experiment/") else [(group, value)]
    return needs


def _missing(preset):
    return [f"{g}/{v}" for g, v in _group_choices(CONF / "experiment" / f"{preset}.yaml")
            if not (CONF / g / f"{v}.yaml").is_file()]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_every_job(preset):
    from tfx.config import build_techniques

    missing = _missing(preset)
    if missing:
        pytest.skip(f"needs config options not on this branch: {missing}")
    cfg = _compose([f"experiment={preset}"])
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.hydra.sweeper.params
    assert preset in cfg.hydra.sweep.dir
    params = {k: str(v) for k, v in cfg.hydra.sweeper.params.items()}
    if "optuna" in cfg.hydra.sweeper._target_:
        assert cfg.hydra.sweeper.direction == "minimize"
        return
    for combo in itertools.product(*(v.split(",") for v in params.values())):
        job = _compose([f"experiment={preset}"] + [f"{k}={v}" for k, v in zip(params, combo)])
        assert job.seed == cfg.seed and job.trainer.max_steps == cfg.trainer.max_steps
        build_techniques(job)  # keys checked against the technique constructors


def test_launcher_and_sweeper_configs_compose():
    cfg = _compose(["hydra/launcher=tfx_joblib", "hydra/sweeper=tfx_optuna"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "minimize"


@pytest.mark.skipif(not os.environ.get("TFX_SLOW_TESTS"), reason="set TFX_SLOW_TESTS=1 (about a minute on 2 cores)")
def test_optuna_lr_search_tiny_run(tmp_path):
    _train(["experiment=lr_search", "hydra.sweeper.n_trials=2", *TINY, f"hydra.sweep.dir={tmp_path / 'opt'}"], tmp_path)
    assert yaml.safe_load((tmp_path / "opt" / "optimization_results.yaml").read_text())["best_params"]
    assert len(load_sweep(tmp_path / "opt")) == 2
