"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") and round-to-nearest (RTN), weight-only, integer grids.

Grid: per output row and group of ``group_size`` consecutive input columns, an integer
code ``c in [0, 2^bits - 1]`` stands for ``scale * (c - zero)``. Asymmetric grids span
``[min(w, 0), max(w, 0)]`` of the group; symmetric grids ``[-a, a]`` with ``a = max|w|``
and ``zero = 2^(bits-1)``. ``group_size=-1`` is one group per row.

RTN rounds every weight to its grid. GPTQ quantizes the columns left to right and,
after each, moves the rounding error onto the columns not yet quantized along the
optimal (OBS) direction for the input Hessian ``H = 2/n X^T X``: with ``U`` the upper
Cholesky factor of ``H^-1``, the error ``(w - q)/U_ii`` times ``U[i, i..]``. Updates
are applied within a block of ``blocksize`` columns at once and lazily to the rest.
Without ``act_order`` a group's scale and zero point are chosen when the sweep reaches
its first column, from the weights as updated so far (as in the reference).

``act_order=True`` quantizes columns in order of decreasing ``H_jj`` (most active
inputs first, while there are many columns left to absorb their error). Groups then
use **static groups**: every group keeps its contiguous columns ``[g*gs, (g+1)*gs)`` and
its scale/zero point is computed from the original weights before the sweep, so
``g_idx[j] = j // group_size`` exactly as without act_order and the artefact needs no
column permutation to be loaded. (The alternative reference approach forms groups
from consecutive columns of the *permuted* order and stores an arbitrary ``g_idx``.)

The result carries the integer ``codes`` (uint8), ``scales`` (float32) and ``zeros``
(uint8) per group, and the dequantized ``weight`` is computed from exactly those, so a
saved artefact reloads bit for bit (:func:`dequantize`).

Written here because torchao's GPTQ (``torchao.prototype.gptq``, 0.18) asserts a CUDA
device and produces only its int4/int8 tensor subclasses (no 2/3-bit, no CPU), and
llm-compressor comes with a large vLLM-oriented dependency stack that this repo does not
carry; calibration here must run on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from tfx.compression.oneshot.stats import (inverse_hessian_cholesky, prepare_hessian,
                                           set_weight_matrix, weight_matrix)
from tfx.core.errors import ConfigError


@dataclass
class QuantizedWeight:
    """A weight quantized per ``(row, group)``; ``weight == dequantize(...)`` exactly."""

    weight: torch.Tensor   # (out, in) dequantized, dtype of the input weight
    codes: torch.Tensor    # (out, in) uint8 in [0, 2^bits - 1]
    scales: torch.Tensor   # (out, n_groups) float32
    zeros: torch.Tensor    # (out, n_groups) uint8 zero points
    g_idx: torch.Tensor    # (in,) int64 group of each input column
    bits: int
    group_size: int        # columns per group (in_features when -1 was asked)
    sym: bool

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.g_idx,
                          dtype or self.weight.dtype)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               g_idx: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale[g] * (code - zero[g])`` in float32, then cast: the one definition used to
    build and to reload quantized weights."""
    s = scales[:, g_idx].float()
    z = zeros[:, g_idx].float()
    return ((codes.float() - z) * s).to(dtype)


def check_quant_args(bits: int, group_size: int, in_features: int) -> int:
    """Validate; returns the effective group size. Raises :class:`ConfigError`."""
    if int(bits) != bits or not 2 <= bits <= 8:
        raise ConfigError(f"bits must be an integer in 2..8, got {bits}")
    if group_size == -1:
        return in_features
    if int(group_size) != group_size or group_size <= 0 or in_features % group_size:
        raise ConfigError(f"group_size must be -1 (per row) or a positive divisor of "
                          f"in_features={in_features}, got {group_size}")
    return int(group_size)


def grid_params(x: torch.Tensor, bits: int, sym: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale float32, zero uint8)`` of the grid covering ``x`` ``(rows, k)``."""
    maxq = 2 ** bits - 1
    x = x.double()
    xmin = x.min(dim=1).values.clamp(max=0)  # the grid always contains 0 exactly
    xmax = x.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)  # all-zero row: any positive scale, avoid 0/0
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale.double()).clamp(0, maxq)
    return scale, zero.to(torch.uint8)


def _quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    maxq: int) -> torch.Tensor:
    """Codes of ``x`` on the grid(s), broadcasting ``scale``/``zero`` against ``x``."""
    return (torch.round(x.double() / scale.double()) + zero.double()).clamp(0, maxq)


