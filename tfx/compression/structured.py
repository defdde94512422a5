"""Structured pruning: remove whole attention heads (KV groups) and MLP neurons.

Unlike masks, this physically shrinks the Linears (fewer q/k/v output rows and
o_proj input columns per head, fewer up/gate rows and down columns per neuron), so the
pruned model is smaller and faster with ordinary dense kernels. Works on every family
of the model anatomy:

* tfx's GPT and HF Llama read the head count from the projections
  (``view(B, T, -1, head_dim)``), so shrinking the weights is all it takes.
* Grouped-query attention (Llama): ``num_attention_heads / num_key_value_heads``
  query heads share one KV head; a KV group is removed *together with its query
  heads*, so every remaining query head keeps its own K/V and the ratio (which
  Llama's attention reads from its ``num_key_value_groups``) is unchanged.
  ``head_ratio`` is then the fraction of KV groups (= of query heads) removed.
* MLP neurons: the same rows of ``up`` and ``gate`` (SwiGLU) and columns of ``down``.
* HF GPT-2: the fused ``c_attn`` (``Conv1D``, output ``[q | k | v]``) loses the head's
  columns in each third, ``c_proj`` its rows; ``split_size`` follows
  (:meth:`~tfx.model.anatomy.Anatomy.refresh_layer`).

Afterwards the model's own HF config is updated (``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``; GPT-2: ``n_inner``) when one config can
describe the result (:meth:`~tfx.model.anatomy.Anatomy.sync_config`): the same counts
in every layer, which the same ratio in every layer gives. A pruned Llama is then an
ordinary Llama, saved with ``save_pretrained`` and reloaded with
``AutoModelForCausalLM``. Otherwise (GPT-2 with heads removed: its config ties the
head width to ``n_embd / n_head``; layers of different sizes) the architecture has
changed and the result is saved in tfx's format: the run's checkpoint
(``tfx.ckpt.load_run``) or a state dict through
:func:`tfx.compression.load_compressed_state`, which rebuilds the shapes from it.

Importance is the L2 norm of everything a unit owns: for a KV group, its k/v rows and
the q rows and o_proj columns of its query heads; for a neuron, its up (and gate) row
(+ bias) and its down column. The same fraction is removed in every layer. The kept
counts per layer are the technique's structure, so a resume or
``tfx.ckpt.load_run`` rebuilds the same shapes before the checkpoint loads.

torch.nn.utils.prune's ``ln_structured`` only zeroes rows in one tensor; it neither
couples q/k/v/o nor shrinks anything, and transformers 5 has no head pruning, so
selection and slicing are done here.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from tfx.compression._common import set_submodule, weight_matrix
from tfx.core.context import RunContext
from tfx.core.errors import ConfigError
from tfx.core.technique import Stage, Technique
from tfx.model.anatomy import (Anatomy, AttnParts, anatomy_of, is_conv1d, out_features,
                               require_anatomy, unwrap)
from tfx.model.size import count_params

Keep = Dict[str, Dict[str, torch.Tensor]]  # layer -> {"heads": query head idx, "neurons": idx}


def _n_keep(total: int, ratio: float) -> int:
    return max(1, total - round(ratio * total))


def _layers(model: nn.Module) -> Tuple[Anatomy, List[Tuple[str, nn.Module]]]:
    """The anatomy and ``(key, layer)`` pairs, ``key`` the layer's name in its container
    (``"0"``, ``"1"``, ...: the keys of :data:`Keep` and of the saved structure)."""
    inner = unwrap(model)
    anatomy = anatomy_of(inner)
    return anatomy, [(name.rsplit(".", 1)[-1], layer)
                     for name, layer in anatomy.named_decoder_layers(inner)]


def _qkv(a: AttnParts) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v weights as ``(out, in)`` matrices (views into a fused projection)."""
    if a.qkv is not None:
        w = weight_matrix(a.qkv)
        d = w.shape[0] // 3
        return w[:d], w[d:2 * d], w[2 * d:]
    return weight_matrix(a.q), weight_matrix(a.k), weight_matrix(a.v)


@torch.no_grad()
def select_units(model: nn.Module, head_ratio: float, neuron_ratio: float) -> Keep:
    """Indices (sorted) of the query heads and MLP neurons to keep in every block.
    With grouped-query attention whole KV groups are kept or removed, so ``heads``
    holds every query head of each kept group."""
    if not (0 <= head_ratio < 1 and 0 <= neuron_ratio < 1):
        raise ConfigError("compression.structured.head_ratio and neuron_ratio must be in [0, 1)")
    anatomy, layers = _layers(model)
    keep: Keep = {}
    for key, layer in layers:
        a, mlp = anatomy.attention(layer), anatomy.mlp(layer)
        hd, groups = a.head_dim, a.kv_groups
        q, k, v = _qkv(a)
        o = weight_matrix(a.o)
        head_score = q.reshape(a.n_heads, hd, -1).pow(2).sum((1, 2))
        head_score += o.reshape(o.shape[0], a.n_heads, hd).pow(2).sum((0, 2))
        kv_score = (k.reshape(a.n_kv_heads, hd, -1).pow(2).sum((1, 2))
                    + v.reshape(a.n_kv_heads, hd, -1).pow(2).sum((1, 2)))
        group_score = head_score.reshape(a.n_kv_heads, groups).sum(1) + kv_score
        kept = group_score.topk(_n_keep(a.n_kv_heads, head_ratio)).indices.sort().values
        heads = (kept[:, None] * groups + torch.arange(groups, device=kept.device)).flatten()
        up = weight_matrix(mlp.up)
        neuron_score = up.pow(2).sum(1) + weight_matrix(mlp.down).pow(2).sum(0)
        if mlp.gate is not None:
            neuron_score += weight_matrix(mlp.gate).pow(2).sum(1)
        if mlp.up.bias is not None:
            neuron_score += mlp.up.bias.pow(2)
        n_keep = _n_keep(neuron_score.numel(), neuron_ratio)
        keep[key] = {"heads": heads,
                     "neurons": neuron_score.topk(n_keep).indices.sort().values}
    return keep


