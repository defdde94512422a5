"""Process-group setup for runs started by torchrun or by tfx's own launcher."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun environment (1 process if unset)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def init_distributed(device: torch.device, timeout_s: int = 300) -> None:
    """Join the process group if launched with several processes: NCCL on GPUs, gloo on
    CPU. A finite timeout turns a dead peer into an error instead of a hang."""
    _, _, world = env_world()
    if world <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)


def dp_coords(mesh, rank: int, world: int) -> tuple[int, int]:
    """(dp_rank, dp_size): the mesh's ``"dp"`` dimension if it has one; without a mesh
    every rank is a replica; a mesh without ``"dp"`` (TP, PP) has one replica."""
    if mesh is None:
        return rank, world
    if "dp" in (mesh.mesh_dim_names or ()):
        return mesh["dp"].get_local_rank(), mesh["dp"].size()
    return 0, 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_main_process() -> bool:
    """Rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
