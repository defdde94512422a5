"""torch.compile as a pipeline stage (after surgery, sharding and checkpointing
wrappers, before data-parallel wrapping, as torchtitan does)."""
from __future__ import annotations

from tfx.core import Stage, Technique
from tfx.model.anatomy import anatomy_of


class Compile(Technique):
    stage = Stage.COMPILE
    name = "compile"

    def __init__(self, mode: str = "default") -> None:
        self.mode = mode

    def apply_to_model(self, model, ctx):
        # Compile each block rather than the whole model: the blocks are identical, so
        # one graph is reused, compile time stays flat in depth, and wrappers
        # (FSDP2, checkpointing, pipeline stages) keep working at block granularity.
        # Module.compile() compiles in place, so state_dict keys stay unchanged. The
        # decoder layers come from the model's anatomy (tfx GPT, HF Llama, HF GPT-2).
        for block in anatomy_of(model).decoder_layers(model):
            block.compile(mode=self.mode)
        return model
