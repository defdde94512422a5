"""Gradient-norm clipping when parameters are DTensors, plain tensors, or split
across pipeline stages.

``torch.nn.utils.clip_grad_norm_`` stacks per-parameter norms, which fails when
DTensor and plain gradients mix (tensor parallel) or DTensors live on different
meshes (2-D: FSDP-only and FSDP+TP parameters), and it cannot see the other pipeline stages. This follows torchtitan:
norms per kind via ``get_total_norm`` (DTensor norms made full), a sum of squares
across the pipeline group, then torch's ``clip_grads_with_norm_``.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.utils import clip_grads_with_norm_, get_total_norm


def _norm(grads) -> torch.Tensor:
    if not grads:
        return torch.zeros(())
    n = get_total_norm(grads, 2.0)
    return n.full_tensor() if isinstance(n, DTensor) else n


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float,
                   pp_group: Optional[dist.ProcessGroup] = None,
                   uncounted: Iterable[torch.nn.Parameter] = ()) -> torch.Tensor:
    """Clip in place; return the total norm over all gradients (and stages).
    ``uncounted`` parameters are clipped but left out of the norm (a tied weight
    that another stage already counts)."""
    skip = {id(p) for p in uncounted}
    groups: Dict[Any, List[torch.nn.Parameter]] = defaultdict(list)
    params = list(params)
    for p in params:
        if id(p) in skip:
            continue
        if p.grad is not None:  # one group per device mesh (2-D runs mix 1-D and 2-D meshes)
            groups[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p)
    sq = sum((_norm([p.grad for p in g]).float() ** 2 for g in groups.values()), torch.zeros(()))
    if pp_group is not None:
        dist.all_reduce(sq, group=pp_group)
    total = sq.sqrt()
    for group in groups.values():
        clip_grads_with_norm_(group, max_norm, total)
    extra = [p for p in params if id(p) in skip and p.grad is not None]
    if extra:
        clip_grads_with_norm_(extra, max_norm, total)
    return total
