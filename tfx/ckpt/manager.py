"""One checkpoint of many stateful parts, saved together and loaded once.

In the spirit of torchtitan's ``CheckpointManager`` and DCP's ``Stateful`` protocol:
every part that must survive a resume (scheduler, data position, RNG, loop counters,
each technique through the pipeline) is registered under a key and has
``state_dict()``/``load_state_dict()``. The model's and optimizer's tensors are the
one special part: a single process writes them into the ``.pt`` file, several ranks
write their shards through ``torch.distributed.checkpoint`` (which reshards on load).

The build order calls :meth:`CheckpointManager.load` exactly once, after every
technique was applied to the model and the optimizer exists, so no part ever has to
hold state "until the thing it belongs to is built".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Protocol, runtime_checkable

from torch import nn

from tfx.ckpt.checkpoint import capture_rng, prune_checkpoints, restore_rng, save_checkpoint
from tfx.ckpt.sharded import load_full_into, load_sharded, save_sharded
from tfx.core.errors import CheckpointError


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


class RNGState:
    """Python, NumPy, torch (and CUDA) generators as one stateful part."""

    def state_dict(self) -> Dict[str, Any]:
        return capture_rng()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        restore_rng(state)


class CheckpointManager:
    """Save and load ``model`` + ``optimizer`` + the registered ``parts``.

    ``meta`` (config, vocabulary, technique order and structure ...) is written with
    every checkpoint but is not loaded back into anything: the build order reads it
    before building (to re-apply techniques and check the run matches).
    """

    def __init__(self, ckpt_dir: Path, model: nn.Module, optimizer, parts: Mapping[str, Stateful],
                 meta: Optional[Dict[str, Any]] = None, keep_last: int = 2,
                 distributed: bool = False, is_main: bool = True) -> None:
        self.ckpt_dir, self.model, self.optimizer = Path(ckpt_dir), model, optimizer
        self.parts = dict(parts)
        self.meta = dict(meta or {})
        self.keep_last, self.distributed, self.is_main = keep_last, distributed, is_main
        self.last: Optional[Path] = None

    def state(self, tensors: bool = True) -> Dict[str, Any]:
        """Everything a resume needs; ``tensors=False`` leaves out model and optimizer
        (a sharded checkpoint stores those through DCP)."""
        out = {key: part.state_dict() for key, part in self.parts.items()}
        out.update(self.meta)
        if tensors:
            out.update(model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
        return out

    def save(self, step: int) -> Optional[Path]:
        """Collective under several ranks (each writes its shards); returns the path on rank 0."""
        if self.distributed:
            path = save_sharded(self.model, self.optimizer, {"step": step, **self.state(tensors=False)},
                                self.ckpt_dir, step)
        elif self.is_main:
            path = save_checkpoint({"step": step, **self.state()}, self.ckpt_dir, step)
        if not self.is_main:
            return None
        self.last = path
        prune_checkpoints(self.ckpt_dir, self.keep_last)
        return path

    def load(self, state: Dict[str, Any]) -> None:
        """Restore tensors, then every part from its key, each exactly once."""
        self._load_tensors(state)
        for key, part in self.parts.items():
            if key not in state:
                raise CheckpointError(f"checkpoint has no {key!r} state; it was written by another "
                                      f"tfx version: start fresh with resume=never")
            part.load_state_dict(state[key])

    def _load_tensors(self, state: Dict[str, Any]) -> None:
        try:
            if "sharded" in state:  # DCP reshards to this run's layout, any world size
                load_sharded(self.model, self.optimizer, Path(state["sharded"]))
            elif self.distributed:  # a single-process checkpoint continued on several ranks
                load_full_into(self.model, self.optimizer, state)
            else:
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint weights do not fit this run's model or optimizer "
                                  f"({str(err).splitlines()[0][:300]}); resume with the same "
                                  f"model and optim settings, or start fresh with resume=never") from err
