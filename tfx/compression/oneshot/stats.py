"""Calibration statistics of the inputs of each linear layer, collected with forward hooks.

Wanda, SparseGPT and GPTQ all reduce a layer's calibration inputs ``X`` (tokens x
in_features) to a small summary:

* the Hessian of the layer-wise reconstruction loss ``||W X^T - W' X^T||^2``,
  ``H = 2/n * X^T X`` over the ``n`` tokens seen (SparseGPT, GPTQ);
* the squared L2 norm of each input feature over all tokens, ``sum_t X[t, j]^2``
  (Wanda scores weights by ``|W_ij| * ||X_j||_2``).

``H`` is kept as a running mean, rescaled before each batch is added, as in the
SparseGPT/GPTQ reference code: batches may hold different numbers of tokens, and the
result equals ``2/N * X^T X`` of all ``N`` tokens at every moment. The normalisation
is per *token* (the references divide by the number of sequences); the algorithms are
invariant to the scale of ``H`` because their dampening is relative to its diagonal.

The hooks are written here rather than taken from torchao's ``WandaSparsifier``
observers because those observe a whole-model forward, not the inputs a layer sees
after the layers before it were already compressed, and collect no Hessian.

Also here: the few helpers that let the one-shot methods treat ``nn.Linear`` and
transformers' ``Conv1D`` (GPT-2: ``y = x @ W + b``, weight stored ``(in, out)``)
alike, always through a ``(out_features, in_features)`` weight matrix.
"""
from __future__ import annotations

import sys
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from tfx.core.errors import ConfigError


def _conv1d_class() -> Optional[type]:
    # A model built with transformers has already imported this module; importing
    # transformers ourselves would cost seconds for tfx-only runs.
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def is_compressible(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2's projections)."""
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def compressible_modules(layer: nn.Module, prefix: str = "") -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of the linear-like modules inside ``layer``, in definition order."""
    return [(prefix + name, m) for name, m in layer.named_modules() if is_compressible(m)]


def _is_conv1d(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out_features, in_features)``, detached (a transposed view for Conv1D)."""
    w = module.weight.detach()
    return w.t() if _is_conv1d(module) else w


def set_weight_matrix(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an ``(out_features, in_features)`` matrix into ``module.weight`` in place, so
    tied or shared parameters and optimizer references stay the same object."""
    target = module.weight.data
    src = weight.t() if _is_conv1d(module) else weight
    if src.shape != target.shape:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit {module}")
    target.copy_(src.to(target.dtype))


def in_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[1]


class LinearStats:
    """Running input statistics of one linear layer.

    ``hessian``: ``2/n X^T X`` (``in x in``), or ``None`` when not collected (Wanda
    needs only the norms; the Hessian of a 11008-wide MLP is ~1 GB in float64).
    ``act_sq_norm``: ``sum_t X[t, j]^2`` per input feature. ``n_tokens``: ``n``.
    """

    def __init__(self, in_features: int, hessian: bool = True,
                 dtype: torch.dtype = torch.float64, device=None) -> None:
        self.in_features = in_features
        self.dtype = dtype
        self.n_tokens = 0
        self.act_sq_norm = torch.zeros(in_features, dtype=dtype, device=device)
        self.hessian = (torch.zeros(in_features, in_features, dtype=dtype, device=device)
                        if hessian else None)

    @property
    def act_norm(self) -> torch.Tensor:
        """``||X_j||_2`` per input feature, the factor in Wanda's score."""
        return self.act_sq_norm.sqrt()

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``(..., in_features)``; every leading position is a token."""
        x = x.detach().reshape(-1, self.in_features).to(self.dtype)
        t = x.shape[0]
        if t == 0:
            return
        total = self.n_tokens + t
        if self.hessian is not None:
            # Rescale the old mean to the new count, then add this batch's share, so
            # H == 2/total * X^T X over everything seen so far.
            self.hessian.mul_(self.n_tokens / total)
            self.hessian.addmm_(x.t(), x, alpha=2.0 / total)
        self.act_sq_norm.add_(x.square().sum(0))
        self.n_tokens = total


class StatsCollector:
    """Forward hooks that feed each named module's input into a :class:`LinearStats`.

    Use as a context manager; the hooks are removed on exit, even on error.
    """

    def __init__(self, modules: Iterable[Tuple[str, nn.Module]], hessian: bool = True,
                 dtype: torch.dtype = torch.float64) -> None:
        self.stats: Dict[str, LinearStats] = {}
        self._modules = list(modules)
        self._hessian, self._dtype = hessian, dtype
        self._handles: list = []

    def __enter__(self) -> "StatsCollector":
        for name, module in self._modules:
            stats = LinearStats(in_features(module), self._hessian, self._dtype,
                                module.weight.device)
            self.stats[name] = stats
            self._handles.append(module.register_forward_hook(self._hook(stats)))
        return self

    @staticmethod
    def _hook(stats: LinearStats):
        def hook(module, args, output):
            stats.add(args[0])
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def prepare_hessian(weight: torch.Tensor, hessian: torch.Tensor,
                    percdamp: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float64 copies of ``weight`` and ``hessian`` ready for the OBS-style sweeps.

    Inputs that were zero on every calibration token (``H_jj == 0``) carry no
    information: their weights are set to 0 (they never affected the calibration
    outputs) and ``H_jj`` to 1 so ``H`` stays invertible, as the SparseGPT/GPTQ
    reference code does. Then ``percdamp`` times the mean diagonal is added to the
    diagonal, a relative dampening that makes the Cholesky factorisation stable.
    """
    if percdamp < 0:
        raise ConfigError(f"percdamp must be >= 0, got {percdamp}")
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    if h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"Hessian of shape {tuple(h.shape)} does not match a weight of "
                         f"shape {tuple(w.shape)}")
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(percdamp * h.diagonal().mean())
    return w, h


def inverse_hessian_cholesky(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``).

    Row ``i`` of ``U`` divided by ``U_ii`` is the OBS update that removing column ``i``
    causes in columns ``i..`` once columns ``< i`` are fixed, and ``U_ii^2`` is
    ``[H_F^-1]_ii`` for the remaining set ``F = {i, i+1, ...}``: the whole sequence of
    shrinking inverse Hessians in one factorisation (SparseGPT section 3.2, GPTQ step 3).
    """
    try:
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
        return torch.linalg.cholesky(hinv, upper=True)
    except torch.linalg.LinAlgError as err:
        raise ConfigError("the calibration Hessian is not positive definite even after "
                          "dampening; raise percdamp or use more calibration samples") from err
