"""Local metrics files, written on rank 0 whatever the W&B setting:
``metrics.jsonl`` (one JSON object per logged step or evaluation) and
``summary.json`` (the final numbers a report compares)."""
from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch


_STATUS = Path("/proc/self/status")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: several Hydra jobs can share one process (multirun), and
    ``ru_maxrss`` never goes down. On Linux, writing 5 to ``/proc/self/clear_refs``
    resets the process's peak RSS (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not permitted: the peak then covers the whole process


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since :func:`reset_peak_memory`: max allocated on CUDA, peak RSS
    (VmHWM) on CPU; ``ru_maxrss`` (whole process lifetime) where /proc is missing."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    def __init__(self, run_dir: Optional[Path], enabled: bool = True) -> None:
        self.enabled = enabled and run_dir is not None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._file = None
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # append: a resumed run continues the same history
            self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        if self._file is not None:
            row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
            self._file.write(json.dumps(row) + "\n")

    def write_summary(self, summary: Dict[str, Any], name: str = "summary.json") -> None:
        if self.enabled:
            data = {k: _jsonable(v) for k, v in summary.items()}
            tmp = self.run_dir / f".{name}.tmp"
            tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
            tmp.replace(self.run_dir / name)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


EXPORT_SIZE_KEYS = ("bytes", "sparse_bytes")   # last segment of a compression export's size key


def export_bytes(summary: Optional[Dict]) -> Optional[float]:
    """Smallest artefact a compression technique exported (``prune/sparse_bytes``,
    ``ptq/int8_dynamic/bytes``, ``compressed_export/bytes``); not ``*/dense_bytes`` nor
    the ``mem/*_bytes`` and ``comm/*`` measurements of parallel runs."""
    sizes = [v for k, v in (summary or {}).items()
             if "/" in k and k.rsplit("/", 1)[1] in EXPORT_SIZE_KEYS
             and k.split("/", 1)[0] not in ("mem", "comm") and isinstance(v, (int, float))]
    return min(sizes) if sizes else None
