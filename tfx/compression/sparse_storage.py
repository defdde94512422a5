"""Store a pruned model's weights as bitmask + non-zero values (``.tfxs`` files).

Layout (little-endian)::

    b"TFXSPRS1"                 8-byte magic and format version
    uint64 header_len
    header                      UTF-8 JSON: {"tensors": [{name, dtype, shape, enc, ...}]}
    payload                     per tensor, in header order

Encodings: ``"bitmask"`` stores ceil(N/8) bytes of ``packbits(w != 0)`` followed by
the nnz non-zero values in the tensor's dtype; ``"dense"`` stores the raw tensor;
``"alias"`` stores nothing and points at an earlier tensor that shares its storage
(the tied head / embedding). A floating tensor with >= 2 dims is bitmask-encoded when
that is smaller than dense, i.e. when its density is below ``1 - 1/(8 b)``.

Size, exactly: ``16 + header_len + sum_bitmask(ceil(N/8) + nnz b) + sum_dense(N b)``
with ``b`` the element size. For fp32 weights at sparsity ``s`` the pruned part is
therefore ``(1 - s + 1/32)`` of dense, plus at most 1 byte per tensor of padding.

Why not ``torch.sparse`` CSR/COO + ``torch.save``: COO costs 16 bytes of int64 index
per non-zero, CSR 8 bytes (plus row pointers), i.e. more than a dense fp32 tensor up
to 67% (CSR) sparsity; a bitmask costs 1 bit per weight at any sparsity. The round trip
is exact except that ``-0.0`` comes back as ``+0.0`` (``torch.equal`` treats them equal).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Dict, Union

import numpy as np
import torch
from torch import nn

from tfx.compression._common import pruned_state_dict
from tfx.core.errors import CheckpointError, TfxError

MAGIC = b"TFXSPRS1"
EXTENSION = ".tfxs"
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                               torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                               torch.bool)}


def _as_state_dict(obj: Union[nn.Module, Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    sd = obj.state_dict() if isinstance(obj, nn.Module) else obj
    return pruned_state_dict(sd)


def _bytes(t: torch.Tensor) -> bytes:
    # bf16 has no numpy dtype: move the raw bits through an int16 view.
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _from_bytes(buf: bytes, dtype: torch.dtype, n: int) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
    return raw.view(dtype)[:n].clone() if n else torch.empty(0, dtype=dtype)


def _encode(t: torch.Tensor):
    """Return (entry, payload) for one tensor."""
    t = t.detach().cpu()
    entry: Dict[str, Any] = {"dtype": str(t.dtype), "shape": list(t.shape)}
    b, n = t.element_size(), t.numel()
    if t.is_floating_point() and t.dim() >= 2:
        nz = t != 0
        nnz = int(nz.sum())
        if (n + 7) // 8 + nnz * b < n * b:
            bits = np.packbits(nz.flatten().numpy()).tobytes()
            entry.update(enc="bitmask", nnz=nnz)
            return entry, bits + _bytes(t[nz])
    entry["enc"] = "dense"
    return entry, _bytes(t)


def save_sparse(model_or_state_dict, path: Union[str, os.PathLike]) -> Dict[str, int]:
    """Write ``path`` (``.tfxs``); prune reparametrisations are folded first.

    Returns ``{"bytes": file size, "dense_bytes": size of the same tensors dense}``.
    """
    if str(path).endswith(EXTENSION) is False:
        raise TfxError(f"sparse model files end in {EXTENSION}; got {path}")
    sd = _as_state_dict(model_or_state_dict)
    entries, payloads, seen, dense = [], [], {}, 0
    for name, t in sd.items():
        if type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
            raise TfxError(f"save_sparse stores plain tensors; {name} is a {type(t).__name__} "
                           "(quantized models are saved with torch.save by quantize.py)")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            entries.append({"name": name, "enc": "alias", "of": seen[key]})
            continue
        seen[key] = name
        dense += t.numel() * t.element_size()
        entry, payload = _encode(t)
        entry.update(name=name, nbytes=len(payload))
        entries.append(entry)
        payloads.append(payload)
    header = json.dumps({"tensors": entries}).encode()
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(header)) + header)
        for p in payloads:
            f.write(p)
    os.replace(tmp, path)  # never leave a half-written file under the real name
    return {"bytes": os.path.getsize(path), "dense_bytes": dense, "header_bytes": 16 + len(header)}


def load_sparse(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Read a ``.tfxs`` file back into a dense state_dict."""
    with open(path, "rb") as f:
        if f.read(8) != MAGIC:
            raise CheckpointError(f"{path} is not a tfx sparse model file (bad magic)")
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
        out: Dict[str, torch.Tensor] = {}
        for e in header["tensors"]:
            if e["enc"] == "alias":
                out[e["name"]] = out[e["of"]]
                continue
            dtype, shape = _DTYPES[e["dtype"]], e["shape"]
            buf = f.read(e["nbytes"])
            n = int(np.prod(shape)) if shape else 1
            if e["enc"] == "dense":
                out[e["name"]] = _from_bytes(buf, dtype, n).reshape(shape)
                continue
            nbits = (n + 7) // 8
            mask = np.unpackbits(np.frombuffer(buf[:nbits], dtype=np.uint8), count=n)
            t = torch.zeros(n, dtype=dtype)
            t[torch.from_numpy(mask.astype(bool))] = _from_bytes(buf[nbits:], dtype, e["nnz"])
            out[e["name"]] = t.reshape(shape)
    return out
