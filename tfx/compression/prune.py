"""Unstructured magnitude pruning and N:M (2:4) masks with ``torch.nn.utils.prune``.

Every pruned ``Linear`` carries prune's reparametrisation (``weight_orig`` parameter,
``weight_mask`` buffer, ``weight = weight_orig * weight_mask`` recomputed before each
forward). That gives three things for free: pruned weights get zero gradient, so the
mask survives optimizer steps; the mask is a buffer, so it travels in the model
state_dict and through checkpoints; DDP broadcasts it like any other buffer.

The reparametrisation is installed once (``prune.identity``) when the technique is
applied, and schedule points overwrite the mask buffer in place with a mask computed
by prune's own ``L1Unstructured``. Re-running ``prune.l1_unstructured`` at every
schedule point would also work, but stacks a ``PruningContainer`` per call, and a
resumed run (which re-installs fresh reparametrisations, then loads the masks) would
carry a different hook history than the uninterrupted one.

The pruned modules are the block Linears the model anatomy names
(:func:`tfx.compression._common.block_linears`): tfx's GPT, HF Llama (q/k/v/o,
gate/up/down) and HF GPT-2, whose ``Conv1D`` stores its weight ``(in, out)``;
magnitude masks do not care, N:M groups are taken along the inputs either way.

Schedule positions (``start_step``, ``end_step``, ``frequency``, ``at_step``) are
optimizer steps (int) or fractions of ``trainer.max_steps`` (float,
:mod:`tfx.core.schedule`); the defaults are fractions, so the schedule fits any run.
"""
from __future__ import annotations

import math
from functools import reduce
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import prune

from tfx.compression._common import (block_linears, is_conv1d, refuse_layouts, strip_wrappers, unwrap,
                                     weight_matrix)
from tfx.compression.sparse_storage import save_sparse
from tfx.core.context import RunContext, StepInfo
from tfx.core.errors import ConfigError
from tfx.core.schedule import StepSpec, check_within, resolve_step
from tfx.core.technique import Plan, Stage, Technique
from tfx.model.anatomy import require_anatomy, spec_block_linears, spec_family


# -- plain functions -------------------------------------------------------------------
def install_masks(model: nn.Module, modules: Optional[List[nn.Module]] = None) -> List[nn.Linear]:
    """Give every block Linear (or each of ``modules``) an all-ones prune mask
    (idempotent) and return them."""
    mods = []
    for m in modules if modules is not None else [m for _, m in block_linears(model)]:
        if not prune.is_pruned(m):
            prune.identity(m, "weight")
        mods.append(m)
    return mods


def sparsity(model: nn.Module) -> float:
    """Fraction of zeros in the prunable (block Linear) weights."""
    zeros = total = 0
    for _, m in block_linears(model):
        w = m.weight_orig * m.weight_mask if prune.is_pruned(m) else m.weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(total, 1)


@torch.no_grad()
def magnitude_prune(model: nn.Module, amount: float, scope: str = "global") -> float:
    """Prune the block Linears to ``amount`` sparsity by |w| and return the sparsity.

    ``scope="layer"``: every layer keeps the same fraction (``l1_unstructured``);
    ``"global"``: one threshold over all layers (``global_unstructured``), so layers
    with small weights lose more. Masks only grow: weights already pruned stay pruned,
    which is what makes gradual pruning monotone.
    """
    if not 0.0 <= amount < 1.0:
        raise ConfigError(f"compression.prune.sparsity={amount} must be in [0, 1)")
    mods = install_masks(model)
    if scope == "layer":
        for m in mods:
            _update_mask(m.weight_mask, m.weight_orig, amount)
    elif scope == "global":
        masks = [m.weight_mask for m in mods]
        flat_mask = torch.cat([x.flatten() for x in masks])
        flat_w = torch.cat([m.weight_orig.detach().flatten() for m in mods])
        _update_mask(flat_mask, flat_w, amount)
        for mask, new in zip(masks, flat_mask.split([x.numel() for x in masks])):
            mask.copy_(new.view_as(mask))
    else:
        raise ConfigError(f"compression.prune.scope={scope!r}; choose 'global' or 'layer'")
    _refresh(mods)
    return sparsity(model)


