"""``compression=wanda``, ``compression=sparsegpt`` and ``compression=gptq``: one-shot,
calibration-based compression of a trained model's decoder layers, as techniques.

They act at stage SURGERY, i.e. after the model is built and its trained weights are
in (pretrained Hugging Face weights, or a tfx run's through ``from_checkpoint``, which
the build order loads before SURGERY) and before anything wraps it or an optimizer
exists. A SURGERY technique of an earlier group (sparse attention) is already applied,
so calibration runs through it. Calibration draws ``n_samples`` windows of ``seq_len``
tokens from the train split (``ctx.train_data``) and compresses the layers one after
the other (:func:`~tfx.compression.oneshot.sequential.compress_sequential`). A resume
(and ``load_run``/evaluate.py) never recalibrates: the checkpoint holds the compressed
weights, the masks and the technique's report.

* ``wanda`` / ``sparsegpt`` end with ``torch.nn.utils.prune`` masks on every compressed
  layer, installed by :func:`tfx.compression.prune.install_masks` exactly as
  ``compression=prune`` does: pruned weights get no gradient, so a run with
  ``trainer.max_steps > 0`` fine-tunes with the sparsity kept, and the masks travel in
  checkpoints. ``wanda`` with ``method=magnitude`` is the data-free baseline under the
  same structure (per output row, or N:M). Export: ``model_sparse.tfxs``.
* ``gptq`` (``method=gptq`` or the ``rtn`` baseline) leaves the dequantized weights in
  the model and freezes them (``requires_grad=False``), so training afterwards tunes
  only the rest (embeddings, norms, biases) and the weights stay on their grid; the
  grids (scales, zero points) are the technique's state. Export: ``model_gptq.pt``
  (codes packed to the bit width, :mod:`tfx.compression.oneshot.storage`), which
  :func:`~tfx.compression.oneshot.storage.load_gptq` reloads bit for bit.

Reported (``metrics()``, hence the log and summary.json): sparsity reached or bits,
calibration time (data, forward passes and statistics), compression time (the
solver: masks, OBS/GPTQ sweeps), the mean relative output error of the layers on the
calibration data; the exports add the artefact sizes.
"""
from __future__ import annotations

import math

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import prune

from tfx.compression._common import modules_by_key, refuse_layouts, strip_wrappers, unwrap
from tfx.compression.oneshot.gptq import GPTQCompressor, check_quant_args, rtn_quantize
from tfx.compression.oneshot.sequential import calibration_batches, compress_sequential
from tfx.compression.oneshot.sparsegpt import SparseGPTCompressor
from tfx.compression.oneshot.stats import in_features, set_weight_matrix, weight_matrix
from tfx.compression.oneshot.storage import encode_on_grid, save_gptq
from tfx.compression.oneshot.wanda import WandaCompressor, check_structure, mask_from_scores
from tfx.compression.prune import _MaskTechnique, _refresh, install_masks, make_permanent
from tfx.compression.sparse_storage import save_sparse
from tfx.core.context import RunContext
from tfx.core.errors import ConfigError
from tfx.core.technique import Stage, Technique
from tfx.model.anatomy import anatomy_of

Targets = List[Tuple[str, nn.Module]]


# -- plain functions -------------------------------------------------------------------
def oneshot_targets(model: nn.Module) -> Targets:
    """``(qualified name, module)`` of the Linear(-like) modules inside the decoder
    layers, the modules the one-shot methods compress (embeddings and the usually tied
    head are left alone). Raises :class:`ConfigError` when there are none."""
    model = unwrap(model)
    anatomy = anatomy_of(model)
    if not anatomy.decoder_layers(model):
        raise ConfigError(f"the model ({type(model).__name__}) has no decoder layers to compress")
    targets = anatomy.block_linears(model)
    if not targets:
        raise ConfigError(f"the decoder layers of {type(model).__name__} hold no Linear layers "
                          "to compress")
    return targets


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight the module computes with: ``weight_orig * weight_mask``
    under a prune mask (its ``weight`` attribute is refreshed only by the next forward,
    so it is stale right after a checkpoint was loaded), else the weight."""
    if prune.is_pruned(module):
        w = (module.weight_orig * module.weight_mask).detach()
        return w if isinstance(module, nn.Linear) else w.t()
    return weight_matrix(module)


def target_sparsity(targets: Targets) -> float:
    """Fraction of zeros in the (effective, masked) weights of ``targets``."""
    zeros = sum(int((effective_weight(m) == 0).sum()) for _, m in targets)
    return zeros / max(sum(m.weight.numel() for _, m in targets), 1)


def max_positions(model: nn.Module) -> Optional[int]:
    """The longest sequence the model takes (tfx GPT: ``block_size``; HF:
    ``max_position_embeddings`` / ``n_positions``), or None when it does not say."""
    model = unwrap(model)
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "block_size", None):
        return int(cfg.block_size)
    hf = getattr(model, "config", None)
    value = getattr(hf, "max_position_embeddings", None) or getattr(hf, "n_positions", None)
    return int(value) if value else None


#: the module exports are written from (DDP/compile unwrapped, tfx's HF wrapper kept)
saved_model = strip_wrappers


def _prefix_of(outer: nn.Module, inner: nn.Module) -> str:
    """The qualified-name prefix of ``inner`` inside ``outer`` (``""`` or e.g. ``"lm."``)."""
    name = next(n for n, m in outer.named_modules() if m is inner)
    return f"{name}." if name else ""


def _layout(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """An ``(out, in)`` matrix in the module's own weight layout (Conv1D: ``(in, out)``)."""
    return matrix if isinstance(module, nn.Linear) else matrix.t()


