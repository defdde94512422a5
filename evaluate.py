"""Evaluate a finished (or interrupted) run: quality, speed and size.

    python evaluate.py run=outputs/2026-11-23/12-00-00

Writes ``eval.json`` into the run directory and prints the numbers.
"""
import hydra
from omegaconf import DictConfig

from tfx.cli import evaluate_job


@hydra.main(version_base=None, config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate_job(cfg)


if __name__ == "__main__":
    main()
