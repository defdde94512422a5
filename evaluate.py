"""Evaluate a finished (or interrupted) run, or a pretrained model: quality, speed and size.

    python evaluate.py run=outputs/2026-11-23/12-00-00      # -> <run>/eval.json
    python evaluate.py model=smollm2 data=shakespeare       # the pretrained model as it is
    python evaluate.py run=... out=/somewhere/writable      # eval.json elsewhere

Shows a progress bar over the evaluation batches (on a terminal), writes ``eval.json``
(into the run directory, or Hydra's output directory for a pretrained model, or
``out``) and prints a summary: loss, perplexity, bits per byte and tokens per split,
inference speed, size, time. Bad input ends in one ``error:`` line, exit 2, before
anything is written.
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from tfx.cli import evaluate_job, evaluate_preflight
from tfx.config import register_configs

register_configs()  # conf/model/*.yaml of tfx's GPT build on the registered schema


@hydra.main(version_base=None, config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate_job(cfg)


if __name__ == "__main__":
    evaluate_preflight(sys.argv[1:], Path(__file__).resolve().parent / "conf")  # one line, not a traceback
    main()
