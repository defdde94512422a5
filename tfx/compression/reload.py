"""Load compressed weights into a freshly built model.

Structured pruning and low-rank change layer shapes, pruning adds ``weight_orig`` /
``weight_mask``, distillation adds ``distill_proj``. Rather than storing a second
description of the architecture, the shapes are read back from the state_dict itself,
so any checkpoint (or ``.tfxs`` / compressed export) rebuilds without the technique
that produced it. This is what evaluate.py and ``load_run`` call before
``load_state_dict``.

It is also tfx's documented loader for compressed Hugging Face models whose
architecture no longer fits their config (low-rank factors, GPT-2 with heads removed):
``load_compressed_state(HFModel(name).build(vocab, seq_len), state_dict)``. Names are
the built model's (``lm.`` prefix under tfx's HF wrapper); GPT-2's ``Conv1D`` layers
are rebuilt as ``Conv1D``; afterwards the layers' size attributes and, where one
config can describe the result, the HF config are updated (the model anatomy's
``refresh_layer`` / ``sync_config``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.nn.utils import prune

from tfx.compression._common import block_linears, is_conv1d, pruned_state_dict, set_submodule
from tfx.core.errors import ConfigError
from tfx.model.anatomy import anatomy_of, unwrap

TRAINING_ONLY_PREFIXES = ("distill_proj.",)


def _weight_shape(sd: Dict[str, torch.Tensor], prefix: str) -> Optional[torch.Size]:
    w = sd.get(prefix + "weight", sd.get(prefix + "weight_orig"))
    return None if w is None else w.shape


def _linear(shape, bias: bool, like: nn.Module) -> nn.Linear:
    w = like.weight
    return nn.Linear(shape[1], shape[0], bias=bias, device=w.device, dtype=w.dtype)


def _resized(shape, bias: bool, like: nn.Module) -> nn.Module:
    """A module of ``like``'s kind whose stored weight has ``shape``."""
    if is_conv1d(like):  # weight stored (in, out) = (nx, nf)
        w = like.weight
        return type(like)(shape[1], shape[0]).to(device=w.device, dtype=w.dtype)
    return _linear(shape, bias, like)


@torch.no_grad()
def conform_to_state_dict(model: nn.Module, sd: Dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild the block Linears of ``model`` to the shapes and reparametrisations in
    ``sd`` (shrunken, factorized as ``<name>.0``/``<name>.1``, pruned); returns it."""
    for name, lin in block_linears(model):
        first = _weight_shape(sd, f"{name}.0.")
        if first is not None:  # factorized
            second = _weight_shape(sd, f"{name}.1.")
            bias = f"{name}.1.bias" in sd
            seq = nn.Sequential(_linear(first, False, lin), _linear(second, bias, lin))
            set_submodule(model, name, seq)
            continue
        shape = _weight_shape(sd, f"{name}.")
        if shape is not None and shape != lin.weight.shape:
            lin = _resized(shape, f"{name}.bias" in sd, lin)
            set_submodule(model, name, lin)
    for name, lin in block_linears(model):
        if f"{name}.weight_orig" in sd and not prune.is_pruned(lin):
            prune.identity(lin, "weight")
    _refresh_sizes(model)
    return model


def _refresh_sizes(model: nn.Module) -> None:
    inner = unwrap(model)
    try:
        anatomy = anatomy_of(inner)
    except ConfigError:
        return
    for layer in anatomy.decoder_layers(inner):
        anatomy.refresh_layer(layer)
    anatomy.sync_config(inner)


def inference_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Fold pruning masks into the weights and drop training-only modules."""
    return {k: v for k, v in pruned_state_dict(sd).items()
            if not k.startswith(TRAINING_ONLY_PREFIXES)}


def load_compressed_state(model: nn.Module, sd: Dict[str, torch.Tensor]) -> nn.Module:
    """``conform_to_state_dict`` + strict ``load_state_dict`` of the inference weights."""
    sd = inference_state_dict(sd)
    conform_to_state_dict(model, sd)
    model.load_state_dict(sd)
    return model
