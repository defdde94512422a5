from tfx.ckpt.checkpoint import (CKPT_GLOB, capture_rng, checkpoint_step, clean_stale_temps,
                                 latest_checkpoint, load_checkpoint, prune_checkpoints, restore_rng,
                                 save_checkpoint)
from tfx.ckpt.lock import RunDirLock, RunLockedError
from tfx.ckpt.manager import CheckpointManager, RNGState, Stateful
from tfx.ckpt.run import (find_checkpoint, load_run, load_run_with_meta, load_weights_from_run,
                          reapply_surgery, resolve_and_load, resolve_resume, saved_structure)

__all__ = ["CKPT_GLOB", "CheckpointManager", "RNGState", "RunDirLock", "RunLockedError", "Stateful",
           "capture_rng", "checkpoint_step", "clean_stale_temps", "find_checkpoint", "latest_checkpoint",
           "load_checkpoint", "load_run", "load_run_with_meta", "load_weights_from_run",
           "prune_checkpoints", "reapply_surgery", "resolve_and_load", "resolve_resume", "restore_rng", "save_checkpoint",
           "saved_structure"]
