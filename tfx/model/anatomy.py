"""Model anatomy: one small table per model family answering what techniques ask,
so no technique needs to know a model class.

    anat = anatomy_of(model)            # works through DDP / torch.compile wrappers
    for i, layer in enumerate(anat.decoder_layers(model)):
        parts = anat.attention(layer)   # q, k, v, o (or fused qkv), heads, KV heads
        mlp = anat.mlp(layer)           # up, gate (None without a GLU), down
    logits, hidden = anat.logits_and_hidden(model, input_ids)

Families: tfx's own GPT (``tfx_gpt``), Hugging Face Llama-like decoders
(``hf_llama``: Llama, Mistral, Qwen2/3, SmolLM2, ... anything with
``model.layers[i].self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``) and
HF GPT-2 (``hf_gpt2``, fused ``c_attn`` Conv1D). The references are llm-compressor's
"sequential targets" and torchtitan's per-model parallelize functions: a family is
a handful of attribute paths, not branches in every technique.

Head counts are read from the projection shapes (not the config), so they stay
right after head pruning, low-rank factorization (``Sequential`` of Linears) and
GPT-2's ``Conv1D``; names are fully qualified relative to the unwrapped model. After
projections are resized, :meth:`Anatomy.refresh_layer` updates a layer's own size
attributes and :meth:`Anatomy.sync_config` the model's HF config where one config can
describe the result. :func:`spec_block_linears` gives the block Linears' widths of the
model a ``model`` group spec builds, from a weightless (meta-device) copy, for
``validate`` checks; :func:`require_anatomy` refuses a spec with no family.
Tensor-parallel plans live with the TP technique (:func:`tfx.parallel.tp.hf_llama_plan`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn

from tfx.core.errors import ConfigError
from tfx.model.gpt import GPT, GPTConfig


@dataclass(frozen=True)
class AttnParts:
    """A layer's attention projections. ``q``/``k``/``v`` are ``None`` when the family
    fuses them into one module (``qkv``, GPT-2's ``c_attn``, output ``[q | k | v]``)."""
    q: Optional[nn.Module]
    k: Optional[nn.Module]
    v: Optional[nn.Module]
    o: nn.Module
    n_heads: int
    n_kv_heads: int
    head_dim: int
    qkv: Optional[nn.Module] = None

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def inputs(self) -> list[nn.Module]:
        """The modules that read the layer input (fused or not), in q, k, v order."""
        return [self.qkv] if self.qkv is not None else [self.q, self.k, self.v]


@dataclass(frozen=True)
class MLPParts:
    up: nn.Module
    gate: Optional[nn.Module]  # None for a plain (non-GLU) MLP
    down: nn.Module


@dataclass(frozen=True)
class Embeddings:
    token: Optional[nn.Module]     # None on a pipeline stage that does not own it
    position: Optional[nn.Module]  # None for rotary models (Llama)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP (``.module``), torch.compile (``._orig_mod``) and
    tfx's wrapper of Hugging Face models (:class:`tfx.model.hf.CausalLM`, ``.lm``)."""
    while True:
        # no `a or b`: truthiness of an OptimizedModule calls len() on the wrapped
        # model, which HF models do not support
        inner = getattr(model, "module", None)
        inner = inner if inner is not None else getattr(model, "_orig_mod", None)
        if inner is None and getattr(type(model), "wraps_lm", False):
            inner = model.lm
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` stored ``(in, out)``,
    i.e. a Linear with a transposed weight. Looked up only if transformers is already
    loaded, so tfx-only runs never import it."""
    pt = sys.modules.get("transformers.pytorch_utils")
    return pt is not None and isinstance(m, pt.Conv1D)


def _is_linear_like(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def out_features(m: nn.Module) -> int:
    """Output width of a Linear, a GPT-2 ``Conv1D`` (``nf``), or a chain of them
    (low-rank's ``Sequential(Linear(in, r), Linear(r, out))``: its last module's)."""
    if isinstance(m, nn.Sequential):
        return out_features(m[-1])
    if is_conv1d(m):
        return int(m.nf)
    return int(m.out_features)


def in_features(m: nn.Module) -> int:
    """Input width of a Linear, a GPT-2 ``Conv1D`` or a chain of them (its first module's)."""
    if isinstance(m, nn.Sequential):
        return in_features(m[0])
    if is_conv1d(m):
        return int(m.weight.shape[0])
    return int(m.in_features)


class Anatomy:
    """Attribute paths of one family. Methods take the (possibly wrapped) model."""

    family = "base"
    layers_path = ""  # dotted path of the container of decoder layers

    # -- per family ------------------------------------------------------------------
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def attention(self, layer: nn.Module) -> AttnParts:
        raise NotImplementedError

    def mlp(self, layer: nn.Module) -> MLPParts:
        raise NotImplementedError

    def embeddings(self, model: nn.Module) -> Embeddings:
        raise NotImplementedError

    def head(self, model: nn.Module) -> Optional[nn.Module]:
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> Optional[nn.Module]:
        raise NotImplementedError

    def logits_and_hidden(self, model: nn.Module, input_ids: torch.Tensor):
        """``(logits (B, T, V), final hidden state (B, T, d) after the final norm)``."""
        raise NotImplementedError

    def refresh_layer(self, layer: nn.Module) -> None:
        """Update a layer's own size attributes after its projections were resized
        (structured pruning, reloading a pruned state dict). Families whose forward
        reads every size from the weights (``view(..., -1, head_dim)``) need nothing."""

    def sync_config(self, model: nn.Module) -> Optional[str]:
        """Write the projections' current sizes (heads, KV heads, MLP width) into the
        model's own config, so it describes the weights again (``save_pretrained`` and
        ``from_pretrained`` then round-trip). Returns None when the config now fits,
        else why no config of this family can describe them (e.g. layers differ)."""
        return None

    # -- shared --------------------------------------------------------------------
    def _container(self, model: nn.Module) -> nn.Module:
        return unwrap(model).get_submodule(self.layers_path)

    def layer_container(self, model: nn.Module) -> nn.Module:
        """The ``ModuleList``/``ModuleDict`` holding the decoder layers. Replace layer
        ``key`` (a :meth:`named_decoder_layers` name's last part) with
        ``setattr(container, key, new)``: works for both kinds and keeps the names."""
        return self._container(model)

    def named_decoder_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(fully qualified name, layer)`` in forward order; names keep the original
        index, so a pipeline stage that dropped layers still names them right."""
        container = self._container(model)
        is_dict = isinstance(container, nn.ModuleDict)
        items = container.items() if is_dict else container.named_children()
        return [(f"{self.layers_path}.{k}", layer) for k, layer in items]

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        return [layer for _, layer in self.named_decoder_layers(model)]

    def layer_prefix(self, i: int) -> str:
        """Fully qualified name of decoder layer ``i`` (e.g. ``model.layers.3``)."""
        return f"{self.layers_path}.{i}"

    def block_linears(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Linear(-like) modules inside the decoder layers, fully qualified. Embeddings
        and the head are left out on purpose: the head is usually tied to the token
        embedding, so compressing it would silently untie or change both."""
        return [(f"{prefix}.{name}", m) for prefix, layer in self.named_decoder_layers(model)
                for name, m in layer.named_modules() if _is_linear_like(m)]

    def tied(self, model: nn.Module) -> bool:
        """Whether the head shares its weight with the token embedding."""
        head, tok = self.head(model), self.embeddings(model).token
        return head is not None and tok is not None and head.weight is tok.weight

    def n_layers(self, model: nn.Module) -> int:
        return len(self.named_decoder_layers(model))


class GPTAnatomy(Anatomy):
    family = "tfx_gpt"
    layers_path = "layers"

    @classmethod
    def matches(cls, model):
        return isinstance(model, GPT)

    def attention(self, layer):
        a = layer.attn
        n_heads = out_features(a.q_proj) // a.head_dim
        return AttnParts(q=a.q_proj, k=a.k_proj, v=a.v_proj, o=a.o_proj, n_heads=n_heads,
                         n_kv_heads=out_features(a.k_proj) // a.head_dim, head_dim=a.head_dim)

    def mlp(self, layer):
        return MLPParts(up=layer.mlp.fc, gate=None, down=layer.mlp.proj)

    def embeddings(self, model):
        m = unwrap(model)
        return Embeddings(token=m.tok_emb, position=m.pos_emb)

    def head(self, model):
        return unwrap(model).head

    def final_norm(self, model):
        return unwrap(model).norm

    def logits_and_hidden(self, model, input_ids):
        return model(input_ids, return_hidden=True)


class _HFAnatomy(Anatomy):
    """HF causal LMs: ``output_hidden_states``' last entry is taken after the final
    norm in both Llama and GPT-2 (checked in tests against ``head(hidden)``)."""

    def head(self, model):
        return unwrap(model).lm_head

    def logits_and_hidden(self, model, input_ids):
        out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
        return out.logits, out.hidden_states[-1]


class LlamaAnatomy(_HFAnatomy):
    family = "hf_llama"
    layers_path = "model.layers"

    @classmethod
    def matches(cls, model):
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if not hasattr(model, "config") or not hasattr(model, "lm_head") or not layers:
            return False
        first = layers[0]
        attn, mlp = getattr(first, "self_attn", None), getattr(first, "mlp", None)
        return (all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
                and all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")))

    def attention(self, layer):
        a = layer.self_attn
        head_dim = a.head_dim
        return AttnParts(q=a.q_proj, k=a.k_proj, v=a.v_proj, o=a.o_proj,
                         n_heads=out_features(a.q_proj) // head_dim,
                         n_kv_heads=out_features(a.k_proj) // head_dim, head_dim=head_dim)

    def mlp(self, layer):
        return MLPParts(up=layer.mlp.up_proj, gate=layer.mlp.gate_proj, down=layer.mlp.down_proj)

    def embeddings(self, model):
        return Embeddings(token=unwrap(model).model.embed_tokens, position=None)

    def sync_config(self, model):
        """``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size`` from
        the projections; ``head_dim`` is written out so it no longer derives from
        ``hidden_size / num_attention_heads``. One value per field for the whole model:
        a Llama config cannot give layers different sizes."""
        inner = unwrap(model)
        sizes = {(a.n_heads, a.n_kv_heads, out_features(self.mlp(layer).up))
                 for layer in self.decoder_layers(inner) for a in [self.attention(layer)]}
        if len(sizes) != 1:
            return ("its decoder layers now differ in (heads, KV heads, MLP width): "
                    f"{sorted(sizes)}, which a Llama config cannot express")
        heads, kv, width = sizes.pop()
        cfg = inner.config
        cfg.head_dim = self.attention(self.decoder_layers(inner)[0]).head_dim
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size = heads, kv, width
        return None

    def final_norm(self, model):
        return unwrap(model).model.norm


class GPT2Anatomy(_HFAnatomy):
    family = "hf_gpt2"
    layers_path = "transformer.h"

    @classmethod
    def matches(cls, model):
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) == "gpt2" and hasattr(model, "transformer")

    def attention(self, layer):
        a = layer.attn
        # c_attn is Conv1D(3d, d): weight (d, 3d), out features in ``nf``
        n_heads = out_features(a.c_attn) // 3 // a.head_dim
        return AttnParts(q=None, k=None, v=None, o=a.c_proj, n_heads=n_heads,
                         n_kv_heads=n_heads, head_dim=a.head_dim, qkv=a.c_attn)

    def mlp(self, layer):
        return MLPParts(up=layer.mlp.c_fc, gate=None, down=layer.mlp.c_proj)

    def embeddings(self, model):
        t = unwrap(model).transformer
        return Embeddings(token=t.wte, position=t.wpe)

    def refresh_layer(self, layer):
        """GPT-2 splits ``c_attn``'s output into q, k, v by ``split_size`` (the attention
        width), so it follows the fused projection's width; views use ``-1`` heads."""
        a = layer.attn
        a.split_size = out_features(a.c_attn) // 3
        a.num_heads = a.split_size // a.head_dim

    def sync_config(self, model):
        """Only ``n_inner`` (the MLP width) can change: GPT-2's config derives the head
        width from ``n_embd / n_head``, so fewer heads with the same ``n_embd`` has no
        config."""
        inner = unwrap(model)
        cfg, layers = inner.config, self.decoder_layers(inner)
        heads = {self.attention(layer).n_heads for layer in layers}
        widths = {out_features(self.mlp(layer).up) for layer in layers}
        if heads != {cfg.n_head}:
            return (f"attention heads were removed ({sorted(heads)} per layer of {cfg.n_head}), and "
                    "a GPT-2 config ties the head width to n_embd / n_head")
        if len(widths) != 1:
            return f"its decoder layers now differ in MLP width ({sorted(widths)})"
        width = widths.pop()
        cfg.n_inner = None if width == 4 * cfg.n_embd else width
        return None

    def final_norm(self, model):
        return unwrap(model).transformer.ln_f


# Order matters only if two families could match one model; they cannot today.
FAMILIES: tuple[type[Anatomy], ...] = (GPTAnatomy, LlamaAnatomy, GPT2Anatomy)


def anatomy_of(model: nn.Module) -> Anatomy:
    """The anatomy of ``model``'s family (wrappers are looked through)."""
    inner = unwrap(model)
    for family in FAMILIES:
        if family.matches(inner):
            return family()
    names = ", ".join(f.family for f in FAMILIES)
    raise ConfigError(f"model class {type(inner).__name__} has no tfx anatomy (known families: "
                      f"{names}); add one in tfx/model/anatomy.py")


def require_own_gpt(plan, option: str, why: str) -> None:
    """Refuse, in ``validate``, a technique that only knows tfx's own GPT when the plan's
    model is another family (it would otherwise find no layer and silently do nothing)."""
    family = spec_family(getattr(plan, "model", None))
    if family is not None and family != GPTAnatomy.family:
        raise ConfigError(f"{option} {why} of tfx's own GPT only; {family} models are not "
                          f"supported yet (compression=prune, nm, structured, ptq, qat, lowrank, "
                          f"wanda, sparsegpt and gptq work on them)")


def require_anatomy(plan, option: str) -> Optional[str]:
    """Refuse, in ``validate``, a model spec whose family tfx has no anatomy for (the
    technique would find no decoder layer); returns the family (None: no spec)."""
    spec = getattr(plan, "model", None)
    if spec is None:
        return None
    family = spec_family(spec)
    if family is None:
        names = ", ".join(f.family for f in FAMILIES)
        raise ConfigError(f"{option} finds the decoder layers through a model anatomy, and "
                          f"{spec!r} has none (known families: {names}); add one in "
                          f"tfx/model/anatomy.py")
    return family


def spec_block_linears(spec) -> Optional[list[tuple[str, int, int]]]:
    """``(qualified name, in_features, out_features)`` of the block Linears (see
    :meth:`Anatomy.block_linears`) of the model a ``model`` group spec builds, known
    before any weight exists: the model is built on the meta device (no memory, no
    init). For ``validate`` checks of widths (N:M groups, quantization groups). None if
    the spec is unknown or cannot be built that way."""
    if spec is None:
        return None
    try:
        with torch.device("meta"):
            if isinstance(spec, GPTConfig):
                model = GPT(replace(spec, vocab_size=spec.vocab_size or 8,
                                    block_size=spec.block_size or 8))
            elif getattr(spec, "config", None) is not None and is_hf_spec(spec):
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_config(spec.config)
            else:
                return None
        anatomy = anatomy_of(model)
    except (ConfigError, ValueError, TypeError, ImportError):
        return None
    return [(name, in_features(m), out_features(m)) for name, m in anatomy.block_linears(model)]


def spec_family(spec) -> Optional[str]:
    """The family a ``model`` group spec builds, known before any tensor exists (for
    ``validate`` hooks, through ``plan.model``): ``tfx_gpt`` for :class:`GPTConfig`,
    the spec's own ``family`` otherwise (``hf_llama``, ``hf_gpt2``, None if unknown)."""
    if spec is None:
        return None
    if isinstance(spec, GPTConfig):
        return GPTAnatomy.family
    return getattr(spec, "family", None)


def is_hf_spec(spec) -> bool:
    """Whether a ``model`` group spec builds a Hugging Face model (it then brings
    its own tokenizer, see :meth:`tfx.model.hf.HFModel.tokenizer_config`)."""
    return spec is not None and callable(getattr(spec, "tokenizer_config", None))


__all__ = ["AttnParts", "MLPParts", "Embeddings", "Anatomy", "anatomy_of", "unwrap", "FAMILIES",
           "spec_family", "is_hf_spec", "is_conv1d", "in_features", "out_features", "require_anatomy",
           "spec_block_linears"]