@contextlib.contextmanager
def _labelled(label: str) -> Iterator[None]:
    """Prefix the one-line ConfigErrors of the plain functions with the config label."""
    try:
        yield
    except ConfigError as err:
        if str(err).startswith(label):
            raise
        raise ConfigError(f"{label}: {err}") from err


class _Timed:
    """A compress callback that adds up the time spent in the solver."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds = inner, 0.0
        self.needs_hessian = getattr(inner, "needs_hessian", True)

    def __call__(self, name, module, stats):
        start = time.perf_counter()
        try:
            return self.inner(name, module, stats)
        finally:
            self.seconds += time.perf_counter() - start


# -- the shared base ---------------------------------------------------------------------
class _OneShot(Technique):
    """Calibration settings and the layer-by-layer run shared by the three methods."""

    stage = Stage.SURGERY

    def _init_calibration(self, n_samples: int, seq_len: Optional[int], batch_size: int,
                          seed: Optional[int], from_checkpoint: Optional[str]) -> None:
        for key, value in (("n_samples", n_samples), ("batch_size", batch_size), ("seq_len", seq_len)):
            if value is not None and value < 1:
                raise ConfigError(f"{self.label}.{key}={value} must be >= 1")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not 0 <= seed < 2 ** 32):
            raise ConfigError(f"{self.label}.seed={seed!r} must be null (the run's seed) or an "
                              f"integer in [0, 2**32)")
        self.n_samples, self.seq_len, self.batch_size, self.seed = n_samples, seq_len, batch_size, seed
        self.from_checkpoint = from_checkpoint  # loaded by the build order before SURGERY
        self.report: Dict[str, float] = {}

    @property
    def label(self) -> str:
        return f"compression.{self.name}"

    def _calibrate(self, model: nn.Module, ctx: RunContext, compressor) -> Dict[str, float]:
        """Run ``compressor`` over the decoder layers on calibration data; timings."""
        if ctx.train_data is None:
            raise ConfigError("calibration needs the train split (ctx.train_data); none was given")
        seq_len = self.seq_len or ctx.train_data.seq_len
        limit = max_positions(model)
        if limit is not None and seq_len > limit:
            raise ConfigError(f"seq_len={seq_len} is longer than the model's {limit} positions; "
                              "lower seq_len")
        seed = ctx.seed if self.seed is None else self.seed
        start = time.perf_counter()
        batches = calibration_batches(ctx.train_data, self.n_samples, seq_len, seed, self.batch_size)
        timed = _Timed(compressor)
        layers = anatomy_of(model).decoder_layers(model)
        report = compress_sequential(model, layers, batches, timed,
                                     progress=ctx.is_main and sys.stderr.isatty())
        total = time.perf_counter() - start
        errs = [info["rel_err"] for info in report.values()]
        return {"calib_time_s": total - timed.seconds, "compress_time_s": timed.seconds,
                "time_s": total, "calib_tokens": float(self.n_samples * seq_len),
                "layer_rel_err": sum(errs) / len(errs)}

    def _announce(self, ctx: RunContext, what: str) -> None:
        if ctx.is_main:
            r = self.report
            print(f"{self.name}: {what} in {r['time_s']:.1f} s (calibration {r['calib_time_s']:.1f} s, "
                  f"solver {r['compress_time_s']:.1f} s)", flush=True)

    def metrics(self) -> Dict[str, float]:
        return {f"{self.name}/{k}": v for k, v in self.report.items()}


# -- sparsity ---------------------------------------------------------------------------
class _OneShotPruning(_OneShot, _MaskTechnique):
    """Compress once, then keep the result as prune masks (prune/nm's mechanism)."""

    def _init_structure(self, sparsity, n, m) -> None:
        if sparsity is None and n is None and m is None:
            sparsity = 0.5
        with _labelled(self.label):
            self.sparsity, self.n, self.m = check_structure(sparsity, n, m)

    def _check_targets(self, targets: Targets) -> None:
        if self.m is not None:
            for name, module in targets:
                if in_features(module) % self.m:
                    raise ConfigError(f"m={self.m} does not divide in_features={in_features(module)} "
                                      f"of {name}; n:m groups are consecutive inputs of a row")

    def _structure_text(self) -> str:
        return f"{self.n}:{self.m}" if self.m is not None else f"{self.sparsity:.0%} unstructured"

    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        inner = unwrap(model)
        with _labelled(self.label):
            targets = oneshot_targets(inner)
            self._check_targets(targets)
            if any(prune.is_pruned(mod) for _, mod in targets):
                raise ConfigError("the layers already carry pruning masks; use one pruning method")
            masks = None if ctx.resuming else self._masks(inner, targets, ctx)
        mods = install_masks(inner, [mod for _, mod in targets])
        if masks is not None:  # on a resume the masks come with the checkpoint's weights
            with torch.no_grad():
                for name, mod in targets:
                    mod.weight_mask.copy_(_layout(mod, masks[name]).to(mod.weight_mask.dtype))
            _refresh(mods)
            self.report["sparsity"] = target_sparsity(targets)
            self._announce(ctx, f"{self._structure_text()} -> {self.report['sparsity']:.2%} sparse")
        return model

    def _masks(self, model: nn.Module, targets: Targets, ctx: RunContext) -> Dict[str, torch.Tensor]:
        """Compress ``model`` (weights changed in place) and return each target's
        ``(out, in)`` keep-mask by name; fills ``self.report``."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        return {"report": dict(self.report)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.report = dict(state.get("report", {}))

    def export(self, model: nn.Module, out_dir, ctx: RunContext) -> Dict[str, float]:
        """``model_sparse.tfxs``, then the masks are folded into the weights (as
        magnitude pruning's export does): the last checkpoint, masks included, is
        written, so an HF model's ``hf_model/`` becomes a plain ``save_pretrained``
        folder with the zeros in place."""
        plain = saved_model(model)
        info = save_sparse(plain, Path(out_dir) / "model_sparse.tfxs")
        metrics = {f"{self.name}/sparsity": target_sparsity(oneshot_targets(model)),
                   f"{self.name}/sparse_bytes": info["bytes"],
                   f"{self.name}/dense_bytes": info["dense_bytes"],
                   f"{self.name}/size_ratio": info["bytes"] / info["dense_bytes"]}
        make_permanent(plain)
        return metrics


class Wanda(_OneShotPruning):
    """Wanda (Sun et al. 2023): keep the weights with the largest ``|W_ij| * ||X_j||``
    in every output row (``scope=row``; ``layer`` ranks the whole matrix), or the ``n``
    best of every ``m`` consecutive inputs; no weight update.

    ``method=magnitude`` is the data-free baseline under the same structure (score
    ``|W_ij|``, per row or per layer, or N:M); it needs no calibration.
    ``sparsity`` defaults to 0.5 when neither it nor ``n``/``m`` is given.
    """

    name = "wanda"

    def __init__(self, sparsity: Optional[float] = None, n: Optional[int] = None,
                 m: Optional[int] = None, method: str = "wanda", scope: str = "row",
                 n_samples: int = 16, seq_len: Optional[int] = None, batch_size: int = 8,
                 seed: Optional[int] = None, from_checkpoint: Optional[str] = None) -> None:
        if method not in ("wanda", "magnitude"):
            raise ConfigError(f"{self.label}.method={method!r}; choose 'wanda' or 'magnitude'")
        if scope not in ("row", "layer"):
            raise ConfigError(f"{self.label}.scope={scope!r}; choose 'row' or 'layer'")
        self.method, self.scope = method, scope
        self._init_structure(sparsity, n, m)
        if scope == "layer" and self.m is not None:
            raise ConfigError(f"{self.label}.scope=layer is for unstructured sparsity; n:m groups "
                              "are always within a row")
        self._init_calibration(n_samples, seq_len, batch_size, seed, from_checkpoint)

    def _masks(self, model, targets, ctx):
        per_row = self.scope == "row"
        if self.method == "magnitude":
            start = time.perf_counter()
            masks = {}
            with torch.no_grad():
                for name, mod in targets:
                    w = weight_matrix(mod)
                    masks[name] = mask_from_scores(w.abs(), self.sparsity, self.n, self.m, per_row)
                    set_weight_matrix(mod, w * masks[name])
            elapsed = time.perf_counter() - start
            self.report = {"calib_time_s": 0.0, "compress_time_s": elapsed, "time_s": elapsed,
                           "calib_tokens": 0.0}
            return masks
        compressor = WandaCompressor(self.sparsity, self.n, self.m)
        if not per_row:
            compressor = _LayerScopeWanda(self.sparsity)
        self.report = self._calibrate(model, ctx, compressor)
        return compressor.masks


class _LayerScopeWanda(WandaCompressor):
    """Wanda's score ranked over the whole matrix (the paper's per-layer ablation)."""

    def __call__(self, name, module, stats) -> dict:
        w = weight_matrix(module)
        score = w.abs().double() * stats.act_norm.double().unsqueeze(0)
        mask = mask_from_scores(score, self.sparsity, per_row=False)
        set_weight_matrix(module, w * mask)
        self.masks[name] = mask
        return {}


class SparseGPT(_OneShotPruning):
    """SparseGPT (Frantar & Alistarh 2023): prune with the OBS saliency and update the
    remaining weights of every row to reconstruct the layer's outputs on the
    calibration data (unstructured ``sparsity`` or ``n``:``m``).

    Unstructured masks are chosen per block of ``blocksize`` columns over all rows, so
    the layer (not each row) reaches ``sparsity``. ``percdamp``: dampening of the
    Hessian's diagonal, relative to its mean.
    """

    name = "sparsegpt"

    def __init__(self, sparsity: Optional[float] = None, n: Optional[int] = None,
                 m: Optional[int] = None, blocksize: int = 128, percdamp: float = 0.01,
                 n_samples: int = 16, seq_len: Optional[int] = None, batch_size: int = 8,
                 seed: Optional[int] = None, from_checkpoint: Optional[str] = None) -> None:
        self._init_structure(sparsity, n, m)
        if blocksize < 1 or not 0 <= percdamp < math.inf:  # `not` also catches nan
            raise ConfigError(f"{self.label} needs blocksize >= 1 and a finite percdamp >= 0, got "
                              f"{blocksize} and {percdamp}")
        self.blocksize, self.percdamp = blocksize, percdamp
        self._init_calibration(n_samples, seq_len, batch_size, seed, from_checkpoint)

    def _masks(self, model, targets, ctx):
        compressor = SparseGPTCompressor(self.sparsity, self.n, self.m, blocksize=self.blocksize,
                                         percdamp=self.percdamp)
        self.report = self._calibrate(model, ctx, compressor)
        return compressor.masks


# -- quantization -------------------------------------------------------------------------
class GPTQ(_OneShot):
    """Weight-only integer quantization of the decoder Linears: GPTQ (Frantar et al.
    2023) or round-to-nearest (``method=rtn``, no calibration), ``bits`` in 2..8, one
    grid per ``group_size`` consecutive inputs of a row (``-1``: one per row),
    asymmetric unless ``sym``; ``act_order`` quantizes columns by decreasing Hessian
    diagonal (static groups, see :mod:`tfx.compression.oneshot.gptq`).

    The dequantized weights stay in the model, frozen (``requires_grad=False``): a run
    with ``trainer.max_steps > 0`` tunes only the other parameters, so the model and
    the exported ``model_gptq.pt`` stay the same weights.
    """

    name = "gptq"

    def __init__(self, bits: int = 4, group_size: int = 64, act_order: bool = False,
                 sym: bool = False, method: str = "gptq", percdamp: float = 0.01,
                 blocksize: int = 128, n_samples: int = 16, seq_len: Optional[int] = None,
                 batch_size: int = 8, seed: Optional[int] = None,
                 from_checkpoint: Optional[str] = None) -> None:
        if method not in ("gptq", "rtn"):
            raise ConfigError(f"{self.label}.method={method!r}; choose 'gptq' or 'rtn'")
        with _labelled(self.label):
            check_quant_args(bits, -1, 1)
        if group_size != -1 and (int(group_size) != group_size or group_size < 1):
            raise ConfigError(f"{self.label}.group_size={group_size} must be -1 (one group per "
                              "row) or a positive number of inputs")
        if blocksize < 1 or not 0 <= percdamp < math.inf:  # `not` also catches nan
            raise ConfigError(f"{self.label} needs blocksize >= 1 and a finite percdamp >= 0, got "
                              f"{blocksize} and {percdamp}")
        self.bits, self.group_size, self.act_order, self.sym = int(bits), group_size, act_order, sym
        self.method, self.percdamp, self.blocksize = method, percdamp, blocksize
        self._init_calibration(n_samples, seq_len, batch_size, seed, from_checkpoint)
        self.grids: Dict[str, Dict[str, Any]] = {}  # name -> scales, zeros, group_size

    def validate(self, plan) -> None:
        super().validate(plan)
        refuse_layouts(plan, f"compression={self.name}", "quantizes and exports whole layers in one "
                       "process", pipeline=True)

    def apply_to_model(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        inner = unwrap(model)
        with _labelled(self.label):
            targets = oneshot_targets(inner)
            for name, mod in targets:
                try:
                    check_quant_args(self.bits, self.group_size, in_features(mod))
                except ConfigError as err:
                    raise ConfigError(f"{err} ({name})") from None
                if prune.is_pruned(mod):
                    raise ConfigError(f"{name} already carries a pruning mask; list gptq before "
                                      "the pruning method (joint one-shot sparsity + quantization "
                                      "is not implemented)")
            if not ctx.resuming:  # on a resume the weights and grids come from the checkpoint
                self._quantize(inner, targets, ctx)
        for _, mod in targets:
            mod.weight.requires_grad_(False)  # stays on its grid through training
        return model

    def _quantize(self, model: nn.Module, targets: Targets, ctx: RunContext) -> None:
        if self.method == "rtn":
            start = time.perf_counter()
            results = {}
            with torch.no_grad():
                for name, mod in targets:
                    q = rtn_quantize(weight_matrix(mod), self.bits, self.group_size, self.sym)
                    set_weight_matrix(mod, q.weight)
                    results[name] = q
            elapsed = time.perf_counter() - start
            self.report = {"calib_time_s": 0.0, "compress_time_s": elapsed, "time_s": elapsed,
                           "calib_tokens": 0.0}
        else:
            compressor = GPTQCompressor(self.bits, self.group_size, self.act_order, self.percdamp,
                                        self.blocksize, self.sym)
            self.report = self._calibrate(model, ctx, compressor)
            results = compressor.results
        self.grids = {name: {"scales": q.scales.cpu(), "zeros": q.zeros.cpu(),
                             "group_size": q.group_size} for name, q in results.items()}
        self.report.update(bits=float(self.bits), group_size=float(self.group_size))
        gs = "per row" if self.group_size == -1 else f"group {self.group_size}"
        self._announce(ctx, f"{self.method} {self.bits}-bit, {gs}")

    def quantized(self, model: nn.Module) -> Dict[str, Any]:
        """Each quantized module's :class:`QuantizedWeight` by its name in ``model``, from
        its current weight and its grid (raises if a weight left its grid)."""
        inner = unwrap(model)
        prefix = _prefix_of(model, inner)
        modules = modules_by_key(inner)  # the names at calibration, before activation checkpointing
        out = {}
        for name, grid in self.grids.items():
            w = effective_weight(modules[name])
            out[prefix + name] = encode_on_grid(w, grid["scales"].to(w.device),
                                                grid["zeros"].to(w.device), self.bits,
                                                grid["group_size"], self.sym)
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"report": dict(self.report), "grids": self.grids}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.report = dict(state.get("report", {}))
        self.grids = dict(state.get("grids", {}))

    def export(self, model: nn.Module, out_dir, ctx: RunContext) -> Dict[str, float]:
        plain = saved_model(model)
        info = save_gptq(plain, self.quantized(plain), Path(out_dir) / "model_gptq.pt")
        return {f"{self.name}/bytes": info["bytes"], f"{self.name}/dense_bytes": info["dense_bytes"],
                f"{self.name}/size_ratio": info["bytes"] / info["dense_bytes"],
                f"{self.name}/quantized_bytes": info["quantized_bytes"],
                f"{self.name}/bits_per_weight": info["bits_per_weight"]}


__all__ = ["GPTQ", "SparseGPT", "Wanda", "max_positions", "oneshot_targets", "saved_model",
           "target_sparsity"]
