"""The compact artefact of a weight-quantized model (``model_gptq.pt``) and its loader.

A quantized layer is stored as its integer codes **packed to the bit width** (3-bit
codes take 3 bits each: ``numpy.packbits`` of the codes' bit planes), its zero points
packed the same way, and its float32 scales, one per ``(row, group)``. Every other
tensor of the model (embeddings, norms, biases, layers left alone) is stored as it is;
the tied head is stored once (``torch.save`` keeps shared storage). Pruning masks are
folded first. Reloading runs the one dequantization formula
(:func:`~tfx.compression.oneshot.gptq.dequantize`) used to build the in-model weights,
so :func:`load_gptq` gives back those weights bit for bit.

Layout: a ``torch.save`` dict (read back with ``weights_only=True``, no pickled code)::

    {"format": "tfx-quantized-1",
     "quantized": {module name: {"codes": uint8 packed, "zeros": uint8 packed,
                                 "scales": float32 (out, groups), "shape": [out, in],
                                 "bits", "group_size", "sym", "transposed", "dtype"}},
     "tensors": {state_dict key: tensor}}   # everything else

Size: ``ceil(out*in*bits/8) + ceil(out*groups*bits/8) + 4*out*groups`` bytes per layer,
i.e. ``bits + (32 + bits)/group_size`` bits per weight (4.28 for 4-bit, group 128).
Float32 scales are kept (GPTQ kernels use fp16) because the in-model weights were
computed from float32 scales and the reload must be exact.
"""
from __future__ import annotations

import os
from typing import Dict, Mapping, Tuple, Union

import numpy as np
import torch
from torch import nn

from tfx.compression._common import modules_by_key, pruned_state_dict
from tfx.compression.oneshot.gptq import QuantizedWeight, dequantize
from tfx.compression.oneshot.stats import is_compressible
from tfx.core.errors import CheckpointError, TfxError

FORMAT = "tfx-quantized-1"
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


# -- bit packing -----------------------------------------------------------------------
def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers ``< 2**bits`` into a 1-D uint8 tensor, ``bits`` bits
    each (bit planes, least significant first)."""
    v = values.detach().flatten().cpu().numpy().astype(np.uint8)
    if v.size and int(v.max()) >= 2 ** bits:
        raise ValueError(f"a value {int(v.max())} does not fit in {bits} bits")
    planes = (v[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` uint8 values."""
    planes = np.unpackbits(packed.cpu().numpy(), count=count * bits, bitorder="little")
    planes = planes.reshape(count, bits).astype(np.uint16)
    return torch.from_numpy((planes << np.arange(bits, dtype=np.uint16)).sum(1).astype(np.uint8))


# -- codes of weights that lie on a grid ------------------------------------------------
def encode_on_grid(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int, sym: bool) -> QuantizedWeight:
    """The codes of an ``(out, in)`` weight that already lies on the grid ``scales``/
    ``zeros`` (a quantized layer, possibly pruned afterwards: 0 is on every grid).

    Raises :class:`TfxError` when ``dequantize(codes) != weight`` bitwise, i.e. the
    weight moved off its grid."""
    rows, cols = weight.shape
    g_idx = torch.arange(cols, device=weight.device) // group_size
    s, z = scales[:, g_idx].double(), zeros[:, g_idx].double()
    codes = (torch.round(weight.detach().double() / s) + z).clamp(0, 2 ** bits - 1).to(torch.uint8)
    deq = dequantize(codes, scales, zeros, g_idx, weight.dtype)
    if not torch.equal(deq, weight):
        bad = int((deq != weight).sum())
        raise TfxError(f"{bad} of {weight.numel()} weights are not on their {bits}-bit grid any "
                       "more (were they trained after quantization?); cannot store them exactly")
    return QuantizedWeight(deq, codes, scales, zeros, g_idx, bits, group_size, sym)


