"""``python train.py parallel=ddp`` on one machine: start the workers ourselves.

Uses torch's elastic launcher API (what ``torchrun`` runs), so workers get the same
environment (RANK, WORLD_SIZE, MASTER_ADDR ...) as under torchrun and the agent's
failure handling: when one worker dies the agent stops the others and raises
``ChildFailedError``, which we turn into one message naming the rank and its error.

Workers receive the composed, resolved config as YAML and never re-enter Hydra, so
all ranks write to rank 0's Hydra run directory. Under ``torchrun`` (or any launcher
that sets ``TORCHELASTIC_RUN_ID`` / ``WORLD_SIZE``) nothing is launched.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.utils.distributed import get_free_port
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from tfx.config import build_loop, build_techniques, check_choices, model_spec
from tfx.core import Pipeline, Plan, distributed
from tfx.parallel.base import ParallelTechnique, default_nproc
from tfx.train.build import resolve_device
from tfx.train.run import train


def under_launcher() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ


def requested_workers(cfg: DictConfig) -> int:
    """Workers the ``parallel`` group asks for (1 for ``single``)."""
    node = cfg.get("parallel")
    if not node:
        return 1
    # one technique (ddp.yaml) or several under one option (fsdp_tp.yaml: tp + fsdp)
    targets = [node] if "_target_" in node else [v for v in node.values()
                                                 if isinstance(v, DictConfig) and "_target_" in v]
    if not any(issubclass(get_class(t._target_), ParallelTechnique) for t in targets):
        return 1
    return int(node.get("nproc_per_node") or default_nproc())


def needs_launch(cfg: DictConfig) -> bool:
    return not under_launcher() and requested_workers(cfg) > 1


def rank0_run_dir(cfg: DictConfig, run_dir: Path) -> Path:
    """Under torchrun every rank composed its own Hydra config, and ``${now:...}`` in
    the run directory can differ by a second between ranks: use rank 0's."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return Path(run_dir)
    distributed.init_distributed(resolve_device(cfg.trainer.device))
    box = [str(run_dir)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def check_plan(cfg: DictConfig, world_size: int) -> None:
    """Validate the technique combination for ``world_size`` ranks before spawning,
    so a bad combination is one message from the parent, not one per worker."""
    check_choices(cfg)
    loop = build_loop(cfg)
    techniques = build_techniques(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = Plan(techniques, world_size=world_size, device_type=device, accum_steps=loop.accum_steps,
                model=model_spec(cfg), max_steps=loop.max_steps, batch_size=loop.batch_size)
    Pipeline(techniques).validate(plan)
    plan.facts()


def _worker(cfg_yaml: str, run_dir: str, run_name: Optional[str], group: Optional[str]) -> Dict[str, Any]:
    """Entry point of every worker process (module level so ``spawn`` can pickle it)."""
    cfg = OmegaConf.create(cfg_yaml)
    summary = train(cfg, run_dir, run_name=run_name, group=group)
    # Only on success: after an error the process exits at once, so it is the first
    # failure the agent sees (tearing the group down first would let a peer fail
    # with "connection closed" before the real error is recorded).
    distributed.destroy()
    return summary


def launch(cfg: DictConfig, run_dir, run_name: Optional[str] = None, group: Optional[str] = None,
           nproc: Optional[int] = None, monitor_interval: float = 0.1) -> Dict[str, Any]:
    """Run the job on ``nproc`` local workers; return rank 0's summary.

    Raises :class:`WorkerFailed` naming the first failed rank and its error.
    """
    nproc = nproc or requested_workers(cfg)
    check_plan(cfg, nproc)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex[:12],
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{get_free_port()}",
                          max_restarts=0, monitor_interval=monitor_interval, start_method="spawn")
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    with _threads_per_worker(nproc):
        try:
            results = elastic_launch(config, _worker)(cfg_yaml, str(run_dir), run_name, group)
        except ChildFailedError as err:
            raise WorkerFailed.from_child_failure(err) from None
    return results[0]


class WorkerFailed(RuntimeError):
    """A worker exited with an error; ``rank`` and ``message`` say which and why."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"worker rank {rank} failed: {message}")
        self.rank, self.message = rank, message

    @classmethod
    def from_child_failure(cls, err) -> "WorkerFailed":
        """The root cause: the earliest failure; within the same second (error-file
        timestamps are whole seconds) one that is not a peer noticing the crash."""
        rank, failure = min(err.failures.items(),
                            key=lambda kv: (kv[1].timestamp, _is_peer_symptom(_message(kv[1])), kv[0]))
        msg = _message(failure) or f"exit code {failure.exitcode} (see its output above)"
        lines = msg.strip().splitlines() or [""]
        return cls(rank, lines[0][:500] + (" ..." if len(lines) > 1 or len(lines[0]) > 500 else ""))


#: How a rank reports that *another* rank died (gloo, NCCL, the c10d store).
_PEER_SYMPTOMS = ("closed by peer", "remote worker", "reset by peer", "Broken pipe", "aborted",
                  "timed out", "Timeout")


def _message(failure) -> str:
    msg = failure.message
    if isinstance(msg, dict):  # error file: {"message": ..., "extraInfo": ...}
        msg = msg.get("message", "")
    return "" if msg in (None, "<N/A>", "<NONE>") else str(msg)


def _is_peer_symptom(message: str) -> bool:
    return any(s in message for s in _PEER_SYMPTOMS)


class _threads_per_worker:
    """Share the CPU cores between workers (torchrun does the same via OMP_NUM_THREADS)."""

    def __init__(self, nproc: int) -> None:
        self.nproc, self.saved = nproc, None

    def __enter__(self):
        self.saved = os.environ.get("OMP_NUM_THREADS")
        if self.saved is None:
            os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.nproc))

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
