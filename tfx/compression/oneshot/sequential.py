"""Layer-by-layer calibration driver shared by Wanda, SparseGPT and GPTQ.

The calibration methods compress one decoder layer at a time, on the inputs that layer
sees *after* the layers before it were compressed (so each layer corrects for the
errors of the earlier ones), while only one layer's activations and statistics are
held at once:

1. a forward pre-hook on the first layer records its positional and keyword inputs for
   every calibration batch (hidden states plus, for Hugging Face models, the attention
   mask, position ids, rotary ``position_embeddings``...) and raises to stop the model;
2. for each layer in order: hooks on its linear modules collect
   :class:`~tfx.compression.oneshot.stats.LinearStats` while the (still dense) layer
   runs on the current inputs, each linear is compressed by the ``compress`` callback,
   and the compressed layer runs again to give the next layer's inputs.

All linears of a layer see the *dense* layer's activations (as in the SparseGPT/GPTQ
reference code), not those of already-compressed siblings.

The driver knows no model class: it needs the model (called as ``model(input_ids)``),
its decoder layers in order, and a layer's hidden state as its first argument (or the
``hidden_states`` keyword) and output (or the first element of a tuple output). KV
caches are switched off (``use_cache=False`` when the model accepts it, and any cache
object a layer would receive is replaced by ``None``) so re-running a layer never
appends to a cache.

Written here because the maintained version of this loop, llm-compressor's sequential
pipeline, comes with a large vLLM-oriented dependency stack that this repo does not
carry (it targets GPU deployment), and torchao has no layer-by-layer calibration.
"""
from __future__ import annotations

import inspect
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tfx.compression.oneshot.stats import (LinearStats, StatsCollector, compressible_modules,
                                           weight_matrix)
from tfx.core.errors import ConfigError

#: ``compress(qualified_name, module, stats)`` modifies ``module``'s weight in place and
#: may return a dict of extra per-linear info.
CompressFn = Callable[[str, nn.Module, LinearStats], Optional[dict]]


def calibration_batches(tokens: Any, n_samples: int, seq_len: int, seed: int = 0,
                        batch_size: int = 1) -> List[torch.Tensor]:
    """``n_samples`` non-overlapping windows of ``seq_len`` tokens, drawn at random from a
    1-D token stream (a tensor, a numpy array or :class:`tfx.data.blocks.TokenBlocks`),
    as LongTensor batches of shape ``(batch_size, seq_len)`` (the last may be smaller).
    """
    if n_samples < 1 or seq_len < 1 or batch_size < 1:
        raise ConfigError(f"n_samples, seq_len and batch_size must be positive, got "
                          f"{n_samples}, {seq_len}, {batch_size}")
    stream = getattr(tokens, "tokens", tokens)  # TokenBlocks keeps its stream in .tokens
    if not torch.is_tensor(stream):
        stream = np.asarray(stream)  # a memmap stays a memmap: only windows are copied
    if stream.ndim != 1:
        raise ConfigError(f"calibration tokens must be a 1-D stream, got shape "
                          f"{tuple(stream.shape)}")
    length = int(stream.shape[0])
    slots = length // seq_len
    if slots < n_samples:
        raise ConfigError(f"calibration needs n_samples*seq_len = {n_samples}*{seq_len} = "
                          f"{n_samples * seq_len} tokens but the split has only "
                          f"{length}; lower n_samples or seq_len")
    gen = torch.Generator().manual_seed(seed)
    # A random shift of the slot grid lets every token position be drawn.
    shift = int(torch.randint(length - slots * seq_len + 1, (1,), generator=gen))
    starts = shift + torch.randperm(slots, generator=gen)[:n_samples] * seq_len
    windows = torch.stack([_window(stream, s, seq_len) for s in starts.tolist()])
    return list(windows.split(batch_size))


def _window(stream, start: int, seq_len: int) -> torch.Tensor:
    piece = stream[start:start + seq_len]
    if torch.is_tensor(piece):
        return piece.long()
    return torch.from_numpy(np.asarray(piece, dtype=np.int64))


class _Caught(Exception):
    """Raised by the catcher to stop the model once the first layer's inputs are seen."""


def _is_cache(value: Any) -> bool:
    # transformers' Cache objects; matched by name to keep transformers optional.
    return any(c.__name__.endswith("Cache") for c in type(value).__mro__)


