"""Tensor parallel + sequence parallel (Megatron-style) with ``parallelize_module``.

Attention q/k/v and MLP fc are split column-wise (each rank owns whole heads / a
slice of the hidden units), o_proj and proj row-wise. With sequence parallel the
norms and residual stream between blocks are sharded along the sequence, so the
all-reduces become reduce-scatter + all-gather and activation memory shrinks.
With loss parallel the head's output stays sharded along the vocabulary and the
cross-entropy is computed without gathering the logits.

Tied embeddings: ``tok_emb`` is sharded row-wise (along the vocabulary) and ``head``
column-wise, both ``Shard(0)`` of the same (vocab, d) matrix, so the tie is
restored after sharding and the two keep sharing one DTensor parameter.

Hugging Face Llama-like models (``hf_llama``: Llama, SmolLM2, Qwen2, ...): the decoder
layers follow the model's own ``config.base_model_tp_plan`` (transformers' plan:
``colwise`` q/k/v and gate/up, ``rowwise`` o and down), mapped to torch's
``ColwiseParallel``/``RowwiseParallel``; embeddings, head, sequence and loss parallel
are added as for tfx's GPT (``input_layernorm``, ``post_attention_layernorm`` and the
final ``norm`` become ``SequenceParallel``). transformers' attention reshapes with
``-1`` heads, so each rank runs its local query and KV heads with no change to the
modules; GQA needs the KV heads to divide by the degree. HF GPT-2 is refused: its fused
``c_attn`` (Conv1D, weight stored ``(in, out)``) is split into q, k, v at the full
width (``split_size``), which a column shard breaks.
"""
from __future__ import annotations

import contextlib
from typing import Optional

from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, loss_parallel, parallelize_module)

from tfx.core import ConfigError, RunContext, Stage
from tfx.model.anatomy import anatomy_of, spec_family, unwrap
from tfx.parallel.base import ParallelTechnique
from tfx.parallel.clip import clip_grad_norm


def _block_plan(sequence_parallel: bool) -> dict:
    resid = Shard(1) if sequence_parallel else Replicate()
    plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(), "attn.o_proj": RowwiseParallel(output_layouts=resid),
            "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel(output_layouts=resid)}
    if sequence_parallel:
        gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        plan.update({"ln1": SequenceParallel(), "ln2": SequenceParallel(), "attn": gather, "mlp": gather})
    return plan