# -- save / load ---------------------------------------------------------------------
def _dedup_bytes(sd: Mapping[str, torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in sd.values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def save_gptq(model: nn.Module, quantized: Mapping[str, QuantizedWeight],
              path: Union[str, os.PathLike]) -> Dict[str, float]:
    """Write the quantized ``model`` to ``path``. ``quantized``: module name (as in
    ``model.named_modules()``) -> its :class:`QuantizedWeight`, whose dequantized weight
    must be the module's current weight (checked: the artefact describes the model).

    Returns ``bytes`` (file size), ``dense_bytes`` (the same state_dict unquantized),
    ``quantized_bytes`` (codes, zero points and scales) and ``bits_per_weight`` of the
    quantized layers."""
    modules = modules_by_key(model)  # state-dict names (activation checkpointing's segment dropped)
    sd = pruned_state_dict(model.state_dict())
    dense = _dedup_bytes(sd)
    entries, qbytes, qweights = {}, 0, 0
    for name, q in quantized.items():
        module = modules.get(name)
        if module is None or not is_compressible(module):
            raise TfxError(f"save_gptq: {name!r} is not a Linear of the model")
        transposed = not isinstance(module, nn.Linear)  # GPT-2's Conv1D stores (in, out)
        current = sd.pop(f"{name}.weight")  # masks folded: what the module computes with
        current = current.t() if transposed else current
        if not torch.equal(q.weight.to(current.dtype), current):
            raise TfxError(f"save_gptq: the weight of {name} is not its quantized weight")
        n_groups = q.scales.shape[1]
        entry = {"codes": pack_bits(q.codes, q.bits), "zeros": pack_bits(q.zeros, q.bits),
                 "scales": q.scales.detach().cpu().float().contiguous(),
                 "shape": list(q.codes.shape), "n_groups": n_groups, "bits": int(q.bits),
                 "group_size": int(q.group_size), "sym": bool(q.sym),
                 "transposed": transposed, "dtype": str(current.dtype)}
        entries[name] = entry
        qbytes += entry["codes"].numel() + entry["zeros"].numel() + entry["scales"].numel() * 4
        qweights += q.codes.numel()
    rest = {k: v.detach().cpu() for k, v in sd.items()}
    tmp = f"{path}.tmp"
    torch.save({"format": FORMAT, "quantized": entries, "tensors": rest}, tmp)
    os.replace(tmp, path)  # never leave a half-written file under the real name
    return {"bytes": os.path.getsize(path), "dense_bytes": dense, "quantized_bytes": qbytes,
            "bits_per_weight": 8.0 * qbytes / max(qweights, 1)}


def _load_blob(path) -> dict:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable quantized model file ({err})") from err
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tfx quantized model file (format {FORMAT})")
    return blob


def _decode(e: dict) -> QuantizedWeight:
    rows, cols = e["shape"]
    bits, gs, n_groups = e["bits"], e["group_size"], e["n_groups"]
    codes = unpack_bits(e["codes"], bits, rows * cols).view(rows, cols)
    zeros = unpack_bits(e["zeros"], bits, rows * n_groups).view(rows, n_groups)
    g_idx = torch.arange(cols) // gs
    w = dequantize(codes, e["scales"], zeros, g_idx, _DTYPES[e["dtype"]])
    return QuantizedWeight(w, codes, e["scales"], zeros, g_idx, bits, gs, e["sym"])


def read_gptq(path: Union[str, os.PathLike]) -> Tuple[Dict[str, QuantizedWeight],
                                                      Dict[str, torch.Tensor]]:
    """``(quantized layers by module name, weights as (out, in); the other tensors)``."""
    blob = _load_blob(path)
    return {name: _decode(e) for name, e in blob["quantized"].items()}, blob["tensors"]


def load_gptq(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """A plain state_dict with the dequantized weights (in each module's own layout), e.g.
    for ``load_compressed_state(fresh_model, load_gptq(path))``."""
    blob = _load_blob(path)
    sd = dict(blob["tensors"])
    for name, e in blob["quantized"].items():
        w = _decode(e).weight
        sd[f"{name}.weight"] = w.t().contiguous() if e["transposed"] else w
    return sd
