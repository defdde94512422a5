"""Parallel training: DDP, FSDP2, tensor/sequence parallel, pipeline parallel, 2-D
FSDP+TP and gradient-communication hooks. The self-launcher that lets
``python train.py parallel=ddp`` start its own workers sits with the entry points
(:mod:`tfx.launch`).

Each mode is a :class:`tfx.core.Technique`; the functions (``apply_ddp``,
``apply_fsdp``, ``apply_tp`` ...) work without the pipeline or Hydra.
"""
from tfx.parallel.base import ParallelTechnique, default_nproc
from tfx.parallel.comm_meter import CommMeter
from tfx.parallel.ddp import DDP, apply_ddp
from tfx.parallel.fsdp import FSDP, apply_fsdp, mixed_precision_policy
from tfx.parallel.pp import PipelineParallel
from tfx.parallel.tp import TensorParallel, apply_tp

__all__ = ["CommMeter", "DDP", "FSDP", "ParallelTechnique", "PipelineParallel", "TensorParallel", "apply_ddp",
           "apply_fsdp", "apply_tp", "default_nproc", "mixed_precision_policy"]