def _root_plan(model: nn.Module, sequence_parallel: bool, loss_parallel_: bool) -> dict:
    plan = {}
    if model.tok_emb is not None:
        plan["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    first = next(iter(model.layers))
    if sequence_parallel:
        plan[f"layers.{first}"] = PrepareModuleInput(input_layouts=(Replicate(),),
                                                     desired_input_layouts=(Shard(1),),
                                                     use_local_output=True)
        if model.norm is not None:
            plan["norm"] = SequenceParallel()
    if model.head is not None:
        plan["head"] = ColwiseParallel(input_layouts=Shard(1) if sequence_parallel else Replicate(),
                                       output_layouts=Shard(-1) if loss_parallel_ else Replicate(),
                                       use_local_output=not loss_parallel_)
    return plan


def check_divisible(model: nn.Module, tp: int) -> None:
    cfg = model.cfg
    for what, n in (("model.n_head", cfg.n_head), ("model.d_ff", cfg.d_ff), ("vocab size", cfg.vocab_size)):
        if n % tp:
            raise ConfigError(f"tensor parallel degree {tp} does not divide {what}={n}; "
                              f"choose a tensor-parallel degree that divides it")


def apply_tp(model: nn.Module, mesh: DeviceMesh, sequence_parallel: bool = True,
             loss_parallel: bool = True) -> nn.Module:
    """Shard ``model`` (a GPT, possibly a pipeline stage, or an HF Llama-like model, bare
    or in tfx's ``CausalLM`` wrapper) over the 1-D ``mesh``."""
    if anatomy_of(model).family == "hf_llama":
        return apply_tp_hf_llama(model, mesh, sequence_parallel, loss_parallel)
    if not hasattr(model, "cfg") or not hasattr(model, "layers"):
        raise ConfigError(f"tensor parallel has a plan for tfx's GPT and HF Llama-like models "
                          f"only, not {type(unwrap(model)).__name__}")
    check_divisible(model, mesh.size())
    tied = model.tok_emb is not None and model.head is not None and model.head.weight is model.tok_emb.weight
    parallelize_module(model, mesh, _root_plan(model, sequence_parallel, loss_parallel))
    for block in model.layers.values():
        parallelize_module(block, mesh, _block_plan(sequence_parallel))
    if tied:
        model.head.weight = model.tok_emb.weight
    return model


# --- Hugging Face Llama-like models ------------------------------------------------------

#: transformers' plan styles tfx maps onto torch's ParallelStyles
_HF_STYLES = ("colwise", "rowwise")
#: per-layer parameters outside the base plan that tfx's plan handles: replicated norms
#: (``SequenceParallel`` under sequence parallel)
_HF_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def _hf_layer_plan(config) -> dict:
    """``config.base_model_tp_plan`` relative to one decoder layer: ``{"self_attn.q_proj":
    "colwise", ...}`` (its keys are ``layers.*.<path>``)."""
    plan = dict(getattr(config, "base_model_tp_plan", None) or {})
    return {k[len("layers.*."):]: v for k, v in plan.items() if k.startswith("layers.*.")}


def hf_tp_problem(lm: nn.Module, tp: int) -> str:
    """Why tfx's plan cannot shard the HF Llama-like model ``lm`` (bare, possibly on the
    meta device) over ``tp`` ranks; ``''`` when it can. One sentence naming the value:
    the plan (styles tfx maps, parameters it leaves out), then the sizes the degree must
    divide (see :func:`hf_tp_size_problem`)."""
    layer_plan = _hf_layer_plan(lm.config)
    if not layer_plan:
        return f"{type(lm).__name__}'s config has no base_model_tp_plan for its decoder layers"
    odd = {k: v for k, v in layer_plan.items() if v not in _HF_STYLES}
    if odd:
        return (f"its base_model_tp_plan uses styles tfx does not map ({odd}); tfx maps "
                f"{' and '.join(_HF_STYLES)} only")
    for prefix, layer in anatomy_of(lm).named_decoder_layers(lm):
        for name, _ in layer.named_parameters():
            module = name.rsplit(".", 1)[0]
            if module not in layer_plan and module not in _HF_LAYER_NORMS:
                return (f"decoder-layer parameter {prefix}.{name} is outside its base_model_tp_plan "
                        f"and is not a layer norm, so its gradient would only see the local heads "
                        f"or units")
    return hf_tp_size_problem(lm, tp)


def hf_tp_size_problem(lm: nn.Module, tp: int) -> str:
    """The first of the query heads, KV heads (GQA), MLP width (per layer) and vocabulary
    that ``tp`` does not divide, as ``"num_key_value_heads=3 is not divisible by ..."``;
    ``''`` when it divides them all."""
    anat = anatomy_of(lm)
    for layer in anat.decoder_layers(lm):
        attn = anat.attention(layer)
        sizes = (("num_attention_heads", attn.n_heads), ("num_key_value_heads", attn.n_kv_heads),
                 ("intermediate_size", anat.mlp(layer).up.out_features),
                 ("vocab_size", lm.config.vocab_size))
        for key, n in sizes:
            if n % tp:
                return f"{key}={n} is not divisible by the tensor-parallel degree {tp}"
    return ""


def _require_call(module: nn.Module, keyword: bool) -> None:
    """Sequence parallel gathers the attention input by keyword (``hidden_states=``) and
    the MLP input by position, as ``LlamaDecoderLayer`` calls them; a model calling them
    otherwise would get the local sequence shard unnoticed, so refuse at the call."""
    def check(mod, args, kwargs):
        if ("hidden_states" in kwargs) != keyword:
            how = "hidden_states=..." if keyword else "hidden_states positionally"
            raise ConfigError(f"parallel.sequence_parallel=true expects {type(mod).__name__} to be "
                              f"called with {how} (as in LlamaDecoderLayer); set "
                              f"parallel.sequence_parallel=false for this model")
    module.register_forward_pre_hook(check, with_kwargs=True)


def hf_llama_plan(lm: nn.Module, sequence_parallel: bool = True, loss_parallel: bool = True) -> dict:
    """The ``parallelize_module`` plan for a bare HF Llama-like causal LM: the layers'
    entries of ``config.base_model_tp_plan`` as ``ColwiseParallel``/``RowwiseParallel``
    (row-wise outputs ``Shard(1)`` under sequence parallel), the token embedding row-wise
    (along the vocabulary), ``lm_head`` column-wise (logits left sharded along the
    vocabulary under loss parallel), and under sequence parallel the norms as
    ``SequenceParallel`` with the attention and MLP inputs gathered back to full length.
    """
    anat = anatomy_of(lm)
    layers = anat.layers_path                    # "model.layers"
    base = layers.rsplit(".", 1)[0]              # "model"
    resid = Shard(1) if sequence_parallel else Replicate()
    styles = {"colwise": ColwiseParallel, "rowwise": lambda: RowwiseParallel(output_layouts=resid)}
    plan: dict = {f"{layers}.*.{k}": styles[v]() for k, v in _hf_layer_plan(lm.config).items()}
    emb = anat.embeddings(lm).token
    plan[next(n for n, m in lm.named_modules() if m is emb)] = RowwiseParallel(
        input_layouts=Replicate(), output_layouts=Replicate())
    if sequence_parallel:
        first = anat.named_decoder_layers(lm)[0][0]
        plan[first] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                         use_local_output=True)
        for norm in _HF_LAYER_NORMS:
            plan[f"{layers}.*.{norm}"] = SequenceParallel()
        # LlamaDecoderLayer calls self_attn(hidden_states=...) and mlp(hidden_states)
        plan[f"{layers}.*.self_attn"] = PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": Shard(1)},
            desired_input_kwarg_layouts={"hidden_states": Replicate()})
        plan[f"{layers}.*.mlp"] = PrepareModuleInput(input_layouts=(Shard(1),),
                                                     desired_input_layouts=(Replicate(),))
        plan[f"{base}.norm"] = SequenceParallel()
    plan["lm_head"] = ColwiseParallel(input_layouts=Shard(1) if sequence_parallel else Replicate(),
                                      output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                      use_local_output=not loss_parallel)
    return plan


