"""Helpers shared by the compression techniques."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from tfx.model.anatomy import unwrap  # noqa: F401  (re-exported: techniques import it from here)


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
