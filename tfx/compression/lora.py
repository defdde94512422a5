"""LoRA fine-tuning (Hu et al. 2021) through Hugging Face ``peft`` (``compression=lora``).

Each targeted Linear ``W`` (out x in) becomes ``W x + (alpha / rank) * B A dropout(x)``
with ``A`` (rank x in, Kaiming-uniform) and ``B`` (out x rank, zeros), so the model
computes exactly what it computed before until the first step. Every other parameter
(base weights, embeddings, norms, biases) is frozen (``requires_grad=False``), so the
optimizer factories, which skip frozen parameters, only see ``A`` and ``B``: a targeted
Linear adds ``rank * (in + out)`` trainable parameters.

The adapters are peft's (``LoraConfig`` + ``LoraModel``, which injects them in place and
freezes the rest); nothing of LoRA is written here. What tfx adds:

* ``target_modules`` are matched as peft matches a list (a module whose qualified name is
  the entry or ends with ``"." + entry``), but only against the Linear(-like) modules of
  the decoder layers (:meth:`tfx.model.anatomy.Anatomy.block_linears`): a name that
  matches nothing there, or that reaches outside them (``lm_head``: tied to the
  embedding in most models, so merging into it would change the embedding too), is a
  one-line :class:`ConfigError` listing the names available. peft is then given the
  exact qualified names found;
* :meth:`LoRA.export` merges the adapters into the base weights in place
  (``merge_and_unload``) at the end of a run, so the ``hf_model/`` folder written next by
  :func:`tfx.model.export_hf` is a plain model that ``AutoModelForCausalLM.from_pretrained``
  loads without peft, with the trained LoRA model's logits (to float32 round-off).
  The checkpoints keep the unmerged adapters: a resume, ``load_run`` or ``evaluate.py
  run=...`` re-applies the technique (SURGERY, before the weights load) and gets the same
  structure back. The choice of layers comes from the config alone, so nothing is
  recorded in :meth:`~tfx.core.Technique.structure`.

Families: HF Llama-like (``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj``), tfx's own GPT (``q_proj, k_proj, v_proj, o_proj, fc, proj``; with
``from_checkpoint`` to adapt a trained run) and HF GPT-2 (``c_attn, c_proj, c_fc``:
transformers' ``Conv1D``, given to peft with ``fan_in_fan_out=True``).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

from torch import nn

from tfx.core.context import RunContext
from tfx.core.errors import ConfigError
from tfx.core.technique import Plan, Stage, Technique
from tfx.model.anatomy import anatomy_of, spec_family, unwrap
from tfx.model.size import count_params

#: attention projections of Llama-like models and of tfx's GPT (the LoRA paper's choice
#: was q and v; adapting all four is the common default of recent recipes)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
FAMILIES = ("tfx_gpt", "hf_llama", "hf_gpt2")
ADAPTER = "default"  # peft's adapter name: state-dict keys end in lora_A.default.weight


def check_lora_values(rank, alpha, dropout, target_modules) -> List[str]:
    """Raise a one-line :class:`ConfigError` for a bad value; return the target names."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"compression.lora.rank={rank!r} must be an integer >= 1 (e.g. 8 or 16)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ConfigError(f"compression.lora.alpha={alpha!r} must be a number > 0 "
                          f"(the update is scaled by alpha / rank; e.g. alpha = 2 * rank)")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"compression.lora.dropout={dropout!r} must be in [0, 1)")
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules or [])
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"compression.lora.target_modules={target_modules!r} must be a non-empty "
                          f"list of module names, e.g. [{', '.join(DEFAULT_TARGETS)}]")
    return [n.strip() for n in names]


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of names (tuners_utils.check_target_module_exists)
    return name == target or name.endswith("." + target)


def _short_names(names: Sequence[str]) -> List[str]:
    """Distinct last components (``q_proj``), in first-seen order."""
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))


def resolve_targets(model: nn.Module, target_modules: Sequence[str]) -> List[str]:
    """Qualified names (relative to ``unwrap(model)``) of the decoder-layer Linears that
    ``target_modules`` name; a one-line ConfigError for a name that matches none of them
    or that matches a module outside them."""
    inner = unwrap(model)
    layer_linears = [name for name, _ in anatomy_of(inner).block_linears(inner)]
    allowed = set(layer_linears)
    found: List[str] = []
    missing: List[str] = []
    for target in target_modules:
        hits = [n for n in layer_linears if _matches(n, target)]
        outside = [n for n, _ in inner.named_modules() if _matches(n, target) and n not in allowed]
        if outside:
            raise ConfigError(f"compression.lora.target_modules: {target!r} names {outside[0]}, which is "
                              f"not a Linear of a decoder layer; LoRA adapts only those: "
                              f"{', '.join(_short_names(layer_linears))}")
        if not hits:
            missing.append(target)
        found += [n for n in hits if n not in found]
    if missing:
        raise ConfigError(f"compression.lora.target_modules: {missing} match no Linear of the decoder "
                          f"layers; this model has {', '.join(_short_names(layer_linears))}")
    return found


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0,
               target_modules: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.05):
    """Inject LoRA adapters into ``model`` in place (through wrappers such as
    :class:`tfx.model.hf.CausalLM`) and freeze everything else.

    Returns peft's ``LoraModel`` around the (same, modified) inner model: keep it to merge
    the adapters later with ``tuner.merge_and_unload()``."""
    from peft import LoraConfig, LoraModel

    targets = resolve_targets(model, check_lora_values(rank, alpha, dropout, target_modules))
    inner = unwrap(model)
    conv1d = any(not isinstance(inner.get_submodule(n), nn.Linear) for n in targets)  # GPT-2
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=targets,
                        bias="none", fan_in_fan_out=conv1d)
    return LoraModel(inner, config, ADAPTER)


