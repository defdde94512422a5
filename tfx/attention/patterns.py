"""Causal sparse attention patterns, each described three ways.

A pattern says which key ``j`` query ``i`` may attend to. Every pattern is causal
(``j <= i``) and contains the diagonal (``j == i``), so no query row is ever empty.
Each pattern gives:

* :meth:`Pattern.mask_mod` -- the FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``;
  written with tensor ops only (``&``, ``|``, comparisons) so FlexAttention can vmap
  and compile it. It is the single source of truth: the dense mask and the blocked
  kernel's per-tile masks are both evaluated from it.
* :meth:`Pattern.mask` -- the dense ``(T, T)`` boolean mask (True = attend), for the
  reference path and tests only.
* :meth:`Pattern.tile_mask` + :meth:`Pattern.columns` -- which work the blocked CPU
  kernel must do. ``tile_mask(n, tile)`` is the ``(n, n)`` tile-level mask: query
  tile ``a`` needs key tile ``b``. ``columns(T)`` are key positions that every later
  query may attend to (summary columns, global tokens); they are gathered once and
  shared by all query tiles instead of pulling in every key tile that holds one.

Both tile-level descriptions are computed analytically, in O((T / tile)^2) and
O(T) -- never from the dense mask, which would cost O(T^2).
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from tfx.core.errors import ConfigError


def _check_int(owner: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{owner}: {name}={value!r} is invalid; set attention.{name} "
                          f"to an integer >= {minimum}")


def _tile_bounds(n_tiles: int, tile: int, device=None):
    """First and last position of each tile, shaped for (query, key) broadcasting."""
    start = torch.arange(n_tiles, device=device) * tile
    return start[:, None], (start + tile - 1)[:, None], start[None, :], (start + tile - 1)[None, :]


class Pattern:
    """Base class; subclasses are frozen dataclasses (hashable, so layouts can be cached)."""

    name = "pattern"

    def mask_mod(self, b, h, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tile_mask(self, n_tiles: int, tile: int, device=None) -> torch.Tensor:
        """``(n, n)`` bool: query tile ``a`` needs key tile ``b`` (columns excluded)."""
        raise NotImplementedError

    def columns(self, seq_len: int, device=None) -> torch.Tensor:
        """Key positions any later query may attend to, shared by all query tiles."""
        return torch.zeros(0, dtype=torch.long, device=device)

    def mask(self, seq_len: int, device=None) -> torch.Tensor:
        """Dense ``(T, T)`` bool mask, True = attend. O(T^2): reference and tests only."""
        i = torch.arange(seq_len, device=device)
        return self.mask_mod(None, None, i[:, None], i[None, :])

    def density(self, seq_len: int, rows: int = 256) -> float:
        """Allowed (query, key) pairs over the T(T+1)/2 pairs of dense causal attention.

        Counted ``rows`` query rows at a time, so benchmarks at long T stay cheap.
        """
        kv = torch.arange(seq_len)[None, :]
        allowed = sum(int(self.mask_mod(None, None, torch.arange(i, min(i + rows, seq_len))[:, None], kv).sum())
                      for i in range(0, seq_len, rows))
        return allowed / (seq_len * (seq_len + 1) / 2)


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Causal sliding window (Longformer, Mistral): query ``i`` sees keys ``(i - window, i]``.

    ``window`` counts the query itself, so ``window=1`` is the diagonal only and
    ``window >= T`` is dense causal attention.
    """

    window: int
    name = "sliding_window"

    def __post_init__(self) -> None:
        _check_int("sliding_window", "window", self.window, 1)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < self.window)

    def tile_mask(self, n_tiles, tile, device=None):
        # i - j over a (query tile, key tile) rectangle takes every integer between
        # q_start - k_end and q_end - k_start; the band 0 <= i - j < window meets it
        # iff that range meets [0, window).
        q_start, q_end, k_start, k_end = _tile_bounds(n_tiles, tile, device)
        return (q_end - k_start >= 0) & (q_start - k_end < self.window)


@dataclass(frozen=True)
class FixedBlockSparse(Pattern):
    """Sparse Transformer "fixed" pattern (Child et al. 2019), causal, one summary column.

    Query ``i`` sees key ``j <= i`` when either

    * local:   ``j // block == i // block`` (same aligned block of ``block`` tokens), or
    * summary: ``j % stride == stride - 1`` (``j`` is the last position of its
      stride group, so it can carry a summary of that group to all later tokens).

    With ``stride == block`` this is the paper's fixed pattern with ``c = 1``.
    Density is about ``block / T + 1 / stride``: the summary term does not shrink
    with T, so the pattern stays O(T^2 / stride) and the saving is bounded by stride.
    """

    block: int
    stride: int
    name = "block_sparse"

    def __post_init__(self) -> None:
        _check_int("block_sparse", "block", self.block, 1)
        _check_int("block_sparse", "stride", self.stride, 1)

    def mask_mod(self, b, h, q_idx, kv_idx):
        local = (q_idx // self.block) == (kv_idx // self.block)
        summary = (kv_idx % self.stride) == (self.stride - 1)
        return (kv_idx <= q_idx) & (local | summary)

    def tile_mask(self, n_tiles, tile, device=None):
        # Local part only: tiles whose position ranges share a pattern block, causally.
        q_start, q_end, k_start, k_end = _tile_bounds(n_tiles, tile, device)
        b = self.block
        shares_block = (q_start // b <= k_end // b) & (k_start // b <= q_end // b)
        return shares_block & (k_start <= q_end)

    def columns(self, seq_len, device=None):
        return torch.arange(min(self.stride - 1, seq_len), seq_len, self.stride, device=device)


@dataclass(frozen=True)
class GlobalLocal(Pattern):
    """Global tokens plus a sliding window (BigBird / Longformer), under causality.

    The first ``n_global`` tokens are global: every later token attends to them, and
    they attend to every earlier token. Everyone else also sees the sliding window
    ``(i - window, i]``. Under causality a global query ``i < n_global`` only has
    earlier keys ``j <= i < n_global``, which are global columns anyway, so the
    global *rows* cost nothing extra; the term is kept in ``mask_mod`` to say what
    the pattern means.
    """

    window: int
    n_global: int
    name = "global_local"

    def __post_init__(self) -> None:
        _check_int("global_local", "window", self.window, 1)
        _check_int("global_local", "n_global", self.n_global, 0)

    def mask_mod(self, b, h, q_idx, kv_idx):
        local = q_idx - kv_idx < self.window
        is_global = (kv_idx < self.n_global) | (q_idx < self.n_global)
        return (kv_idx <= q_idx) & (local | is_global)

    def tile_mask(self, n_tiles, tile, device=None):
        return SlidingWindow(self.window).tile_mask(n_tiles, tile, device)

    def columns(self, seq_len, device=None):
        return torch.arange(min(self.n_global, seq_len), device=device)