def _model_kwargs(model: nn.Module) -> dict:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def capture_layer_inputs(model: nn.Module, first_layer: nn.Module,
                         batches: Sequence[torch.Tensor]) -> List[tuple]:
    """``[(args, kwargs)]`` with which ``model`` calls ``first_layer``, one per batch."""
    captured: List[tuple] = []

    def catcher(module, args, kwargs):
        args = tuple(None if _is_cache(a) else a for a in args)
        kwargs = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
        captured.append((args, kwargs))
        raise _Caught

    extra = _model_kwargs(model)
    device = next(model.parameters()).device
    handle = first_layer.register_forward_pre_hook(catcher, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(batch.to(device), **extra)
            except _Caught:
                continue
            raise RuntimeError("the model never called its first decoder layer; pass the "
                               "layers in the order the model runs them")
    finally:
        handle.remove()
    return captured


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor):
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _run_layer(layer: nn.Module, inputs: List[tuple]) -> List[torch.Tensor]:
    outs = []
    for args, kwargs in inputs:
        out = layer(*args, **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


def _relative_error(ref: List[torch.Tensor], new: List[torch.Tensor]) -> float:
    num = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(ref, new))
    den = sum(float(a.double().square().sum()) for a in ref)
    return (num / den) ** 0.5 if den > 0 else 0.0


def _linear_info(module: nn.Module, dense: torch.Tensor, stats: LinearStats) -> dict:
    w = weight_matrix(module)
    info = {"sparsity": float((w == 0).double().mean())}
    if stats.hessian is not None:
        # ||(W - W')X^T||^2 / ||W X^T||^2 = tr(D H D^T) / tr(W H W^T) for H ~ X^T X.
        d = (dense.double() - w.double())
        h = stats.hessian
        den = float(((dense.double() @ h) * dense.double()).sum())
        info["rel_err"] = (float(((d @ h) * d).sum()) / den) ** 0.5 if den > 0 else 0.0
    return info


def _compress_layer(layer: nn.Module, prefix: str, inputs: List[tuple], compress: CompressFn,
                    hessian: bool, dtype: torch.dtype):
    """Stats pass, compression, output pass for one layer; returns (outputs, info)."""
    modules = compressible_modules(layer, prefix)
    with StatsCollector(modules, hessian=hessian, dtype=dtype) as collector:
        dense_out = _run_layer(layer, inputs)
    linears = {}
    for name, module in modules:
        before = weight_matrix(module).clone()
        extra = compress(name, module, collector.stats[name]) or {}
        linears[name] = {**_linear_info(module, before, collector.stats[name]), **extra}
        collector.stats[name] = None  # free the Hessian before the next one is used
    out = _run_layer(layer, inputs)
    zeros = sum(float((weight_matrix(m) == 0).sum()) for _, m in modules)
    total = sum(weight_matrix(m).numel() for _, m in modules)
    info = {"sparsity": zeros / total if total else 0.0,
            "rel_err": _relative_error(dense_out, out), "linears": linears}
    return out, info


@torch.no_grad()
def compress_sequential(model: nn.Module, layers: Sequence[nn.Module],
                        batches: Sequence[torch.Tensor], compress: CompressFn, *,
                        hessian: Optional[bool] = None, stats_dtype: torch.dtype = torch.float64,
                        progress: bool = True) -> Dict[int, dict]:
    """Compress ``layers`` of ``model`` one after the other on calibration ``batches``.

    ``compress(name, module, stats)`` is called for every ``nn.Linear`` / ``Conv1D`` of
    each layer (``name`` is the module's qualified name in ``model``) and must change the
    module's weight in place. ``hessian``: collect ``H`` (default: the callback's
    ``needs_hessian`` attribute, else True). Returns per layer index: ``time_s``,
    ``sparsity`` (fraction of zero weights over the layer's linears), ``rel_err``
    (``||Y - Y'|| / ||Y||`` of the layer output on its calibration inputs) and
    ``linears`` (per linear: ``sparsity``, ``rel_err`` from ``H`` when collected, and
    whatever the callback returned).
    """
    if not layers:
        raise ConfigError("compress_sequential got no decoder layers")
    if hessian is None:
        hessian = getattr(compress, "needs_hessian", True)
    names = {id(m): n for n, m in model.named_modules()}
    was_training = model.training
    model.eval()
    try:
        inputs = capture_layer_inputs(model, layers[0], batches)
        report: Dict[int, dict] = {}
        for index, layer in enumerate(tqdm(layers, desc="one-shot", disable=not progress)):
            start = time.perf_counter()
            prefix = names.get(id(layer), f"layers.{index}") + "."
            outs, info = _compress_layer(layer, prefix, inputs, compress, hessian, stats_dtype)
            inputs = [_with_hidden(a, k, o) for (a, k), o in zip(inputs, outs)]
            report[index] = {**info, "time_s": time.perf_counter() - start}
        return report
    finally:
        model.train(was_training)
