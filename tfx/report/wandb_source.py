"""Read a sweep's runs back from W&B (public API) as :class:`JobRecord` s.

The run name is Hydra's ``override_dirname`` (see ``tfx/cli.py``), so the
overrides are recovered from it; the W&B group is the sweep directory. Needs
network and an API key: offline runs must be uploaded with ``wandb sync`` first
(or reported on from their local multirun directory instead).
"""
from __future__ import annotations

from typing import List, Optional

from tfx.report.runs import JobRecord, ReportError
from tfx.log.wandb_logger import wandb_mode


def split_override_dirname(name: str) -> List[str]:
    """``a=1,compression=[prune,distill],b=x`` -> ``['a=1', 'compression=[prune,distill]', 'b=x']``."""
    parts, depth, current = [], 0, ""
    for ch in name:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p for p in parts + [current] if p and p != "default"]


def _api():
    if wandb_mode("auto") != "online":
        raise ReportError("--wandb needs W&B online (an API key from `wandb login` or WANDB_API_KEY, and "
                          "WANDB_MODE not 'offline'); upload offline runs with `wandb sync "
                          "<run dir>/wandb/offline-run-*` first, or report on the local multirun directory")
    import wandb

    return wandb.Api()


def _record(run) -> JobRecord:
    summary = {k: v for k, v in run.summary.items() if not k.startswith("_")}
    curves = {key: [(row["_step"], row[key]) for row in run.scan_history(keys=["_step", key])]
              for key in ("train/loss", "val/loss")}
    finished = run.state == "finished"
    config = dict(run.config) if isinstance(getattr(run, "config", None), dict) else None
    return JobRecord(name=run.id, overrides=split_override_dirname(run.name),
                     summary=summary if finished and "val_ppl" in summary else None,
                     curve=curves["train/loss"], val_curve=curves["val/loss"], config=config,
                     missing_reason=f"W&B run state {run.state!r} without a final val_ppl")


def load_wandb(path: str, group: Optional[str] = None) -> List[JobRecord]:
    """Runs of ``entity/project`` (optionally only W&B group ``group``)."""
    if path.count("/") != 1:
        raise ReportError(f"--wandb expects entity/project, got {path!r}")
    filters = {"group": group} if group else {}
    try:
        runs = list(_api().runs(path, filters=filters))
    except ReportError:
        raise
    except Exception as err:  # network, auth, unknown project: say which
        raise ReportError(f"cannot read W&B runs of {path}: {err}") from err
    if not runs:
        raise ReportError(f"no W&B runs in {path}" + (f" with group {group!r}" if group else ""))
    return [_record(r) for r in runs]
