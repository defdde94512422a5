"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be
Accurately Pruned in One-Shot"): prune a linear layer and update its remaining weights
so that its outputs on calibration data change as little as possible.

For one output row ``w`` and inputs with Hessian ``H = 2/n X^T X``, removing weight
``q`` and re-fitting the others optimally (Optimal Brain Surgeon) changes ``w`` by
``-w_q / [H^-1]_qq * H^-1[:, q]``. SparseGPT makes this affordable for all rows at once
by sweeping the columns left to right: once column ``i`` is decided (kept or set to 0)
it is frozen, its error is spread over the columns to its right only, and the inverse
Hessians of the shrinking remaining sets are the rows of one upper Cholesky factor of
``H^-1`` (:func:`~tfx.compression.oneshot.stats.inverse_hessian_cholesky`). Updates are
applied inside a block of ``blocksize`` columns at once and to the rest of the matrix
lazily, once per block (one matrix product instead of one per column).

Mask selection is adaptive, on the partially updated weights, with the OBS saliency
``w^2 / [H_F^-1]_ii``:

* unstructured: at the start of every block, the ``floor(sparsity * rows * blocksize)``
  lowest scores *of the block* (all rows together) are pruned, as in the paper, so rows
  may end with different sparsities while the layer reaches ``sparsity``;
* N:M: when the sweep reaches the first column of each group of ``m``, each row keeps
  the ``n`` highest scores of that group (``n`` kept per ``m``, see
  :mod:`~tfx.compression.oneshot.wanda`).

A keep-mask fixed in advance (``mask=``, e.g. Wanda's) can be given instead; then only
the weight update runs.

Written here because torchao (installed) has no SparseGPT, and llm-compressor, the
maintained implementation, comes with a large vLLM-oriented (GPU deployment) dependency
stack that this repo does not carry.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from tfx.compression.oneshot.stats import (inverse_hessian_cholesky, prepare_hessian,
                                           set_weight_matrix, weight_matrix)
from tfx.compression.oneshot.wanda import check_structure
from tfx.core.errors import ConfigError


def _obs_scores(w: torch.Tensor, u_diag: torch.Tensor) -> torch.Tensor:
    # OBS saliency w_q^2 / [H_F^-1]_qq of the remaining set F, where [H_F^-1]_qq = U_qq^2.
    return w.square() / u_diag.square().unsqueeze(0)


def _block_prune_mask(w_block: torch.Tensor, u_diag: torch.Tensor,
                      sparsity: float) -> torch.Tensor:
    """Pruned-mask of the ``floor(sparsity * numel)`` lowest OBS scores in the block."""
    score = _obs_scores(w_block, u_diag).flatten()
    k = int(sparsity * score.numel())
    pruned = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        pruned[score.topk(k, largest=False).indices] = True
    return pruned.view_as(w_block)


def _group_prune_mask(w_group: torch.Tensor, u_diag: torch.Tensor, n: int) -> torch.Tensor:
    """Pruned-mask of a group of ``m`` columns: all but the ``n`` best per row."""
    score = _obs_scores(w_group, u_diag)
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep.scatter_(1, score.topk(n, dim=1).indices, True)
    return ~keep


def _sweep_block(w1: torch.Tensor, u1: torch.Tensor, pruned1: torch.Tensor,
                 start: int, n: Optional[int], m: Optional[int]) -> torch.Tensor:
    """Process the columns of one block in place; returns the scaled errors ``E``
    whose product with ``U[block, rest]`` is the lazy update of later columns.

    ``pruned1`` is filled in here for N:M (``start`` is the block's first column)."""
    rows, count = w1.shape
    err1 = torch.zeros_like(w1)
    for i in range(count):
        if m is not None and (start + i) % m == 0:
            pruned1[:, i:i + m] = _group_prune_mask(w1[:, i:i + m], u1.diagonal()[i:i + m], n)
        w = w1[:, i]
        q = torch.where(pruned1[:, i], torch.zeros_like(w), w)
        # OBS: freezing column i at q costs (w - q); the optimal change of the
        # not-yet-frozen columns i.. is -(w - q)/U_ii * U[i, i..].
        e = (w - q) / u1[i, i]
        w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
        w1[:, i] = q  # exact zero / kept value, free of rounding from the update
        err1[:, i] = e
    return err1


def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, sparsity: Optional[float] = None,
                    n: Optional[int] = None, m: Optional[int] = None, blocksize: int = 128,
                    percdamp: float = 0.01,
                    mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` ``(out, in)`` given the input Hessian ``H`` ``(in, in)``.

    Exactly one of: ``sparsity`` (unstructured, in [0, 1)), ``n`` and ``m`` (keep ``n``
    of every ``m`` consecutive inputs per row), or ``mask`` (bool keep-mask fixed in
    advance). Returns ``(new_weight, keep_mask)``; ``new_weight`` has ``weight``'s dtype
    and is zero wherever ``keep_mask`` is False (and on inputs never active in the
    calibration data). The computation runs in float64.
    """
    if blocksize < 1:
        raise ConfigError(f"blocksize must be positive, got {blocksize}")
    rows, cols = weight.shape
    if mask is not None:
        if sparsity is not None or n is not None or m is not None:
            raise ConfigError("give a fixed mask or sparsity / n:m, not both")
        if mask.shape != weight.shape:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the weight")
        pruned = ~mask.to(device=weight.device, dtype=torch.bool)
    else:
        sparsity, n, m = check_structure(sparsity, n, m, cols)
        pruned = torch.zeros(rows, cols, dtype=torch.bool, device=weight.device)
    if m is not None:
        blocksize = max(m, blocksize // m * m)  # a group of m must not straddle two blocks

    w, h = prepare_hessian(weight, H, percdamp)
    u = inverse_hessian_cholesky(h)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        if sparsity is not None:
            pruned[:, i1:i2] = _block_prune_mask(w1, u1.diagonal(), sparsity)
        err1 = _sweep_block(w1, u1, pruned[:, i1:i2], i1, n, m)
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w.to(weight.dtype), ~pruned


class SparseGPTCompressor:
    """Callback for :func:`~tfx.compression.oneshot.sequential.compress_sequential`.
    ``masks`` keeps each layer's keep-mask by qualified name."""

    needs_hessian = True

    def __init__(self, sparsity: Optional[float] = None, n: Optional[int] = None,
                 m: Optional[int] = None, blocksize: int = 128, percdamp: float = 0.01) -> None:
        check_structure(sparsity, n, m)
        self.kwargs = dict(sparsity=sparsity, n=n, m=m, blocksize=blocksize, percdamp=percdamp)
        self.masks: dict = {}

    def __call__(self, name, module, stats) -> dict:
        new, mask = sparsegpt_prune(weight_matrix(module), stats.hessian, **self.kwargs)
        set_weight_matrix(module, new)
        self.masks[name] = mask
        return {}
