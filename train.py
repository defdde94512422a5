"""Train one GPT with the techniques chosen on the command line.

    python train.py                                   # default: small GPT on Shakespeare, CPU ok
    python train.py precision=bf16 memory=activation_ckpt
    python train.py -m precision=fp32,bf16            # Hydra multirun sweep
    python train.py parallel=ddp                      # spawns its own worker processes

All logic lives in the ``tfx`` package; this file only hands Hydra's config over.
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from tfx.cli import preflight, train_job
from tfx.config import register_configs

register_configs()


@hydra.main(version_base=None, config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return train_job(cfg)  # validation loss: the objective for Hydra sweepers (Optuna)


if __name__ == "__main__":
    preflight(sys.argv[1:], Path(__file__).resolve().parent / "conf")  # one line, not a traceback
    main()