def _refresh(mods: List[nn.Linear]) -> None:
    """Recompute ``weight = weight_orig * weight_mask`` now rather than at the next
    forward (what prune's forward-pre-hook does), so reads in between are not stale."""
    for m in mods:
        m.weight = m.weight_orig * m.weight_mask


def _update_mask(mask: torch.Tensor, weight: torch.Tensor, amount: float) -> None:
    """Prune the smallest still-unpruned weights until ``round(amount * n)`` are zero,
    using prune's ``L1Unstructured`` on the unpruned entries only."""
    already = int((mask == 0).sum())
    extra = round(amount * mask.numel()) - already
    if extra <= 0:
        return
    keep = mask.flatten().bool()
    sub = prune.L1Unstructured(amount=extra).compute_mask(
        weight.flatten()[keep], default_mask=torch.ones_like(weight.flatten()[keep]))
    flat = mask.flatten().clone()
    flat[keep] = sub.to(mask.dtype)
    mask.copy_(flat.view_as(mask))


def cubic_sparsity(step: int, final: float, start_step: int, end_step: int,
                   frequency: int, initial: float = 0.0) -> Optional[float]:
    """Zhu & Gupta (2017): ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3``.

    Returns the target at a schedule point (``t0, t0 + dt, ...`` and ``end_step``)
    and None between points or outside ``[start_step, end_step]``.
    """
    if step < start_step or step > end_step:
        return None
    if (step - start_step) % frequency and step != end_step:
        return None
    span = max(end_step - start_step, 1)
    frac = min((step - start_step) / span, 1.0)
    return final + (initial - final) * (1.0 - frac) ** 3


def is_masked(module: nn.Module) -> bool:
    """Whether ``module`` itself (not a child) carries a prune reparametrisation of its weight."""
    return "weight_orig" in module._parameters and hasattr(module, "weight_mask")


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold masks into the weights (``prune.remove``): plain Linears (or GPT-2
    ``Conv1D``) with zeros, the parameter names the model had before pruning."""
    for _, m in model.named_modules():
        if is_masked(m):
            prune.remove(m, "weight")
    return model


class NMUnstructured(prune.BasePruningMethod):
    """Keep the ``n`` largest |w| in every group of ``m`` consecutive inputs of a row.

    This is the layout of NVIDIA's 2:4 semi-structured sparsity (groups run along the
    reduction dimension, i.e. along each row of ``weight``), so the mask can be handed
    to ``to_sparse_semi_structured`` unchanged. prune has no N:M method; subclassing
    ``BasePruningMethod`` is its documented extension point.
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, n: int = 2, m: int = 4) -> None:
        if not 0 < n < m:
            raise ConfigError(f"N:M pruning needs 0 < n < m, got n={n}, m={m}")
        self.n, self.m = n, m

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        if t.shape[-1] % self.m:
            raise ConfigError(f"N:M pruning needs in_features divisible by m={self.m}, "
                              f"got a weight of shape {tuple(t.shape)}")
        groups = (t * default_mask).abs().reshape(-1, self.m)
        keep = groups.topk(self.n, dim=1).indices
        mask = torch.zeros_like(groups).scatter_(1, keep, 1.0)
        return mask.reshape(t.shape) * default_mask


@torch.no_grad()
def nm_prune(model: nn.Module, n: int = 2, m: int = 4) -> float:
    """Give every block Linear an N:M mask from its current magnitudes (groups of ``m``
    consecutive inputs of an output row, also for GPT-2's transposed ``Conv1D``)."""
    method = NMUnstructured(n, m)
    mods = install_masks(model)
    for mod in mods:
        w = weight_matrix(mod, mod.weight_orig)  # (out, in)
        mask = method.compute_mask(w, torch.ones_like(w))
        mod.weight_mask.copy_(weight_matrix(mod, mask))  # back to the module's layout
    _refresh(mods)
    return sparsity(model)


