"""Fixed-length training blocks over a flat token stream."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class TokenBlocks:
    """Block ``i`` is tokens ``[i*seq_len, i*seq_len + seq_len + 1)``: ``seq_len``
    inputs and, shifted by one, their targets. Blocks overlap by the one token that
    is the last target of block ``i`` and the first input of block ``i+1``, so every
    token is predicted exactly once and nothing is padded."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def block(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} out of range for {len(self)} blocks")
        start = i * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"input_ids", "labels"}``, both LongTensor (B, seq_len)."""
        rows = torch.from_numpy(np.stack([self.block(int(i)) for i in indices]))
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}

    def __repr__(self) -> str:
        return f"TokenBlocks({len(self)} blocks x {self.seq_len}, {self.n_tokens:,} tokens)"
