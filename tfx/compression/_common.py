"""Helpers shared by the compression techniques: which modules they act on (through the
model anatomy, so tfx's GPT, HF Llama and HF GPT-2 alike) and the few operations that
must treat ``nn.Linear`` and GPT-2's transposed ``Conv1D`` the same way."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from tfx.core.errors import ConfigError
from tfx.model.anatomy import anatomy_of, is_conv1d, unwrap  # noqa: F401  (re-exported)


def refuse_layouts(plan, what: str, why: str, pipeline: bool = False) -> None:
    """One line in validate when a technique declares ``shards_parameters`` (FSDP2,
    tensor parallel: DTensor parameters) -- or, with ``pipeline``, splits the model into
    pipeline stages -- and ``what`` needs whole weights in one process (``why``). Found
    by scripts/compat.py: these combinations crashed in the workers at export time."""
    from tfx.core.technique import Stage

    layouts = [t.key for t in plan.techniques
               if t.shards_parameters or (pipeline and t.stage == Stage.PIPELINE)]
    if layouts:
        raise ConfigError(f"{what} {why}, but {' + '.join(layouts)} split the parameters across ranks; "
                          f"use parallel=ddp or parallel=single")


def prefix_of(outer: nn.Module, inner: nn.Module) -> str:
    """The qualified-name prefix of ``inner`` inside ``outer`` (``""``, ``"lm."``, ...)."""
    if outer is inner:
        return ""
    name = next(n for n, m in outer.named_modules() if m is inner)
    return f"{name}."


def strip_wrappers(model: nn.Module) -> nn.Module:
    """``model`` without DDP (``.module``) and torch.compile (``._orig_mod``) wrappers but
    *with* tfx's wrapper of an HF model: the module the build order builds, whose
    state-dict keys exports use, so a freshly built model loads them."""
    while True:
        inner = getattr(model, "module", None)
        inner = inner if inner is not None else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


CHECKPOINT_SEGMENT = "_checkpoint_wrapped_module."  # the child torch's checkpoint_wrapper adds


def modules_by_key(model: nn.Module) -> Dict[str, nn.Module]:
    """``model.named_modules()`` under the names its state-dict keys use: without the
    segment torch's ``checkpoint_wrapper`` adds (activation checkpointing wraps blocks
    after compression techniques have recorded their layers by name)."""
    return {name.replace(CHECKPOINT_SEGMENT, ""): m for name, m in model.named_modules()}


def block_linears(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The Linear(-like) modules inside the decoder layers, named relative to ``model``
    (so ``model.get_submodule(name)`` and ``model.state_dict()`` keys agree with them,
    e.g. ``lm.model.layers.0.self_attn.q_proj`` under tfx's HF wrapper).

    Found through the model anatomy: tfx's GPT (``layers.*``), HF Llama (q/k/v/o,
    gate/up/down) and HF GPT-2 (``c_attn``, ``c_proj``, ``c_fc``: transformers
    ``Conv1D``, weight stored ``(in, out)``). Embeddings and the head are left out on
    purpose: the head is usually tied to the token embedding, so pruning, factorizing
    or quantizing it would silently untie the two (or change the embedding too), and
    the embedding is a lookup, not a matmul. A model without an anatomy has none.
    """
    inner = unwrap(model)
    try:
        anatomy = anatomy_of(inner)
    except ConfigError:
        return []
    prefix = prefix_of(model, inner)
    return [(prefix + name, m) for name, m in anatomy.block_linears(inner)]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def weight_matrix(module: nn.Module, weight: torch.Tensor = None) -> torch.Tensor:
    """``weight`` (default: the module's) as ``(out_features, in_features)``: a transposed
    view for GPT-2's ``Conv1D``."""
    w = module.weight if weight is None else weight
    return w.t() if is_conv1d(module) else w


def to_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what ``module`` (a Linear or GPT-2 ``Conv1D``) computes.
    torchao's ``quantize_`` and its QAT swap only ``nn.Linear``; a Conv1D is a Linear
    with a transposed weight, so it is turned into one first."""
    if isinstance(module, nn.Linear):
        return module
    w = module.weight.detach()
    lin = nn.Linear(w.shape[0], w.shape[1], bias=module.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.t())
        if module.bias is not None:
            lin.bias.copy_(module.bias)
    return lin


def conv1d_to_linear(model: nn.Module) -> List[str]:
    """Replace every block ``Conv1D`` of ``model`` by an equal ``nn.Linear`` (in place);
    returns the names replaced (none for tfx's GPT and Llama)."""
    done = []
    for name, m in block_linears(model):
        if is_conv1d(m):
            set_submodule(model, name, to_linear(m))
            done.append(name)
    return done


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
