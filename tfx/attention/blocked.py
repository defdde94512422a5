"""Block-gathered sparse attention: the CPU path that really skips work.

Why not FlexAttention here: on CPU it has no backward ("FlexAttention does not
support backward on CPU", torch 2.13), so it cannot train. Why not SDPA with the
pattern as a dense boolean mask: that scores all T^2 pairs and only then throws
most away, so it costs as much as dense attention.

Instead the sequence is cut into tiles of ``tile`` positions. Each query tile reads
only a band of ``K`` key tiles ending at its diagonal (an overlapping strided view
of K and V made by ``unfold``, no copy) plus the pattern's few shared key columns,
and one ``scaled_dot_product_attention`` call runs all query tiles as a batch, each
with its small ``(tile, K * tile + C)`` mask. Work and memory grow as
``T * (K * tile + C)`` instead of ``T^2``; autograd through ``unfold`` and SDPA
gives the backward, so nothing here is a hand-written softmax.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F

from tfx.attention.patterns import Pattern


@dataclass(frozen=True)
class BlockedLayout:
    """What the blocked kernel reads for one sequence length.

    Query tile ``a`` reads the ``band`` key tiles ``a - band + 1 .. a`` (a strided
    view of the keys, no copy) and the shared key ``columns``; ``mask`` is
    ``(1, n_tiles, groups * tile, keys_per_query)``, True = attend: with grouped-query
    attention the ``groups`` query heads that share one KV head are stacked along the
    query rows of a tile, so they read that head's keys once (the mask repeats per group).
    """

    seq_len: int
    tile: int
    band: int
    columns: torch.Tensor
    mask: torch.Tensor
    groups: int = 1

    @property
    def n_tiles(self) -> int:
        return self.mask.shape[1]

    @property
    def keys_per_query(self) -> int:
        """Keys each query is scored against: ``band * tile + C``, not T."""
        return self.mask.shape[-1]

    @property
    def scored_pairs(self) -> int:
        """(query, key) scores the kernel computes, padding and masked slots included."""
        return self.n_tiles * self.tile * self.keys_per_query


def _band_width(need: torch.Tensor) -> int:
    """Tiles from each query tile's first needed key tile to the diagonal, maximised.

    All patterns here need a run of key tiles ending at the diagonal, so a band of
    that width covers them, and a band is a strided view of K: nothing is copied.
    """
    if bool(need.triu(1).any()):
        raise ValueError("tile_mask needs a key tile after the query tile; patterns must be causal")
    rows = torch.arange(need.shape[0], device=need.device)
    first = need.to(torch.int8).argmax(1)  # first True per row; the diagonal is always needed
    return int((rows - first).max()) + 1


@lru_cache(maxsize=64)
def build_layout(pattern: Pattern, seq_len: int, tile: int, device: torch.device,
                 groups: int = 1) -> BlockedLayout:
    """Gather plan for ``pattern`` at ``seq_len``; cached, shared by all layers.
    ``groups``: query heads per KV head (grouped-query attention), 1 without."""
    n = math.ceil(seq_len / tile)
    tiles = torch.arange(n, device=device)[:, None]
    band = _band_width(pattern.tile_mask(n, tile, device))
    q_pos = tiles * tile + torch.arange(tile, device=device)                   # (n, tile)
    kv_pos = (tiles - band + 1) * tile + torch.arange(band * tile, device=device)  # (n, band*tile)
    usable = torch.ones_like(kv_pos, dtype=torch.bool)

    columns = pattern.columns(seq_len, device)
    if columns.numel():
        # A column inside this query tile's band would be counted twice.
        col_tile = columns[None, :] // tile
        in_band = (col_tile <= tiles) & (col_tile > tiles - band)
        usable = torch.cat([usable, ~in_band], dim=1)
        kv_pos = torch.cat([kv_pos, columns.expand(n, -1)], dim=1)

    qi, kj = q_pos[:, :, None], kv_pos[:, None, :]
    allowed = pattern.mask_mod(None, None, qi, kj) & (kj >= 0) & (kj < seq_len)
    # Padded queries attend to their own (zero) padded key so no row is empty: an
    # all-masked row gives NaN, and NaN would leak into the gradients.
    allowed = allowed | ((qi >= seq_len) & (kj == qi))
    # 4-D (1, n, tile, S): the shape SDPA's CPU flash kernel accepts; a 3-D mask
    # silently falls back to the unfused math path (about 3x slower here).
    mask = (usable[:, None, :] & allowed)[None]
    if groups > 1:  # rows (group, position in tile), as blocked_attention stacks the queries
        mask = mask[:, :, None].expand(-1, -1, groups, -1, -1).reshape(1, n, groups * tile, -1)
    return BlockedLayout(seq_len, tile, band, columns, mask, groups)


def _keys(x: torch.Tensor, layout: BlockedLayout) -> torch.Tensor:
    """(B, H, T, D) -> (B*H, n, keys_per_query, D): each query tile's keys.

    Left-pads ``band - 1`` tiles so every band has the same width; ``unfold`` then
    gives the overlapping bands as a view, and autograd sums their gradients.
    """
    B, H, T, D = x.shape
    n, tile, band = layout.n_tiles, layout.tile, layout.band
    padded = F.pad(x, (0, 0, (band - 1) * tile, n * tile - T)).reshape(B * H, -1, D)
    keys = padded.unfold(1, band * tile, tile).transpose(-1, -2)
    if layout.columns.numel() == 0:
        return keys
    cols = x.reshape(B * H, T, D).index_select(1, layout.columns)
    return torch.cat([keys, cols[:, None].expand(-1, n, -1, -1)], dim=2)


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockedLayout,
                      dropout_p: float = 0.0, scale: Optional[float] = None) -> torch.Tensor:
    """Sparse causal attention following ``layout``: ``q`` is ``(B, Hq, T, D)``, ``k``
    ``(B, Hkv, T, D)`` and ``v`` ``(B, Hkv, T, Dv)`` with ``Hq = layout.groups * Hkv``
    (grouped-query attention: query head ``h`` reads KV head ``h // groups``, as
    transformers' ``repeat_kv`` orders them). ``scale`` defaults to ``1/sqrt(D)``.

    Under GQA the keys are never repeated per query head: the ``groups`` query heads of
    one KV head are stacked along each tile's query rows and scored against that head's
    keys in the same SDPA call."""
    B, Hq, T, D = q.shape
    Hkv, g = k.shape[1], layout.groups
    if Hq != g * Hkv:
        raise ValueError(f"{Hq} query heads and {Hkv} KV heads need a layout built with "
                         f"groups={Hq // max(Hkv, 1)}, not {g}")
    n, tile = layout.n_tiles, layout.tile
    q_tiles = F.pad(q, (0, 0, 0, n * tile - T))
    if g == 1:
        q_tiles = q_tiles.reshape(B * Hq, n, tile, D)
    else:  # (B, Hkv, g, n, tile, D) -> (B*Hkv, n, g*tile, D)
        q_tiles = q_tiles.view(B, Hkv, g, n, tile, D).transpose(2, 3).reshape(B * Hkv, n, g * tile, D)
    out = F.scaled_dot_product_attention(q_tiles, _keys(k, layout), _keys(v, layout),
                                         attn_mask=layout.mask, dropout_p=dropout_p, scale=scale)
    Dv = out.shape[-1]
    if g > 1:
        out = out.view(B, Hkv, n, g, tile, Dv).transpose(2, 3)
    return out.reshape(B, Hq, n * tile, Dv)[:, :, :T]
