"""Evaluate a finished (or interrupted) run, or a pretrained model: quality, speed and size.

    python evaluate.py run=outputs/2026-11-23/12-00-00      # -> <run>/eval.json
    python evaluate.py model=smollm2 data=shakespeare       # the pretrained model as it is

Writes ``eval.json`` (into the run directory, or Hydra's output directory for a
pretrained model) and prints the numbers.
"""
import hydra
from omegaconf import DictConfig

from tfx.cli import evaluate_job
from tfx.config import register_configs

register_configs()  # conf/model/*.yaml of tfx's GPT build on the registered schema


@hydra.main(version_base=None, config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate_job(cfg)


if __name__ == "__main__":
    main()
