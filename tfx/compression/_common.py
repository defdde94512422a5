"""Helpers shared by the compression techniques."""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import torch
from torch import nn

from tfx.core.errors import CheckpointError


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP (``.module``) and torch.compile (``._orig_mod``)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def block_linears(model: nn.Module) -> List[Tuple[str, nn.Linear]]:
    """The ``nn.Linear`` layers inside the transformer blocks (``layers.*``).

    Embeddings and the head are left out on purpose: the head is tied to ``tok_emb``
    by default, so pruning, factorizing or quantizing it would silently untie the
    two (or change the embedding too), and the embedding is a lookup, not a matmul.
    """
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("layers.")]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def load_weights_from_run(model: nn.Module, path: str) -> nn.Module:
    """Copy the weights of a trained tfx run (directory or checkpoint file) into
    ``model`` so compression can start from a trained network (``from_checkpoint``)."""
    from tfx.ckpt import load_run  # the trainer's loader; imported late to keep deps light

    if not os.path.exists(path):
        raise CheckpointError(f"from_checkpoint={path!r} does not exist; pass a tfx run "
                              "directory or a checkpoint file")
    src, _ = load_run(path)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); the model config must match the run it came from")
    return model


def count_params(model: nn.Module) -> int:
    """Parameters, counting the tied head/embedding once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def pruned_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Fold ``torch.nn.utils.prune`` reparametrisations: ``x_orig * x_mask -> x``.

    Works on a plain state_dict, so a saved checkpoint of a pruned run can be
    exported without rebuilding the pruned model.
    """
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith("_orig") and k[:-5] + "_mask" in sd:
            out[k[:-5]] = (v * sd[k[:-5] + "_mask"]).detach()
        elif k.endswith("_mask") and k[:-5] + "_orig" in sd:
            continue
        else:
            out[k] = v
    return out
