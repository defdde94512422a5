"""Structured pruning: remove whole attention heads and MLP neurons.

Unlike masks, this physically shrinks the Linears (fewer q/k/v output rows and
o_proj input columns per head, fewer fc rows and proj columns per neuron), so the
pruned model is smaller and faster with ordinary dense kernels. The model's forward
infers the head count from the projections (``view(B, T, -1, head_dim)``), so no
config change is needed; the new shapes live in the weights themselves and
:func:`conform_to_state_dict` rebuilds a fresh model to them before loading.

Importance is the L2 norm of everything a unit owns: for a head, its q/k/v rows and
its o_proj columns; for a neuron, its fc row (+ bias) and its proj column. The same
fraction is removed in every layer. The kept counts per layer are the technique
state, so a resume or ``tfx.ckpt.load_run`` (state loaded before ``apply_to_model``)
rebuilds the same shapes and the checkpoint loads directly.

torch.nn.utils.prune's ``ln_structured`` only zeroes rows in one tensor; it neither
couples q/k/v/o nor shrinks anything, so selection and slicing are done here.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from tfx.core.context import RunContext
from tfx.core.errors import ConfigError
from tfx.core.technique import Stage, Technique
from tfx.model.anatomy import require_own_gpt
from tfx.model.size import count_params

Keep = Dict[str, Dict[str, torch.Tensor]]  # layer -> {"heads": idx, "neurons": idx}


def _n_keep(total: int, ratio: float) -> int:
    return max(1, total - round(ratio * total))


@torch.no_grad()
def select_units(model: nn.Module, head_ratio: float, neuron_ratio: float) -> Keep:
    """Indices (sorted) of the heads and neurons to keep in every block."""
    if not (0 <= head_ratio < 1 and 0 <= neuron_ratio < 1):
        raise ConfigError("compression.structured.head_ratio and neuron_ratio must be in [0, 1)")
    keep: Keep = {}
    for name, block in model.layers.items():
        attn, mlp, hd = block.attn, block.mlp, block.attn.head_dim
        rows = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], 1)
        head_score = rows.view(-1, hd, rows.shape[1]).pow(2).sum((1, 2))
        head_score += attn.o_proj.weight.view(attn.o_proj.out_features, -1, hd).pow(2).sum((0, 2))
        neuron_score = mlp.fc.weight.pow(2).sum(1) + mlp.proj.weight.pow(2).sum(0)
        if mlp.fc.bias is not None:
            neuron_score += mlp.fc.bias.pow(2)
        keep[name] = {
            "heads": head_score.topk(_n_keep(head_score.numel(), head_ratio)).indices.sort().values,
            "neurons": neuron_score.topk(_n_keep(neuron_score.numel(), neuron_ratio)).indices.sort().values,
        }
    return keep


def _sliced(lin: nn.Linear, rows: Optional[torch.Tensor] = None,
            cols: Optional[torch.Tensor] = None) -> nn.Linear:
    w = lin.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None,
                    device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.detach()[rows] if rows is not None else lin.bias.detach())
    return new


def _head_rows(heads: torch.Tensor, hd: int) -> torch.Tensor:
    return (heads[:, None] * hd + torch.arange(hd, device=heads.device)).flatten()


@torch.no_grad()
def shrink(model: nn.Module, keep: Keep) -> nn.Module:
    """Replace the block Linears by smaller ones holding only the kept units."""
    for name, block in model.layers.items():
        attn, mlp = block.attn, block.mlp
        rows = _head_rows(keep[name]["heads"], attn.head_dim)
        for proj in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, proj, _sliced(getattr(attn, proj), rows=rows))
        attn.o_proj = _sliced(attn.o_proj, cols=rows)
        mlp.fc = _sliced(mlp.fc, rows=keep[name]["neurons"])
        mlp.proj = _sliced(mlp.proj, cols=keep[name]["neurons"])
    return model


def prune_structured(model: nn.Module, head_ratio: float = 0.25,
                     neuron_ratio: float = 0.25) -> nn.Module:
    """Remove the least important ``head_ratio`` of heads and ``neuron_ratio`` of MLP
    neurons in every block; returns the (same, shrunken) model."""
    return shrink(model, select_units(model, head_ratio, neuron_ratio))


def layer_shapes(model: nn.Module) -> Dict[str, Dict[str, int]]:
    """Heads and neurons per block, as recorded in the technique state."""
    return {name: {"heads": b.attn.q_proj.out_features // b.attn.head_dim,
                   "d_ff": b.mlp.fc.out_features} for name, b in model.layers.items()}


class StructuredPruning(Technique):
    """Remove heads/neurons at SURGERY (before the optimizer exists), then train.

    Prune a trained model with ``from_checkpoint: <run>`` and fine-tune it; without a
    checkpoint the model is pruned at initialisation (a smaller-model baseline).
    Pruning mid-training would need the optimizer rebuilt around new parameters,
    which the pipeline's rule "all surgery before the optimizer" forbids.
    """

    name = "structured"
    stage = Stage.SURGERY

    def __init__(self, head_ratio: float = 0.25, neuron_ratio: float = 0.25,
                 from_checkpoint: Optional[str] = None) -> None:
        if not (0 <= head_ratio < 1 and 0 <= neuron_ratio < 1):
            raise ConfigError("compression.structured.head_ratio and neuron_ratio must be in [0, 1)")
        self.head_ratio, self.neuron_ratio = head_ratio, neuron_ratio
        self.from_checkpoint = from_checkpoint
        self.shapes: Dict[str, Dict[str, int]] = {}
        self.params_before = self.params_after = 0

    def validate(self, plan) -> None:
        require_own_gpt(plan, "compression=structured", "removes heads and neurons")

    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.params_before = count_params(model)
        if ctx.resuming:  # rebuild the recorded shapes: the weights are loaded next
            shapes = ctx.structure_of(self).get("shapes", {})
            shrink(model, {layer: {"heads": torch.arange(s["heads"]), "neurons": torch.arange(s["d_ff"])}
                           for layer, s in shapes.items()})
        else:  # from_checkpoint weights were loaded by the build order before SURGERY
            prune_structured(model, self.head_ratio, self.neuron_ratio)
        self.params_after = count_params(model)
        self.shapes = layer_shapes(model)
        return model

    def structure(self):
        return {"shapes": self.shapes}

    def export(self, model, out_dir, ctx) -> Dict[str, float]:
        return {"structured/params": self.params_after,
                "structured/param_ratio": self.params_after / max(self.params_before, 1)}
