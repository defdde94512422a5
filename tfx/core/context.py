"""Shared, read-only facts about the run that techniques need."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch


@dataclass(frozen=True)
class Facts:
    """What the chosen techniques declared (see the fields of :class:`Technique`),
    gathered once by :meth:`tfx.core.Plan.facts`. Hooks read these instead of looking
    for other techniques by class."""

    compute_dtype: Optional[torch.dtype] = None   # autocast dtype; None = fp32
    skips_nonfinite: bool = False                 # the scaler skips non-finite steps itself
    data_parallel: Optional[str] = None           # "ddp" | "fsdp" | None
    shards_parameters: bool = False               # parameters are sharded DTensors
    needs_single_ddp_bucket: bool = False         # PowerSGD on gloo
    has_unused_parameters: bool = False           # DDP find_unused_parameters
    needs_hidden: bool = False                    # the loss needs the final hidden state
    from_checkpoint: Optional[str] = None         # trained weights to start from


@dataclass(frozen=True)
class RunContext:
    """Where and how the run executes. Built once, never mutated.

    ``mesh`` is a ``torch.distributed.DeviceMesh`` when a parallel technique made one.
    ``resuming`` is True when a checkpoint's weights and states will be loaded after
    every technique was applied (a resume, ``load_run``, evaluate.py); ``structure``
    then holds the structural decisions the checkpoint recorded, per technique key.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    run_dir: Optional[Path] = None
    facts: Facts = field(default_factory=Facts)
    mesh: Any = None
    seed: int = 0
    # data-parallel coordinates (differ from rank/world_size under TP/PP meshes)
    dp_rank: int = 0
    dp_size: int = 1
    vocab_size: Optional[int] = None
    tokenizer_id: Optional[str] = None
    resuming: bool = False
    structure: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: the train split (``tfx.data.TokenBlocks``): calibration data for one-shot methods
    train_data: Any = None
    #: ``trainer.max_steps`` (None outside training): fraction schedules resolve against it
    max_steps: Optional[int] = None

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return self.facts.compute_dtype

    def structure_of(self, technique) -> Mapping[str, Any]:
        """The structural decisions a checkpoint recorded for ``technique`` ({} if none)."""
        return self.structure.get(technique.key, {})

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
