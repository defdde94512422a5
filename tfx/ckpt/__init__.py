from tfx.ckpt.checkpoint import (CKPT_GLOB, capture_rng, checkpoint_step, latest_checkpoint,
                                 load_checkpoint, prune_checkpoints, restore_rng,
                                 save_checkpoint)
from tfx.ckpt.run import load_run, resolve_resume

__all__ = ["CKPT_GLOB", "capture_rng", "checkpoint_step", "latest_checkpoint", "load_checkpoint",
           "load_run", "prune_checkpoints", "resolve_resume", "restore_rng", "save_checkpoint"]
