"""Checkpoints of multi-process runs through ``torch.distributed.checkpoint`` (DCP).

A sharded checkpoint is a directory ``step_XXXXXXXX.dcp`` holding DCP's files (every
rank writes its own shards of the model and optimizer, keyed by fully-qualified
parameter names, so any other layout -- another world size, FSDP vs TP vs a single
process -- can load it: DCP reshards on load) plus ``meta.pt`` with everything
that is not a tensor shard (step, scheduler, loader, RNG, config), written by rank 0.

"Complete or invisible": all ranks write into ``.step_XXXXXXXX.dcp.tmp``; only
after every rank has finished does rank 0 rename it to the final name, and
:func:`tfx.ckpt.list_checkpoints` never matches the temporary name.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict,
                                                     set_state_dict)

from tfx.core.distributed import barrier as _barrier
from tfx.core.distributed import is_main_process as _is_main
from tfx.core.errors import CheckpointError

META = "meta.pt"


def sharded_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.dcp"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_sharded(model: nn.Module, optimizer, meta: Dict[str, Any], ckpt_dir: Path, step: int) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    final = sharded_path(ckpt_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if _is_main():
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    if _is_main():
        with open(tmp / META, "wb") as f:
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
    _barrier()  # every rank's shards are on disk
    if _is_main():
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(final.parent)
    _barrier()
    return final


def load_meta(path: Path) -> Dict[str, Any]:
    meta_file = Path(path) / META
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a complete sharded checkpoint (no {META})")
    return torch.load(meta_file, map_location="cpu", weights_only=False)


def load_sharded(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], path: Path) -> None:
    """Load model (and optimizer) state in place, resharding to this run's layout.
    Works with or without a process group (one process loads everything)."""
    if optimizer is None:
        model_sd, _ = get_state_dict(model, [])
        dcp.load({"model": model_sd}, checkpoint_id=str(path))
        set_model_state_dict(model, model_sd)
        return
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full_into(model: nn.Module, optimizer, state: Dict[str, Any]) -> None:
    """Load a single-process checkpoint (``step_*.pt``) into a sharded or replicated
    model: the full tensors are sliced locally to each rank's shards."""
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=opts)
    if optimizer is not None and "optimizer" in state:
        set_optimizer_state_dict(model, optimizer, _fqn_optimizer_state(model, optimizer, state["optimizer"]),
                                 options=opts)


_WRAPPERS = ("module.", "_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _fqn(name: str) -> str:
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def _fqn_optimizer_state(model: nn.Module, optimizer, saved: Dict[str, Any]) -> Dict[str, Any]:
    """``optimizer.state_dict()`` keys parameters by position; DCP's full optimizer
    state keys them by name. Positions match because both optimizers were built
    from ``model.parameters()`` in the same order."""
    names = {id(p): _fqn(n) for n, p in model.named_parameters()}
    out = {"state": {}, "param_groups": []}
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        fqns = [names[id(p)] for p in group["params"]]
        for fqn, idx in zip(fqns, saved_group["params"]):
            if idx in saved["state"]:
                out["state"][fqn] = saved["state"][idx]
        out["param_groups"].append({**saved_group, "params": fqns})
    return out