def to_semi_structured(model: nn.Module) -> nn.Module:
    """Swap 2:4-masked weights for ``SparseSemiStructuredTensor`` (CUDA, sm80+, fp16/bf16).

    Only the inference copy is converted; training keeps the dense masked weights.
    """
    from torch.sparse import to_sparse_semi_structured

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        raise ConfigError("2:4 sparse kernels need a CUDA GPU with compute capability >= 8.0; "
                          "on CPU the 2:4 model is exported as a masked dense model")
    make_permanent(model)
    if any(is_conv1d(mod) for _, mod in block_linears(model)):
        raise ConfigError("2:4 sparse kernels take nn.Linear weights; GPT-2's Conv1D layers "
                          "are exported as a masked dense model only")
    for _, mod in block_linears(model):
        mod.weight = nn.Parameter(to_sparse_semi_structured(mod.weight.detach()),
                                  requires_grad=False)
    return model


# -- techniques ---------------------------------------------------------------------
def check_nm_widths(plan: Plan, option: str, m: int) -> None:
    """Refuse, in ``validate``, an ``m`` that does not divide the input width of every
    block Linear of the model ``plan.model`` builds (read from a weightless copy)."""
    shapes = spec_block_linears(getattr(plan, "model", None))
    for name, fan_in, _ in shapes or ():
        if fan_in % m:
            widths = sorted({i for _, i, _ in shapes})
            g = reduce(math.gcd, widths)
            raise ConfigError(f"{option}.m={m} does not divide in_features={fan_in} of {name} "
                              f"({spec_family(plan.model)}); N:M groups are m consecutive inputs "
                              f"of a row, so m must divide every block Linear's input width "
                              f"({widths}): choose a divisor of {g}")


class _MaskTechnique(Technique):
    stage = Stage.SURGERY

    def validate(self, plan: Plan) -> None:
        # FSDP2 shards parameters into DTensors; prune's forward-pre-hook would then
        # multiply a sharded weight_orig by an unsharded mask.
        refuse_layouts(plan, f"compression={self.name}", "keeps pruning masks through "
                       "torch.nn.utils.prune, whose hooks multiply a weight by a whole mask")
        masks = plan.find_all(_MaskTechnique)
        if len(masks) > 1:
            raise ConfigError(f"compression: {' and '.join(t.key for t in masks)} all set the "
                              "pruning masks of the same layers; choose one of them")

    def export(self, model: nn.Module, out_dir, ctx: RunContext) -> Dict[str, float]:
        """``model_sparse.tfxs`` (keys of the built model, so ``load_compressed_state(
        fresh_model, load_sparse(path))`` reloads it), then the masks are folded into the
        weights (``prune.remove``): training is over and the last checkpoint, masks
        included, is written, so the model keeps its function and its original parameter
        names, and an HF model's ``hf_model/`` is a plain ``save_pretrained`` folder."""
        plain = strip_wrappers(model)
        path = f"{out_dir}/model_sparse.tfxs"
        info = save_sparse(plain, path)
        metrics = {f"{self.name}/sparsity": sparsity(plain), f"{self.name}/sparse_bytes": info["bytes"],
                   f"{self.name}/dense_bytes": info["dense_bytes"],
                   f"{self.name}/size_ratio": info["bytes"] / info["dense_bytes"]}
        make_permanent(plain)
        return metrics


class _BlockMaskTechnique(_MaskTechnique):
    """Masks chosen from magnitudes over ``block_linears`` (any family with an anatomy)."""

    def validate(self, plan: Plan) -> None:
        super().validate(plan)
        require_anatomy(plan, f"compression={self.name}")


def _check_step_spec(value: StepSpec, key: str) -> None:
    resolve_step(value, 1, key)  # type and range only; the run's max_steps is checked in validate


