"""Low-rank factorization of Linear layers by truncated SVD.

``W (out x in) ~= B @ A`` with ``A = sqrt(S_r) Vh_r`` (r x in) and ``B = U_r sqrt(S_r)``
(out x r): the Linear becomes ``nn.Sequential(Linear(in, r), Linear(r, out))``, the
bias staying on the second. The square-root split keeps both factors at the same
scale, which trains better than putting all of S on one side. The SVD runs in
float64 so that full rank reproduces the layer to float32 round-off.

A Linear pays off only when ``r (in + out) < in * out``: for a square d x d layer,
below r = d/2. The rank is ``rank_ratio * min(in, out)`` or the smallest rank whose
singular values keep ``energy`` of ``sum(S^2)``.

The factorized modules are the block Linears of the model anatomy (tfx's GPT, HF
Llama, HF GPT-2, whose ``Conv1D`` stores ``W`` transposed: it is factorized as the
``(out x in)`` matrix it computes with, into the same ``Sequential`` of Linears).
A factorized Hugging Face model no longer matches its config, so it is saved in tfx's
format (the run's checkpoint: ``tfx.ckpt.load_run``; a state dict:
``tfx.compression.load_compressed_state(fresh_model, state_dict)``, which reads the
ranks from the shapes), not with ``save_pretrained``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import nn

from tfx.compression._common import block_linears, set_submodule, weight_matrix
from tfx.core.context import RunContext
from tfx.core.errors import ConfigError
from tfx.core.technique import Stage, Technique
from tfx.model.anatomy import in_features, out_features, require_anatomy
from tfx.model.size import count_params


def choose_rank(s: torch.Tensor, rank_ratio: Optional[float], energy: Optional[float]) -> int:
    if (rank_ratio is None) == (energy is None):
        raise ConfigError("compression.lowrank needs exactly one of rank_ratio or energy")
    if rank_ratio is not None:
        if not 0 < rank_ratio <= 1:
            raise ConfigError(f"compression.lowrank.rank_ratio={rank_ratio} must be in (0, 1]")
        return max(1, math.ceil(rank_ratio * s.numel()))
    if not 0 < energy <= 1:
        raise ConfigError(f"compression.lowrank.energy={energy} must be in (0, 1]")
    frac = (s.pow(2).cumsum(0) / s.pow(2).sum()).clamp(max=1.0)
    return min(int((frac < energy - 1e-12).sum()) + 1, s.numel())


@torch.no_grad()
def factorize(lin: nn.Module, rank: Optional[int] = None, rank_ratio: Optional[float] = None,
              energy: Optional[float] = None) -> nn.Sequential:
    """Return ``Sequential(Linear(in, r, bias=False), Linear(r, out))`` ~= ``lin`` (an
    ``nn.Linear`` or GPT-2 ``Conv1D``)."""
    w = weight_matrix(lin).detach()
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    r = rank if rank is not None else choose_rank(s, rank_ratio, energy)
    root = s[:r].sqrt()
    first = nn.Linear(in_features(lin), r, bias=False, device=w.device, dtype=w.dtype)
    second = nn.Linear(r, out_features(lin), bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    first.weight.copy_(root[:, None] * vh[:r])
    second.weight.copy_(u[:, :r] * root)
    if lin.bias is not None:
        second.bias.copy_(lin.bias)
    return nn.Sequential(first, second)


def apply_lowrank(model: nn.Module, rank_ratio: Optional[float] = None,
                  energy: Optional[float] = None,
                  ranks: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Factorize every block Linear in place; returns the chosen rank per layer, by
    its name in ``model`` (e.g. ``lm.model.layers.0.mlp.up_proj`` under tfx's HF wrapper).

    ``ranks`` (layer name -> rank) overrides the rule, e.g. to rebuild a saved run."""
    chosen = {}
    for name, lin in block_linears(model):
        rank = ranks.get(name) if ranks else None
        seq = factorize(lin, rank=rank, rank_ratio=rank_ratio, energy=energy)
        set_submodule(model, name, seq)
        chosen[name] = seq[0].out_features
    return chosen


class LowRank(Technique):
    """Factorize the block Linears at SURGERY, then train (fine-tune) the factors.

    ``from_checkpoint: <run>`` factorizes a trained model (the usual use); without it
    the random initialisation is factorized, i.e. a low-rank model trained from scratch.
    The chosen ranks are the technique's :meth:`structure`: a resume or ``load_run``
    (``ctx.resuming``) rebuilds exactly those shapes before the weights are loaded.
    """

    name = "lowrank"
    stage = Stage.SURGERY

    def __init__(self, rank_ratio: Optional[float] = 0.5, energy: Optional[float] = None,
                 from_checkpoint: Optional[str] = None) -> None:
        if energy is not None and rank_ratio is not None:
            raise ConfigError("compression.lowrank: set rank_ratio=null to use energy")
        choose_rank(torch.ones(1), rank_ratio, energy)  # validates the values
        # from_checkpoint: loaded by the build order before SURGERY (not on a resume)
        self.rank_ratio, self.energy, self.from_checkpoint = rank_ratio, energy, from_checkpoint
        self.ranks: Dict[str, int] = {}
        self.params_before = self.params_after = 0

    def validate(self, plan) -> None:
        require_anatomy(plan, "compression=lowrank")
        if plan.has_stage(Stage.TENSOR):
            raise ConfigError("compression=lowrank replaces each block Linear by two factors, which "
                              "the tensor-parallel plans (ColwiseParallel/RowwiseParallel on "
                              "nn.Linear) cannot shard; use parallel=fsdp or parallel=ddp")

    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        saved = dict(ctx.structure_of(self).get("ranks", {})) if ctx.resuming else None
        self.params_before = count_params(model)
        self.ranks = apply_lowrank(model, self.rank_ratio, self.energy, ranks=saved)
        self.params_after = count_params(model)
        return model

    def structure(self):
        return {"ranks": self.ranks}

    def export(self, model, out_dir, ctx) -> Dict[str, float]:
        return {"lowrank/params": self.params_after,
                "lowrank/param_ratio": self.params_after / max(self.params_before, 1)}
