"""Shared, read-only facts about the run that techniques need."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class RunContext:
    """Where and how the run executes. Built once, never mutated.

    ``mesh`` is a ``torch.distributed.DeviceMesh`` when a parallel technique made one;
    ``autocast_dtype`` is the compute dtype chosen by the precision group (None = fp32).
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    run_dir: Optional[Path] = None
    autocast_dtype: Optional[torch.dtype] = None
    mesh: Any = None
    seed: int = 0
    # data-parallel coordinates (differ from rank/world_size under TP/PP meshes)
    dp_rank: int = 0
    dp_size: int = 1
    vocab_size: Optional[int] = None
    tokenizer_id: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class StepInfo:
    """Position inside the optimisation: ``step`` counts optimizer steps already taken."""

    step: int
    micro_step: int = 0
    accum_steps: int = 1

    @property
    def is_last_micro(self) -> bool:
        return self.micro_step == self.accum_steps - 1
