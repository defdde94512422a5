"""Wanda pruning masks (Sun et al. 2023, "A Simple and Effective Pruning Approach for
Large Language Models") and the magnitude baseline under the same structure.

Wanda scores each weight by ``|W_ij| * ||X_j||_2``: its magnitude times the L2 norm of
the input feature it multiplies, over the calibration tokens. Weights are compared
*within an output row* (each output is a sum over its own inputs, so a row is the unit
whose error the score approximates), and no weight is updated: the mask is the method.

Structures (``True`` in a mask = weight kept):

* unstructured, ``sparsity=s``: each row keeps its ``in - floor(s * in)`` top scores;
* N:M, ``n=N, m=M``: in each row, every group of ``M`` consecutive inputs keeps its
  ``N`` top scores, i.e. **at most N nonzeros in every M** ("2:4" keeps 2 of 4, the
  layout of NVIDIA's sparse tensor cores). The Wanda/SparseGPT reference scripts name
  the number *pruned* per group; for 2:4 and 4:8 the two readings coincide.

Written here because torchao's ``WandaSparsifier`` compares scores across the whole
layer rather than per row, supports only ``M/2:M``, and works on a whole-model forward
instead of the layer-by-layer calibration of :mod:`tfx.compression.oneshot.sequential`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from tfx.compression.oneshot.stats import set_weight_matrix, weight_matrix
from tfx.core.errors import ConfigError


def check_structure(sparsity: Optional[float], n: Optional[int], m: Optional[int],
                    in_features: Optional[int] = None) -> Tuple[Optional[float], Optional[int],
                                                                Optional[int]]:
    """Validate "either ``sparsity`` or ``n``:``m``"; raises :class:`ConfigError`."""
    if sparsity is not None and (n is not None or m is not None):
        raise ConfigError(f"give either sparsity={sparsity} or n:m={n}:{m}, not both")
    if sparsity is not None:
        if not 0.0 <= float(sparsity) < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
        return float(sparsity), None, None
    if n is None or m is None:
        raise ConfigError("give sparsity (unstructured) or both n and m (n:m pruning)")
    if int(m) != m or int(n) != n or m <= 0:
        raise ConfigError(f"m must be a positive integer, got n={n}, m={m}")
    if not 0 < n <= m:
        raise ConfigError(f"n must satisfy 0 < n <= m (n kept per group of m), got {n}:{m}")
    if in_features is not None and in_features % m:
        raise ConfigError(f"m={m} does not divide in_features={in_features}; n:m groups "
                          "are consecutive inputs of a row")
    return None, int(n), int(m)


def _keep_top_per_row(score: torch.Tensor, n_keep: int) -> torch.Tensor:
    mask = torch.zeros_like(score, dtype=torch.bool)
    if n_keep > 0:
        mask.scatter_(1, score.topk(n_keep, dim=1).indices, True)
    return mask


def _keep_top_per_group(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, groups.topk(n, dim=2).indices, True)
    return mask.reshape(rows, cols)


def mask_from_scores(score: torch.Tensor, sparsity: Optional[float] = None,
                     n: Optional[int] = None, m: Optional[int] = None,
                     per_row: bool = True) -> torch.Tensor:
    """Keep-mask of the highest ``score`` entries of a 2-D matrix under the structure.

    ``per_row=False`` (unstructured only) ranks the whole matrix at once.
    """
    if score.dim() != 2:
        raise ValueError(f"expected a 2-D (out, in) score, got shape {tuple(score.shape)}")
    sparsity, n, m = check_structure(sparsity, n, m, score.shape[1])
    if m is not None:
        return _keep_top_per_group(score, n, m)
    if per_row:
        cols = score.shape[1]
        return _keep_top_per_row(score, cols - int(sparsity * cols))
    flat = score.reshape(1, -1)
    return _keep_top_per_row(flat, flat.shape[1] - int(sparsity * flat.shape[1])).view_as(score)


def wanda_mask(weight: torch.Tensor, act_norm: torch.Tensor, sparsity: Optional[float] = None,
               n: Optional[int] = None, m: Optional[int] = None) -> torch.Tensor:
    """Keep-mask (bool, shape of ``weight``) of Wanda's ``|W| * ||X||`` per output row.

    ``weight``: ``(out, in)``; ``act_norm``: ``(in,)`` the L2 norm of each input feature
    over the calibration tokens (:attr:`LinearStats.act_norm`, *not* its square).
    """
    if act_norm.shape != weight.shape[1:]:
        raise ValueError(f"act_norm of shape {tuple(act_norm.shape)} does not match "
                         f"in_features={weight.shape[1]}")
    score = weight.detach().abs().double() * act_norm.detach().double().unsqueeze(0)
    return mask_from_scores(score, sparsity, n, m)


def magnitude_mask(weight: torch.Tensor, sparsity: Optional[float] = None,
                   n: Optional[int] = None, m: Optional[int] = None,
                   per_row: bool = True) -> torch.Tensor:
    """Keep-mask of the largest ``|W|``: the data-free baseline with Wanda's structure
    (``per_row=False`` ranks the whole layer, as classic magnitude pruning does)."""
    return mask_from_scores(weight.detach().abs(), sparsity, n, m, per_row)


class WandaCompressor:
    """Callback for :func:`~tfx.compression.oneshot.sequential.compress_sequential`:
    zeroes the weights outside Wanda's mask. ``masks`` keeps each layer's mask by name
    (so training can keep them afterwards)."""

    needs_hessian = False

    def __init__(self, sparsity: Optional[float] = None, n: Optional[int] = None,
                 m: Optional[int] = None) -> None:
        check_structure(sparsity, n, m)
        self.sparsity, self.n, self.m = sparsity, n, m
        self.masks: dict = {}

    def __call__(self, name, module, stats) -> dict:
        w = weight_matrix(module)
        mask = wanda_mask(w, stats.act_norm, self.sparsity, self.n, self.m)
        set_weight_matrix(module, w * mask)
        self.masks[name] = mask
        return {}
