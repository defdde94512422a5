"""Weights & Biases logging on rank 0.

Online when an API key is configured (``WANDB_API_KEY`` or a ``wandb login``
netrc entry), offline otherwise so ``wandb sync <run_dir>/wandb/offline-run-*``
uploads later; ``logger=none`` switches it off. Choosing the mode explicitly
matters: W&B with no key and no mode raises instead of falling back.
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from tfx.log.metrics import export_bytes


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def wandb_mode(mode: str = "auto") -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode == "auto":
        return "online" if _has_api_key() else "offline"
    return mode


class WandbLogger:
    """Thin wrapper so the trainer never imports wandb when logging is off."""

    def __init__(self, run_dir: Path, project: str, name: str, group: Optional[str],
                 tags: List[str], config: Dict[str, Any], mode: str = "auto",
                 entity: Optional[str] = None, resume_id: Optional[str] = None) -> None:
        import wandb

        self._wandb = wandb
        self.mode = wandb_mode(mode)
        # W&B's own banner, sync hints and warnings are ~30 lines per job; say the one
        # thing a user needs (where the run is) in one line instead. Errors still show.
        settings = wandb.Settings(silent=True, show_warnings=False, show_info=False)
        self.run = wandb.init(project=project, entity=entity, name=name, group=group, tags=tags,
                              config=config, dir=str(run_dir), mode=self.mode,
                              id=resume_id, resume="allow" if resume_id else None,
                              reinit="finish_previous", settings=settings)
        print(self.where())
        # Summary columns the report also shows: compare runs in the W&B table directly.
        for key, summary in (("val/loss", "min"), ("val/ppl", "min"), ("val/bpb", "min"),
                             ("train/tokens_per_sec", "mean")):
            self.run.define_metric(key, summary=summary)

    @property
    def run_id(self) -> str:
        return self.run.id

    def where(self) -> str:
        """One line: the run's URL online, the sync command offline."""
        if self.mode == "online":
            return f"wandb: {self.run.url}"
        if self.mode == "offline":
            return f"wandb: offline; upload later with: wandb sync {self.run.settings.sync_dir}"
        return f"wandb: {self.mode}"

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: Dict[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v
        # The report's "export MB" column (smallest compressed artefact), so the W&B runs
        # table can show the same columns: val_ppl, tokens_per_sec, peak_mem_mb, params, export_mb.
        size = export_bytes(values)
        if size is not None:
            self.run.summary["export_mb"] = size / 2 ** 20

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
