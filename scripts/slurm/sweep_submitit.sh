#!/bin/bash
# A Hydra sweep where every job is one Slurm job on one node (hydra-submitit-launcher).
# Inside each job train.py starts one worker per GPU itself for parallel modes.
#   bash scripts/slurm/sweep_submitit.sh
set -euo pipefail
python train.py -m hydra/launcher=submitit_slurm \
  hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=8 hydra.launcher.timeout_min=240 \
  parallel=single,ddp,fsdp precision=bf16 model=gpt2 trainer.max_steps=5000 "$@"