def trainable_params(model: nn.Module) -> int:
    """Parameters the optimizer gets (``requires_grad``), tied weights counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


class LoRA(Technique):
    """``compression=lora``: train low-rank adapters on frozen weights; merge them at export.

    Keys (``conf/compression/lora.yaml``): ``rank`` (r), ``alpha`` (scale alpha / r),
    ``target_modules`` (names of decoder-layer Linears, matched as peft matches a list),
    ``dropout`` (on the adapter's input), ``from_checkpoint`` (a trained tfx run to adapt,
    loaded by the build order before SURGERY; HF models come pretrained).

    Reports ``lora/trainable_params`` and ``lora/trainable_fraction`` (of all parameters,
    adapters included, as peft's ``print_trainable_parameters``) through :meth:`metrics`,
    so ``summary.json`` shows them next to ``params``, ``peak_mem_mb`` and ``tokens_per_sec``.
    """

    name = "lora"
    stage = Stage.SURGERY

    def __init__(self, rank: int = 8, alpha: float = 16.0,
                 target_modules: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.05,
                 from_checkpoint: Optional[str] = None) -> None:
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.target_modules = target_modules
        self.from_checkpoint = from_checkpoint  # loaded by the build order before SURGERY
        self.targets: List[str] = []
        self.n_trainable = self.n_params = 0
        self._tuner = None

    def validate(self, plan: Plan) -> None:
        check_lora_values(self.rank, self.alpha, self.dropout, self.target_modules)
        family = spec_family(plan.model)
        if plan.model is not None and family not in FAMILIES:
            raise ConfigError(f"compression=lora knows the decoder layers of {', '.join(FAMILIES)} models; "
                              f"{family or type(plan.model).__name__} has no tfx anatomy")
        # Every other SURGERY technique rewrites or masks the same Linears (pruning, low-rank,
        # QAT, one-shot methods), exports them before the merge (ptq, compressed_export), adds
        # a student head (distill) or swaps attention kernels (tfx GPT's sparse attention);
        # none of those combinations is tested, so none is allowed (a declared fact saying
        # "rewrites the block Linears" would let the harmless ones through).
        others = [t.key for t in plan.techniques if t.stage == Stage.SURGERY and t is not self]
        if others:
            raise ConfigError(f"compression=lora does not combine with {others} (they also change the "
                              f"layers LoRA wraps, or export them before the merge); use compression=lora "
                              f"alone")
        layout = [t.key for t in plan.techniques if t.stage in (Stage.PIPELINE, Stage.TENSOR)]
        if layout or plan.facts().shards_parameters:
            what = layout or ["fsdp"]
            raise ConfigError(f"compression=lora with {what} is not supported (the adapters wrap the "
                              f"Linears that tensor/pipeline plans split, and the merge at export needs "
                              f"whole weights on rank 0); use parallel=ddp or parallel=single")

    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self._tuner = apply_lora(model, self.rank, self.alpha, self.target_modules, self.dropout)
        self.targets = list(self._tuner.targeted_module_names)
        self.n_trainable, self.n_params = trainable_params(model), count_params(model)
        return model

    def metrics(self) -> Dict[str, float]:
        if not self.n_params:
            return {}
        return {"lora/trainable_params": float(self.n_trainable),
                "lora/trainable_fraction": self.n_trainable / self.n_params}

    def export(self, model: nn.Module, out_dir, ctx: RunContext) -> Dict[str, float]:
        """Merge ``B A * alpha / rank`` into each base weight, in place, and drop the
        adapters: the run is over (its checkpoints keep the unmerged adapters), and the
        HF export that follows (``hf_model/``) then saves a plain model."""
        if self._tuner is None:
            return {}
        self._tuner.merge_and_unload(safe_merge=True)  # safe: refuses a non-finite merge
        self._tuner = None
        return {"lora/merged_linears": float(len(self.targets))}