def _sliced(module: nn.Module, rows: Optional[torch.Tensor] = None,
            cols: Optional[torch.Tensor] = None) -> nn.Module:
    """A module of the same kind (Linear or GPT-2 Conv1D) holding only ``rows`` (outputs)
    and ``cols`` (inputs) of ``module``'s ``(out, in)`` weight matrix."""
    w = weight_matrix(module).detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    bias = module.bias.detach() if module.bias is not None else None
    if bias is not None and rows is not None:
        bias = bias[rows]
    if is_conv1d(module):
        new = type(module)(w.shape[0], w.shape[1]).to(device=w.device, dtype=w.dtype)  # (nf, nx)
        new.weight.data.copy_(w.t())
    else:
        new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
        new.weight.data.copy_(w)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def _head_rows(heads: torch.Tensor, hd: int) -> torch.Tensor:
    return (heads[:, None] * hd + torch.arange(hd, device=heads.device)).flatten()


def _replace(layer: nn.Module, old: nn.Module, new: nn.Module) -> None:
    name = next(n for n, m in layer.named_modules() if m is old)
    set_submodule(layer, name, new)


@torch.no_grad()
def shrink(model: nn.Module, keep: Keep) -> nn.Module:
    """Replace the block Linears by smaller ones holding only the kept units, then
    update the layers' size attributes and (where it can describe the result) the
    model's HF config. ``keep[layer]["heads"]`` must hold whole KV groups."""
    anatomy, layers = _layers(model)
    for key, layer in layers:
        a, mlp = anatomy.attention(layer), anatomy.mlp(layer)
        heads = keep[key]["heads"].to(torch.long)
        groups = torch.unique(heads // a.kv_groups)
        if groups.numel() * a.kv_groups != heads.numel():
            raise ConfigError(f"layer {key}: kept query heads {heads.tolist()} are not whole KV "
                              f"groups of {a.kv_groups}")
        q_rows, kv_rows = _head_rows(heads, a.head_dim), _head_rows(groups, a.head_dim)
        if a.qkv is not None:
            d = out_features(a.qkv) // 3
            _replace(layer, a.qkv, _sliced(a.qkv, rows=torch.cat([q_rows, d + kv_rows, 2 * d + kv_rows])))
        else:
            _replace(layer, a.q, _sliced(a.q, rows=q_rows))
            _replace(layer, a.k, _sliced(a.k, rows=kv_rows))
            _replace(layer, a.v, _sliced(a.v, rows=kv_rows))
        _replace(layer, a.o, _sliced(a.o, cols=q_rows))
        neurons = keep[key]["neurons"].to(torch.long)
        for proj in (mlp.up, mlp.gate):
            if proj is not None:
                _replace(layer, proj, _sliced(proj, rows=neurons))
        _replace(layer, mlp.down, _sliced(mlp.down, cols=neurons))
        anatomy.refresh_layer(layer)
    anatomy.sync_config(unwrap(model))
    return model


def prune_structured(model: nn.Module, head_ratio: float = 0.25,
                     neuron_ratio: float = 0.25) -> nn.Module:
    """Remove the least important ``head_ratio`` of heads (KV groups with their query
    heads) and ``neuron_ratio`` of MLP neurons in every block; returns the (same,
    shrunken) model."""
    return shrink(model, select_units(model, head_ratio, neuron_ratio))


def layer_shapes(model: nn.Module) -> Dict[str, Dict[str, int]]:
    """Query heads and MLP neurons per block, as recorded in the technique's structure."""
    anatomy, layers = _layers(model)
    return {key: {"heads": anatomy.attention(layer).n_heads,
                  "d_ff": out_features(anatomy.mlp(layer).up)} for key, layer in layers}


def keep_first(model: nn.Module, shapes: Dict[str, Dict[str, int]]) -> Keep:
    """A :data:`Keep` of the first ``heads`` / ``d_ff`` units of every layer (to rebuild
    recorded shapes before the weights are loaded)."""
    return {key: {"heads": torch.arange(s["heads"]), "neurons": torch.arange(s["d_ff"])}
            for key, s in shapes.items()}


class StructuredPruning(Technique):
    """Remove heads/neurons at SURGERY (before the optimizer exists), then train.

    Prune a trained model with ``from_checkpoint: <run>`` (or a pretrained HF model)
    and fine-tune it; without either the model is pruned at initialisation (a
    smaller-model baseline). Pruning mid-training would need the optimizer rebuilt
    around new parameters, which the pipeline's rule "all surgery before the
    optimizer" forbids.
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
        require_anatomy(plan, "compression=structured")

    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.params_before = count_params(model)
        if ctx.resuming:  # rebuild the recorded shapes: the weights are loaded next
            shrink(model, keep_first(model, ctx.structure_of(self).get("shapes", {})))
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
