"""Compressed inference checkpoints: optional bf16/fp16 cast + zstd (``.tfxz`` files).

Layout: ``b"TFXZSTD1"`` magic, then a uint8 flag (1 = zstd-compressed, 0 = raw),
then the ``torch.save`` bytes of the state_dict (compressed if flagged).

zstd buys little on trained fp32/bf16 weights (their mantissas are close to random;
expect ~5-10%) but a lot on pruned ones, whose zeros compress away; the measured
ratio is reported rather than promised.
"""
from __future__ import annotations

import io
import os
import struct
from typing import Dict, Optional, Union

import torch
from torch import nn

from tfx.compression._common import refuse_layouts, strip_wrappers
from tfx.compression.reload import inference_state_dict
from tfx.core.context import RunContext
from tfx.core.errors import CheckpointError, ConfigError
from tfx.core.technique import Stage, Technique

MAGIC = b"TFXZSTD1"
EXTENSION = ".tfxz"
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cast(sd: Dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    """Cast floating tensors, keeping tensors that share storage (the tied head and
    embedding) shared, so ``torch.save`` still writes them once."""
    if dtype is None:
        return sd
    out, cast = {}, {}
    for k, v in sd.items():
        if v.is_floating_point():
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride())
            v = cast.setdefault(key, v.to(dtype))
        out[k] = v
    return out


def save_compressed(state_dict: Dict[str, torch.Tensor], path: Union[str, os.PathLike],
                    dtype: Optional[torch.dtype] = torch.bfloat16,
                    zstd_level: Optional[int] = 3) -> Dict[str, float]:
    """Write ``state_dict`` cast to ``dtype`` (None keeps it) and zstd-compressed at
    ``zstd_level`` (None: no compression). Returns the bytes written and the ratio
    to a plain fp32 ``torch.save`` of the same state_dict."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    fp32_bytes = buf.tell()
    buf = io.BytesIO()
    torch.save(_cast(state_dict, dtype), buf)
    payload = buf.getvalue()
    if zstd_level is not None:
        import zstandard

        payload = zstandard.ZstdCompressor(level=zstd_level).compress(payload)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<B", zstd_level is not None) + payload)
    os.replace(tmp, path)
    size = os.path.getsize(path)
    return {"bytes": size, "fp32_bytes": fp32_bytes, "size_ratio": size / fp32_bytes}


def load_compressed(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Read a ``.tfxz`` file; tensors keep the stored dtype (``load_state_dict`` casts)."""
    with open(path, "rb") as f:
        if f.read(8) != MAGIC:
            raise CheckpointError(f"{path} is not a tfx compressed model file (bad magic)")
        (compressed,) = struct.unpack("<B", f.read(1))
        payload = f.read()
    if compressed:
        import zstandard

        payload = zstandard.ZstdDecompressor().decompress(payload)
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


class CompressedExport(Technique):
    """At the end of training write ``model.tfxz`` (``dtype``: fp32 | bf16 | fp16;
    ``zstd_level``: 1-22 or null) and report its size ratio to fp32."""

    name = "compressed_export"
    stage = Stage.SURGERY

    def __init__(self, dtype: str = "bf16", zstd_level: Optional[int] = 3) -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"compression.compressed_export.dtype={dtype!r}; "
                              f"choose one of {', '.join(DTYPES)}")
        if zstd_level is not None and not 1 <= zstd_level <= 22:
            raise ConfigError("compression.compressed_export.zstd_level must be 1-22 or null")
        self.dtype, self.zstd_level = dtype, zstd_level

    def validate(self, plan) -> None:
        refuse_layouts(plan, "compression=compressed_export", "writes the whole model from rank 0")

    def export(self, model: nn.Module, out_dir, ctx: RunContext) -> Dict[str, float]:
        # the built model's keys (an HF model keeps tfx's ``lm.`` prefix), so
        # load_compressed_state(fresh_model, load_compressed(path)) reloads it
        sd = inference_state_dict(strip_wrappers(model).state_dict())
        info = save_compressed(sd, os.path.join(out_dir, "model" + EXTENSION),
                               DTYPES[self.dtype], self.zstd_level)
        return {"compressed_export/bytes": info["bytes"],
                "compressed_export/size_ratio": info["size_ratio"]}
