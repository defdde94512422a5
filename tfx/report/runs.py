"""Read the jobs of a Hydra multirun directory into plain records.

A job is any sub-directory holding ``.hydra/overrides.yaml`` (Hydra writes it
before the task starts, so crashed jobs are found too). ``summary.json`` and
``metrics.jsonl`` come from ``tfx.train.run.train``; ``eval.json`` from
``evaluate.py``; ``.hydra/config.yaml`` (the composed config) lets the report check that
the jobs share their data, steps and model. Nothing here needs Hydra or W&B.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from tfx.core.errors import TfxError

SEED_KEYS = ("seed", "+seed", "++seed")


class ReportError(TfxError):
    """The directory cannot be reported on (missing, empty, not a multirun)."""


@dataclass
class JobRecord:
    """One training job: its overrides and whatever results it left behind."""
    name: str                       # job sub-directory (Hydra job number) or W&B run id
    overrides: List[str]
    summary: Optional[Dict[str, Any]] = None
    eval: Optional[Dict[str, Any]] = None
    curve: List[tuple] = field(default_factory=list)   # (step, train/loss)
    val_curve: List[tuple] = field(default_factory=list)   # (step, val/loss)
    config: Optional[Dict[str, Any]] = None   # the composed config (.hydra/config.yaml), if known
    missing_reason: str = "no summary.json (crashed, killed or still running)"

    @property
    def seed(self) -> Optional[str]:
        return next((o.split("=", 1)[1] for o in self.overrides if o.split("=", 1)[0] in SEED_KEYS), None)

    @property
    def variant_overrides(self) -> List[str]:
        """The overrides that define the variant: all but the seed."""
        return [o for o in self.overrides if o.split("=", 1)[0] not in SEED_KEYS]

    @property
    def failure(self) -> Optional[str]:
        """Why this job cannot count as a result, or None when it finished."""
        s = self.summary
        if s is None:
            return self.missing_reason
        if s.get("stopped_early"):
            return f"stopped early: {s['stopped_early']}"
        step, max_steps = s.get("step"), s.get("max_steps")
        if step is not None and max_steps is not None and step < max_steps:
            return f"incomplete: step {step} of {max_steps}"
        return None


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # half-written: treated like a missing file, reported as a failure


def read_curves(path: Path, keys=("train/loss", "val/loss")) -> Dict[str, List[tuple]]:
    """``{key: [(step, value), ...]}`` from a ``metrics.jsonl`` (empty lists when absent)."""
    curves: Dict[str, List[tuple]] = {k: [] for k in keys}
    if not path.is_file():
        return curves
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by a killed job
        if isinstance(row, dict) and "step" in row:
            for key in keys:
                if isinstance(row.get(key), (int, float)):
                    curves[key].append((row["step"], row[key]))
    return curves


def read_curve(path: Path, key: str = "train/loss") -> List[tuple]:
    return read_curves(path, (key,))[key]


def _read_yaml(path: Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def read_job(job_dir: Path) -> JobRecord:
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    curves = read_curves(job_dir / "metrics.jsonl")
    return JobRecord(name=job_dir.name, overrides=[str(o) for o in overrides],
                     summary=_read_json(job_dir / "summary.json"),
                     eval=_read_json(job_dir / "eval.json"),
                     curve=curves["train/loss"], val_curve=curves["val/loss"],
                     config=_read_yaml(job_dir / ".hydra" / "config.yaml"))


def _job_order(path: Path):
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def find_job_dirs(sweep_dir: Path) -> List[Path]:
    """Job directories under ``sweep_dir`` (any depth: custom ``hydra.sweep.subdir`` too)."""
    found = [p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")]
    return sorted({p for p in found if p != sweep_dir}, key=_job_order)


def load_sweep(sweep_dir) -> List[JobRecord]:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir} is not a directory; pass a multirun sweep dir "
                          f"such as multirun/2026-01-01/12-00-00")
    jobs = [read_job(d) for d in find_job_dirs(sweep_dir)]
    if not jobs:
        hint = (" (this looks like a single run: report on a multirun, i.e. `python train.py -m ...`)"
                if (sweep_dir / ".hydra").is_dir() else "")
        raise ReportError(f"no Hydra jobs (*/.hydra/overrides.yaml) under {sweep_dir}{hint}")
    return jobs


def optuna_note(sweep_dir) -> Optional[str]:
    """The best trial of an Optuna sweep (hydra-optuna-sweeper's optimization_results.yaml)."""
    path = Path(sweep_dir) / "optimization_results.yaml"
    if not path.is_file():
        return None
    res = yaml.safe_load(path.read_text()) or {}
    params = " ".join(f"{k}={v}" for k, v in (res.get("best_params") or {}).items())
    value = res.get("best_value", res.get("best_values"))
    return f"Optuna best trial: `{params}` (objective, final val loss: {value})"
