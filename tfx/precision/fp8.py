"""fp8 training through torchao's float8 (``precision=fp8``).

``convert_to_float8_training`` swaps the chosen ``nn.Linear`` layers for
``Float8Linear``: their matmuls run in float8 (e4m3 forward, e5m2 gradients) with
dynamic scales, everything else under bf16 autocast. The hardware path needs a CUDA GPU
with compute capability 8.9+ (Ada, Hopper); elsewhere the technique refuses in
``validate``. ``emulate: true`` runs torchao's emulation (fp8 rounding in high precision)
on any device: for correctness checks only, it is slower than bf16.

Small layers are excluded as torchao recommends (``auto_filter``: its per-recipe
filter, which skips dims not divisible by 16 and matmuls too small to gain on H100);
the output head (often tied to the embedding) is never converted. The yardstick for
what it buys at scale is torchtitan's published result: Llama-3.1-8B on 8xH100, FSDP +
torch.compile + float8 1.48x the tokens/s of FSDP alone. Use it with ``compile=true``:
without compile the casts are separate kernels and fp8 is rarely faster.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from tfx.core import ConfigError, RunContext, Stage, Technique

RECIPES = ("tensorwise", "rowwise")
#: never converted: the output layer (tied to the embedding in most models)
EXCLUDED = ("head", "lm_head")


def fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def convert_to_fp8(model: nn.Module, recipe: str = "tensorwise", auto_filter: bool = True,
                   emulate: bool = False) -> int:
    """Swap the model's eligible Linears for torchao ``Float8Linear`` in place; returns
    how many were converted."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear_utils import _auto_filter_for_recipe

    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    if auto_filter:
        keep = _auto_filter_for_recipe(recipe, filter_fqns=list(EXCLUDED))
    else:
        def keep(mod, fqn):
            return isinstance(mod, nn.Linear) and not any(e in fqn for e in EXCLUDED) \
                and mod.in_features % 16 == 0 and mod.out_features % 16 == 0
    before = sum(isinstance(m, nn.Linear) for m in model.modules())
    convert_to_float8_training(model, module_filter_fn=keep, config=config)
    return before - sum(type(m) is nn.Linear for m in model.modules())


class Float8Training(Technique):
    stage = Stage.PRECISION
    name = "fp8"

    def __init__(self, recipe: str = "tensorwise", auto_filter: bool = True, emulate: bool = False) -> None:
        if recipe not in RECIPES:
            raise ConfigError(f"precision.recipe={recipe!r}; choose one of {list(RECIPES)}")
        self.recipe, self.auto_filter, self.emulate = recipe, auto_filter, emulate
        self.compute_dtype = torch.bfloat16  # declared: autocast for the non-fp8 ops, FSDP policy
        self.converted = 0

    def validate(self, plan) -> None:
        if self.emulate:
            return
        if plan.device_type != "cuda" or not fp8_capable():
            where = "this machine has no CUDA GPU" if not torch.cuda.is_available() else \
                f"this GPU has compute capability {torch.cuda.get_device_capability()}"
            raise ConfigError(f"precision=fp8 needs a CUDA GPU with compute capability >= 8.9 "
                              f"(Ada/Hopper) and {where}; use precision=bf16, or "
                              f"precision.emulate=true to check numerics (slow)")

    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.converted = convert_to_fp8(model, self.recipe, self.auto_filter, self.emulate)
        return model

    def step_context(self, model, info, ctx: RunContext):
        return torch.autocast(ctx.device_type, dtype=self.compute_dtype) if not self.emulate \
            else contextlib.nullcontext()  # emulation checks fp8 rounding alone, in fp32

    def metrics(self):
        return {"fp8/converted_linears": float(self.converted)}