class MagnitudePruning(_BlockMaskTechnique):
    """Unstructured magnitude pruning of the block Linears to ``sparsity``.

    ``schedule="oneshot"`` prunes once at ``start_step`` (0: when applied, e.g. right
    after ``from_checkpoint`` loads a trained model); ``"cubic"`` follows Zhu & Gupta
    from ``initial_sparsity`` at ``start_step`` to ``sparsity`` at ``end_step``,
    updating every ``frequency`` optimizer steps. The model keeps training between
    and after schedule points, which is what recovers the accuracy.

    ``start_step``, ``end_step`` and ``frequency`` are optimizer steps (int) or
    fractions of ``trainer.max_steps`` (float); a fraction of ``frequency`` that rounds
    to 0 steps means every step. The defaults (0.0, 0.8, 0.05) prune over the first 80%
    of any run and leave 20% to recover.
    """

    name = "prune"

    def __init__(self, sparsity: float = 0.5, scope: str = "global", schedule: str = "cubic",
                 start_step: StepSpec = 0.0, end_step: StepSpec = 0.8, frequency: StepSpec = 0.05,
                 initial_sparsity: float = 0.0, from_checkpoint: Optional[str] = None) -> None:
        if schedule not in ("oneshot", "cubic"):
            raise ConfigError(f"compression.prune.schedule={schedule!r}; choose 'oneshot' or 'cubic'")
        if scope not in ("global", "layer"):
            raise ConfigError(f"compression.prune.scope={scope!r}; choose 'global' or 'layer'")
        if not 0.0 <= initial_sparsity <= sparsity < 1.0:
            raise ConfigError("compression.prune needs 0 <= initial_sparsity <= sparsity < 1")
        for key, value in (("start_step", start_step), ("end_step", end_step), ("frequency", frequency)):
            _check_step_spec(value, f"compression.prune.{key}")
        if schedule == "cubic" and isinstance(frequency, int) and frequency < 1:
            raise ConfigError(f"compression.prune.frequency={frequency} must be >= 1 (steps between "
                              "mask updates) or a fraction of trainer.max_steps")
        if (schedule == "cubic" and type(start_step) is type(end_step) and end_step <= start_step):
            raise ConfigError(f"compression.prune.schedule=cubic needs end_step > start_step, got "
                              f"{start_step} and {end_step}")
        self.target, self.scope, self.schedule = sparsity, scope, schedule
        self.start_step, self.end_step, self.frequency = start_step, end_step, frequency
        self.initial = initial_sparsity
        self.from_checkpoint = from_checkpoint  # loaded by the build order before SURGERY
        self.current = 0.0  # the sparsity the masks were last set to (resume state)
        self._resolved: Optional[Tuple[Optional[int], Tuple[int, int, int]]] = None

    # -- the schedule in steps ---------------------------------------------------------
    def schedule_steps(self, max_steps: Optional[int]) -> Tuple[int, int, int]:
        """``(start, end, frequency)`` in optimizer steps for a run of ``max_steps``
        (ConfigError for a fraction without ``max_steps``, a position past the run, or a
        cubic schedule whose end is not after its start). Pure."""
        key = "compression.prune"
        start = resolve_step(self.start_step, max_steps, f"{key}.start_step")
        check_within(f"{key}.start_step", start, max_steps, "pruning would never happen")
        if self.schedule == "oneshot":
            return start, start, 1
        end = resolve_step(self.end_step, max_steps, f"{key}.end_step")
        check_within(f"{key}.end_step", end, max_steps, f"the run would stop before reaching "
                     f"sparsity={self.target}")
        freq = max(1, resolve_step(self.frequency, max_steps, f"{key}.frequency"))
        if end <= start:
            raise ConfigError(f"{key}.schedule=cubic needs end_step > start_step, but they resolve to "
                              f"steps {start} and {end} of trainer.max_steps={max_steps}; use "
                              f"schedule=oneshot to prune once (e.g. with trainer.max_steps=0)")
        return start, end, freq

    def _steps(self, max_steps: Optional[int]) -> Tuple[int, int, int]:
        """:meth:`schedule_steps`, kept for the run's ``max_steps`` (None: the last one
        resolved, else absolute steps only)."""
        if self._resolved is None or (max_steps is not None and self._resolved[0] != max_steps):
            self._resolved = (max_steps, self.schedule_steps(max_steps))
        return self._resolved[1]

    def validate(self, plan: Plan) -> None:
        super().validate(plan)
        if plan.max_steps is not None:  # None: fractions are resolved when applied
            self.schedule_steps(plan.max_steps)

    def target_at(self, step: int, max_steps: Optional[int] = None) -> Optional[float]:
        start, end, freq = self._steps(max_steps)
        if self.schedule == "oneshot":
            return self.target if step == start else None
        return cubic_sparsity(step, self.target, start, end, freq, self.initial)

    # -- hooks -------------------------------------------------------------------------
    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        install_masks(model)
        if not ctx.resuming:  # on a resume the masks are loaded with the weights
            self._maybe_prune(model, 0, ctx)
        return model

    def after_optimizer_step(self, model: nn.Module, info: StepInfo, ctx: RunContext) -> None:
        self._maybe_prune(model, info.step, ctx)

    def _maybe_prune(self, model: nn.Module, step: int, ctx: RunContext) -> None:
        s = self.target_at(step, ctx.max_steps)
        if s is not None and s > 0:
            self.current = magnitude_prune(unwrap(model), s, self.scope)

    def state_dict(self):
        return {"current_sparsity": self.current}

    def load_state_dict(self, state) -> None:
        self.current = float(state.get("current_sparsity", 0.0))


