"""Activation checkpointing of transformer blocks (decoder layers of any model with a
:mod:`tfx.model.anatomy`: tfx's GPT, HF Llama-like, HF GPT-2): full or selective.

* ``full``: a block keeps only its input; everything inside is recomputed in backward.
* ``selective``: torch's selective checkpoint contexts save the outputs of the
  matmuls (and attention) and recompute only the cheap pointwise ops (norms, GELU,
  residual adds): most of the memory saving for a fraction of the recompute.

Uses ``torch.distributed.algorithms._checkpoint.checkpoint_wrapper`` (what
torchtitan uses) so wrapped blocks keep working under FSDP2, DDP and compile.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from tfx.core import ConfigError, RunContext, Stage, Technique
from tfx.model.anatomy import anatomy_of

_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.linear.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _save_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_save_matmuls)


def apply_activation_checkpointing(model: nn.Module, mode: str = "full",
                                   every: int = 1) -> nn.Module:
    """Wrap every ``every``-th decoder layer of ``model`` in place and return the model.
    The layers come from the model's anatomy (tfx GPT ``layers``, HF Llama
    ``model.layers``, HF GPT-2 ``transformer.h``); each keeps its name in its container
    and the wrapper's state-dict hook drops its prefix, so checkpoints are unchanged."""
    if mode not in ("full", "selective"):
        raise ConfigError(f"memory.mode={mode!r}; choose 'full' or 'selective'")
    kwargs = {"preserve_rng_state": True}
    if mode == "selective":
        kwargs["context_fn"] = _selective_context
    anat = anatomy_of(model)
    container = anat.layer_container(model)
    for i, (name, block) in enumerate(anat.named_decoder_layers(model)):
        if i % every == 0:
            setattr(container, name.rsplit(".", 1)[1], checkpoint_wrapper(block, **kwargs))
    return model


class ActivationCheckpointing(Technique):
    stage = Stage.MEMORY

    def __init__(self, mode: str = "full", every: int = 1) -> None:
        if mode not in ("full", "selective"):
            raise ConfigError(f"memory.mode={mode!r}; choose 'full' or 'selective'")
        if every < 1:
            raise ConfigError(f"memory.every={every}; must be >= 1 (1 = every block)")
        self.mode, self.every = mode, every
        self.name = f"activation_ckpt_{mode}"

    def apply_to_model(self, model, ctx: RunContext):
        return apply_activation_checkpointing(model, self.mode, self.every)