def apply_tp_hf_llama(model: nn.Module, mesh: DeviceMesh, sequence_parallel: bool = True,
                      loss_parallel: bool = True) -> nn.Module:
    """Shard an HF Llama-like model (bare or wrapped) over the 1-D ``mesh`` with
    :func:`hf_llama_plan`; a tied head stays tied (one ``Shard(0)`` DTensor)."""
    lm = unwrap(model)
    why = hf_tp_problem(lm, mesh.size())
    if why:
        raise ConfigError(f"parallel=tp cannot shard {type(lm).__name__}: {why}")
    tied = lm.lm_head.weight is lm.get_input_embeddings().weight
    if sequence_parallel:
        anat = anatomy_of(lm)
        for layer in anat.decoder_layers(lm):
            _require_call(layer.self_attn, keyword=True)
            _require_call(layer.mlp, keyword=False)
    parallelize_module(lm, mesh, hf_llama_plan(lm, sequence_parallel, loss_parallel))
    if tied:
        lm.lm_head.weight = lm.get_input_embeddings().weight
    return model


def _hf_spec_problem(spec, tp: int) -> str:
    """:func:`hf_tp_problem` for a ``model`` group spec as a ConfigError message
    ('' if none), found on a weightless (meta-device) copy of the model."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(spec.config)
    why = hf_tp_problem(shell, tp)
    if not why:
        return ""
    fix = ("set parallel.degree to a divisor of it, or use parallel=fsdp"
           if why == hf_tp_size_problem(shell, tp) else "use parallel=fsdp or parallel=ddp")
    return f"parallel=tp cannot shard this hf_llama model: {why}; {fix}"


class TensorParallel(ParallelTechnique):
    stage = Stage.TENSOR
    name = "tp"

    shards_parameters = True  # the plan's Linears (and embedding/head) become DTensor shards

    def __init__(self, nproc_per_node: Optional[int] = None, degree: Optional[int] = None,
                 sequence_parallel: bool = True, loss_parallel: bool = True) -> None:
        super().__init__(nproc_per_node)
        if degree is not None and degree < 1:
            raise ConfigError(f"parallel.degree={degree} must be >= 1 (null: all ranks)")
        self.degree = degree
        self.sequence_parallel = sequence_parallel
        self.loss_parallel = loss_parallel

    def validate(self, plan) -> None:
        super().validate(plan)
        family = spec_family(plan.model)
        tp = self.degree or plan.world_size
        if family == "hf_gpt2":
            raise ConfigError("parallel=tp has no plan for hf_gpt2: its fused c_attn (Conv1D) splits "
                              "q, k, v at the full width, which a column shard breaks; use "
                              "parallel=fsdp or parallel=ddp")
        if plan.model is not None and family not in ("tfx_gpt", "hf_llama"):
            raise ConfigError(f"parallel=tp has sharding plans for tfx's GPT and hf_llama models; "
                              f"{family or type(plan.model).__name__} is not one: use parallel=fsdp "
                              f"or parallel=ddp")
        if family == "hf_llama":
            problem = _hf_spec_problem(plan.model, tp)
            if problem:
                raise ConfigError(problem)
        if plan.world_size % tp:
            raise ConfigError(f"parallel tp degree={tp} does not divide the world size {plan.world_size}; "
                              f"set the degree to a divisor of {plan.world_size}")
        if plan.facts().skips_nonfinite and plan.facts().data_parallel != "fsdp":
            raise ConfigError("precision=fp16 does not combine with parallel=tp alone: its GradScaler "
                              "cannot unscale tensor-parallel (DTensor) and replicated plain "
                              "gradients together; use precision=bf16, or parallel=fsdp_tp (all "
                              "parameters DTensors)")
        if plan.world_size // tp > 1 and plan.facts().data_parallel != "fsdp":
            raise ConfigError(f"{plan.world_size} processes with tensor-parallel degree {tp} leave "
                              f"{plan.world_size // tp} data-parallel replicas but no data-parallel "
                              f"technique; use parallel=fsdp_tp or set degree={plan.world_size}")

    def device_mesh(self, ctx: RunContext):
        tp = self.degree or ctx.world_size
        dp = ctx.world_size // tp
        if dp == 1:
            return init_device_mesh(ctx.device_type, (tp,), mesh_dim_names=("tp",))
        return init_device_mesh(ctx.device_type, (dp, tp), mesh_dim_names=("dp", "tp"))

    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return apply_tp(model, ctx.mesh["tp"], self.sequence_parallel, self.loss_parallel)

    def _loss_context(self):
        return loss_parallel() if self.loss_parallel else contextlib.nullcontext()

    def step_context(self, model, info, ctx: RunContext):
        stack = contextlib.ExitStack()
        stack.enter_context(super().step_context(model, info, ctx))
        stack.enter_context(self._loss_context())
        return stack

    def backward_context(self, model, info, ctx: RunContext):
        stack = contextlib.ExitStack()
        stack.enter_context(super().backward_context(model, info, ctx))
        stack.enter_context(self._loss_context())
        return stack

    def clip_grad_norm(self, model, max_norm: float):
        return clip_grad_norm(model.parameters(), max_norm)