class NMPruning(_BlockMaskTechnique):
    """N:M (default 2:4) semi-structured masks, set from magnitudes at ``at_step``
    (0: when applied; an int is optimizer steps, a float a fraction of
    ``trainer.max_steps``) and fixed afterwards while training goes on.

    Trains and exports anywhere (a masked dense model); ``semi_structured=True``
    additionally exports a ``to_sparse_semi_structured`` copy on a capable CUDA GPU.
    ``validate`` checks that ``m`` divides the input width of every block Linear.
    """

    name = "nm"

    def __init__(self, n: int = 2, m: int = 4, at_step: StepSpec = 0,
                 from_checkpoint: Optional[str] = None, semi_structured: bool = False) -> None:
        NMUnstructured(n, m)  # validates n, m
        _check_step_spec(at_step, "compression.nm.at_step")
        self.n, self.m, self.at_step = n, m, at_step
        self.from_checkpoint, self.semi_structured = from_checkpoint, semi_structured
        self.done = False

    def validate(self, plan: Plan) -> None:
        super().validate(plan)
        check_nm_widths(plan, "compression.nm", self.m)
        if plan.max_steps is not None:
            step = resolve_step(self.at_step, plan.max_steps, "compression.nm.at_step")
            check_within("compression.nm.at_step", step, plan.max_steps, "the masks would never be set")
        if self.semi_structured and spec_family(getattr(plan, "model", None)) == "hf_gpt2":
            raise ConfigError("compression.nm.semi_structured=true needs nn.Linear weights, and GPT-2's "
                              "projections are transformers Conv1D; set it false (the masked dense "
                              "model is exported as model_sparse.tfxs and hf_model/)")

    def _at(self, ctx: RunContext) -> int:
        return resolve_step(self.at_step, ctx.max_steps, "compression.nm.at_step")

    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        install_masks(model)
        # on a resume the masks come with the weights
        if not ctx.resuming and (self.at_step == 0 or self._at(ctx) == 0):
            nm_prune(model, self.n, self.m)
            self.done = True
        return model

    def after_optimizer_step(self, model: nn.Module, info: StepInfo, ctx: RunContext) -> None:
        if not self.done and info.step >= self._at(ctx):
            nm_prune(unwrap(model), self.n, self.m)
            self.done = True

    def state_dict(self):
        return {"done": self.done}

    def load_state_dict(self, state) -> None:
        self.done = bool(state.get("done", False))

    def export(self, model: nn.Module, out_dir, ctx: RunContext) -> Dict[str, float]:
        metrics = super().export(model, out_dir, ctx)
        if self.semi_structured and torch.cuda.is_available():
            import copy
            sparse = to_semi_structured(copy.deepcopy(strip_wrappers(model)).half().cuda())
            torch.save(sparse.state_dict(), f"{out_dir}/model_2to4.pt")
        return metrics