def _static_params(w: torch.Tensor, gs: int, bits: int, sym: bool):
    pairs = [grid_params(w[:, g:g + gs], bits, sym) for g in range(0, w.shape[1], gs)]
    return torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int,
                 sym: bool = False) -> QuantizedWeight:
    """Round-to-nearest on the same grid as :func:`gptq_quantize` (the baseline)."""
    rows, cols = weight.shape
    gs = check_quant_args(bits, group_size, cols)
    w = weight.detach().double()
    scales, zeros = _static_params(w, gs, bits, sym)
    g_idx = torch.arange(cols, device=weight.device) // gs
    codes = _quantize_codes(w, scales[:, g_idx], zeros[:, g_idx], 2 ** bits - 1)
    codes = codes.to(torch.uint8)
    deq = dequantize(codes, scales, zeros, g_idx, weight.dtype)
    return QuantizedWeight(deq, codes, scales, zeros, g_idx, bits, gs, sym)


def _current_columns(w, w1, err1, u, i1, i2, i, end):
    """Columns ``i1+i .. end`` as updated so far: those in the block are current in
    ``w1``; those after it still lack this block's lazy update ``err1 @ U[block, :]``."""
    inside = w1[:, i:min(end - i1, i2 - i1)]
    if end <= i2:
        return inside
    outside = w[:, i2:end] - err1 @ u[i1:i2, i2:end]
    return torch.cat([inside, outside], dim=1)


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128,
                  act_order: bool = False, percdamp: float = 0.01, blocksize: int = 128,
                  sym: bool = False) -> QuantizedWeight:
    """Quantize ``weight`` ``(out, in)`` with GPTQ given the input Hessian ``H`` ``(in, in)``.

    Runs in float64. Inputs never active in the calibration data get weight 0.
    """
    rows, cols = weight.shape
    gs = check_quant_args(bits, group_size, cols)
    if blocksize < 1:
        raise ConfigError(f"blocksize must be positive, got {blocksize}")
    maxq = 2 ** bits - 1
    w, h = prepare_hessian(weight, H, percdamp)
    g_idx = torch.arange(cols, device=w.device) // gs
    scales = torch.zeros(rows, cols // gs, dtype=torch.float32, device=w.device)
    zeros = torch.zeros(rows, cols // gs, dtype=torch.uint8, device=w.device)
    perm = torch.arange(cols, device=w.device)
    if act_order:
        scales, zeros = _static_params(w, gs, bits, sym)
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    u = inverse_hessian_cholesky(h)
    codes_sweep = torch.zeros(rows, cols, dtype=torch.uint8, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            g = int(g_idx[perm[col]])
            if not act_order and col % gs == 0:
                group = _current_columns(w, w1, err1, u, i1, i2, i, col + gs)
                scales[:, g], zeros[:, g] = grid_params(group, bits, sym)
            s, z = scales[:, g].double(), zeros[:, g].double()
            code = _quantize_codes(w1[:, i], s, z, maxq)
            e = (w1[:, i] - s * (code - z)) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
            codes_sweep[:, col] = code.to(torch.uint8)
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    codes = torch.empty_like(codes_sweep)
    codes[:, perm] = codes_sweep
    deq = dequantize(codes, scales, zeros, g_idx, weight.dtype)
    return QuantizedWeight(deq, codes, scales, zeros, g_idx, int(bits), gs, sym)


class GPTQCompressor:
    """Callback for :func:`~tfx.compression.oneshot.sequential.compress_sequential`:
    writes the dequantized weight into the module and keeps each
    :class:`QuantizedWeight` in ``results`` by qualified name (for a compact artefact)."""

    needs_hessian = True

    def __init__(self, bits: int = 4, group_size: int = 128, act_order: bool = False,
                 percdamp: float = 0.01, blocksize: int = 128, sym: bool = False) -> None:
        check_quant_args(bits, -1, 1)
        self.kwargs = dict(bits=bits, group_size=group_size, act_order=act_order,
                           percdamp=percdamp, blocksize=blocksize, sym=sym)
        self.results: dict = {}

    def __call__(self, name, module, stats) -> dict:
        result = gptq_quantize(weight_matrix(module), stats.hessian, **self.kwargs)
        set_weight_matrix(module, result.weight)
        self.results[name] = result
        return {}
