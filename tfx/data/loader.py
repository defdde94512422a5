"""Batches of blocks for training (shuffled, infinite, resumable, rank-sliced)
and evaluation (in order, finite).

Written here rather than with ``torch.utils.data.DataLoader`` + ``DistributedSampler``
because an exact O(1) mid-epoch resume and the "one process with batch B*W sees what
W ranks with batch B see" guarantee are both one line each with a plain index
permutation, and a memmap slice needs no worker processes.
"""
from __future__ import annotations

from typing import Iterator

import torch

from tfx.core.errors import DataError
from tfx.data.blocks import TokenBlocks


class BlockLoader:
    """Infinite iterator of batches. Epoch ``e`` visits blocks in the order of
    ``randperm(seed + e)``; each global step takes the next ``batch_size * world_size``
    indices and rank ``r`` keeps slice ``[r*batch_size, (r+1)*batch_size)``. The
    incomplete global batch at an epoch's end is dropped so all ranks stay in step."""

    def __init__(self, blocks: TokenBlocks, batch_size: int, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.blocks, self.batch_size, self.seed, self.shuffle = blocks, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = len(blocks) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"split has {len(blocks)} blocks of {blocks.seq_len} tokens, fewer "
                            f"than one global batch of {self.global_batch}; lower "
                            f"batch_size or data.seq_len, or use more data")
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, None

    def _epoch_order(self) -> torch.Tensor:
        # Recomputed from (seed, epoch) alone: this is what makes resume O(1).
        if self._order_epoch != self.epoch:
            n = len(self.blocks)
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> "BlockLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.global_batch + self.rank * self.batch_size
        indices = self._epoch_order()[start:start + self.batch_size]
        self.position += 1
        return self.blocks.get_batch(indices)

    def state_dict(self) -> dict[str, int]:
        """Where the next batch comes from; the same on every rank."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def eval_batches(blocks: TokenBlocks, batch_size: int,
                 max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Blocks in order, the last batch possibly smaller; the same every call."""
    n = len(blocks)
    for b, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        yield blocks.get_batch(range(start, min(start + batch_size, n)))
