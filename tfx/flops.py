"""FLOPs per token, the peak of the hardware, MFU and HFU (docs/metrics.md).

One formula for every model (its ``flops_per_token(seq_len, layers=None)``, tfx's GPT
and Hugging Face models alike), counting multiply-adds as 2 FLOPs and the backward
pass as twice the forward:

    training FLOPs per token = 6 * N_matmul + 12 * sum over layers of w_l * P_l(T) / T

* ``N_matmul``: weights that take part in a matmul: every Linear (GPT-2's Conv1D) of the
  decoder layers and the output head (a head tied to the token embedding counts: the
  lookup is free, the head's matmul is not). Embedding lookups, norms and biases are
  not matmuls and are left out.
* ``w_l``: attention width of layer ``l`` (query heads x head_dim); ``T``: sequence length.
* ``P_l(T)``: (query, key) pairs the attention of layer ``l`` scores per sequence.
  Causal attention scores ``T (T + 1) / 2`` pairs (the masked upper triangle is not
  counted: flash-style kernels skip it), so the attention term is ``6 w (T + 1)`` per
  layer, about half of PaLM's / nanoGPT's ``12 w T`` (which count the full square). A
  sparse pattern counts only the pairs it keeps (``Pattern.density``).

QK^T and AV are 2 matmuls of ``2 w`` FLOPs per pair forward, 4 backward: ``12 w`` per pair.

MFU = FLOPs per token x tokens/s / (peak FLOP/s x devices). HFU adds what activation
checkpointing recomputes. A fully checkpointed layer runs its forward again in
backward (``6N -> 8N`` for its matmuls, attention likewise), except the MLP's last
projection: torch's non-reentrant checkpoint stops recomputing once backward has all
it saved, and nothing saves that projection's output unless a dropout follows it
(checked against ``torch.utils.flop_counter`` in tests/test_flops.py). The selective
policy saves every matmul and attention output and recomputes only pointwise ops,
which the formula does not count: 0.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.utils.checkpoint
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from tfx.model.anatomy import anatomy_of, in_features, is_conv1d, out_features

#: Dense peak TFLOP/s of one GPU per dtype: NVIDIA's datasheet tensor-core figures "with
#: sparsity" halved (H100/H200: the H100 whitepaper's dense values, e.g. 989.4 rather than
#: 1979 / 2; fp32: the non-tensor-core figure). Patterns are tried in order against
#: ``torch.cuda.get_device_name`` (H100 SXM reports "NVIDIA H100 80GB HBM3").
GPU_PEAK_TFLOPS: List[Tuple[str, str, Dict[str, float]]] = [
    (r"H100.*NVL", "NVIDIA H100 NVL datasheet",
     {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5}),
    (r"H100.*PCIe", "NVIDIA H100 PCIe datasheet",
     {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5, "fp8": 1513.0}),
    (r"H100", "NVIDIA H100 SXM datasheet",
     {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}),
    (r"H200.*NVL", "NVIDIA H200 NVL datasheet",
     {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5}),
    (r"H200", "NVIDIA H200 SXM datasheet",
     {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}),
    (r"A100", "NVIDIA A100 datasheet",
     {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    (r"L40S", "NVIDIA L40S datasheet",
     {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05, "fp8": 733.0}),
    (r"\bL4\b", "NVIDIA L4 datasheet",
     {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0, "fp8": 242.5}),
]

PROBE_SIZE = 1024       # the CPU probe multiplies two PROBE_SIZE x PROBE_SIZE matrices
PROBE_SECONDS = 0.1     # per trial; the best of PROBE_TRIALS trials is the peak
PROBE_TRIALS = 3
_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
           "fp16": torch.float16}


# -- the count (the models implement the formula: flops_per_token) ----------------------
def flops_fn(model: nn.Module) -> Optional[Callable[..., float]]:
    """The model's ``flops_per_token(seq_len, layers=None)`` under any wrapper (DDP,
    FSDP, compile, pipeline stages), or None when the model does not say."""
    return next((m.flops_per_token for m in model.modules() if hasattr(m, "flops_per_token")), None)


def _full_recompute(wrapper: CheckpointWrapper) -> bool:
    """A checkpoint wrapper without a ``context_fn`` recomputes its whole forward; one
    with a selective policy (tfx's saves every matmul and attention) recomputes only
    pointwise ops."""
    keywords = getattr(wrapper.checkpoint_fn, "keywords", {}) or {}
    return keywords.get("context_fn") is None


def _matmul_weights(m: nn.Module) -> int:
    """Weights of a Linear or GPT-2 ``Conv1D`` (0 for anything else)."""
    return in_features(m) * out_features(m) if isinstance(m, nn.Linear) or is_conv1d(m) else 0


def _unrecomputed_tail(anat, layer: nn.Module) -> int:
    """Matmul weights at the end of ``layer`` that a non-reentrant checkpoint does not
    run again: torch stops recomputing once backward has every tensor it saved
    (``torch.utils.checkpoint.set_checkpoint_early_stop``, on by default), and the
    output of the MLP's last projection is saved by nothing unless a dropout follows
    it in the MLP (its mask is recomputed from that output)."""
    down = anat.mlp(layer).down
    last = [m for m in down.modules() if _matmul_weights(m)][-1:]  # low rank: the second factor
    parent = next((m for m in layer.modules() if any(c is down for c in m.children())), None)
    dropout = parent is not None and any(isinstance(c, nn.Dropout) and c.p > 0 for c in parent.children())
    return 0 if dropout or not last else _matmul_weights(last[0])


def recompute_flops_per_token(model: nn.Module, seq_len: int, total_layers: Optional[int] = None) -> float:
    """FLOPs per token that activation checkpointing runs a second time in backward:
    the forward (a third of the training FLOPs) of every fully checkpointed layer,
    less the MLP's last projection where torch's early stop skips it (see
    :func:`_unrecomputed_tail`). ``total_layers``: decoder layers of the whole model
    when ``model`` holds only some of them (a pipeline stage): the local share is
    scaled to the whole model."""
    fn = flops_fn(model)
    wrapped = [m for m in model.modules() if isinstance(m, CheckpointWrapper) and _full_recompute(m)]
    if fn is None or not wrapped:
        return 0.0
    layers = [w._checkpoint_wrapped_module for w in wrapped]
    recompute = fn(seq_len, layers=layers, forward_only=True)
    anat = anatomy_of(model)
    if getattr(torch.utils.checkpoint, "_enable_checkpoint_early_stop", None) is not False:  # None: on
        recompute -= 2.0 * sum(_unrecomputed_tail(anat, layer) for layer in layers)
    if total_layers:
        recompute *= total_layers / max(1, len(anat.decoder_layers(model)))
    return recompute


# -- the peak -------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def measure_matmul_flops(dtype: torch.dtype = torch.float32, n: int = PROBE_SIZE,
                         seconds: float = PROBE_SECONDS, trials: int = PROBE_TRIALS) -> float:
    """FLOP/s of an ``n x n`` GEMM in ``dtype`` on this process's CPU threads, the best of
    ``trials`` runs of ``seconds`` each (cached per process). The CPU has no datasheet
    peak tfx could look up; what the BLAS reaches on a large square GEMM is the practical
    ceiling a training step's matmuls could reach."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.mm(a, b)  # warm-up: kernels chosen, pages touched
    best = 0.0
    for _ in range(trials):
        iters, start = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            iters += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        best = max(best, 2.0 * n ** 3 * iters / elapsed)
    return best


def gpu_peak(name: str, dtype: str) -> Optional[Tuple[float, str]]:
    """(peak FLOP/s, source) of a GPU named ``name`` in ``dtype``, or None if unknown."""
    for pattern, source, table in GPU_PEAK_TFLOPS:
        if re.search(pattern, name):
            if dtype not in table:
                return None
            return table[dtype] * 1e12, f"{source}: {dtype} dense {table[dtype]:g} TFLOPS"
    return None


def run_dtype(compute_dtype: Optional[torch.dtype], model: Optional[nn.Module] = None) -> str:
    """The dtype the run's matmuls use: fp8 when torchao's ``Float8Linear`` layers are in
    the model, else the autocast dtype; fp32 is tf32 on CUDA when torch allows it
    (``torch.set_float32_matmul_precision('high')``)."""
    if model is not None and any(type(m).__name__ == "Float8Linear" for m in model.modules()):
        return "fp8"
    if compute_dtype == torch.bfloat16:
        return "bf16"
    if compute_dtype == torch.float16:
        return "fp16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _cpu_probe(dtype: str) -> str:
    """The GEMM dtype the CPU peak is measured in for a run in ``dtype``."""
    return "fp16" if dtype == "fp16" else ("bf16" if dtype in ("bf16", "fp8") else "fp32")


def peak_flops(device: torch.device, dtype: str, override_tflops: Optional[float] = None
               ) -> Tuple[Optional[float], str]:
    """(peak FLOP/s of one device in ``dtype``, where the number comes from)."""
    if override_tflops:
        return override_tflops * 1e12, f"trainer.peak_tflops={override_tflops:g}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = gpu_peak(name, dtype)
        if found is None:
            return None, f"{name} ({dtype}) is not in tfx.flops.GPU_PEAK_TFLOPS; set trainer.peak_tflops"
        return found
    if device.type == "cpu":
        probe = _cpu_probe(dtype)
        flops = measure_matmul_flops(_DTYPES[probe])
        return flops, (f"measured: {probe} {PROBE_SIZE}x{PROBE_SIZE} GEMM, best of {PROBE_TRIALS} x "
                       f"{PROBE_SECONDS:g} s, {torch.get_num_threads()} threads")
    return None, f"no peak known for device type {device.type}; set trainer.peak_tflops"


# -- utilisation ----------------------------------------------------------------------
@dataclass(frozen=True)
class Flops:
    """What MFU and HFU are computed from (built once by the build order)."""

    per_token: float              # model FLOPs per token (MFU's numerator)
    hardware_per_token: float     # + activation-checkpointing recompute (HFU's numerator)
    peak: Optional[float] = None  # peak FLOP/s of one device in the run's dtype
    devices: int = 1              # devices the job runs on (world size)
    peak_source: str = ""
    dtype: str = "fp32"

    def utilization(self, tokens_per_sec: float) -> Dict[str, float]:
        """``tflops`` (model FLOPs per second, all devices), and ``mfu``/``hfu`` when
        the peak is known."""
        out = {"tflops": self.per_token * tokens_per_sec / 1e12}
        if self.peak:
            total = self.peak * self.devices
            out["mfu"] = self.per_token * tokens_per_sec / total
            out["hfu"] = self.hardware_per_token * tokens_per_sec / total
        return out

    def remeasured(self) -> "Flops":
        """The CPU peak measured again (at the end of the run) and the higher of the two
        kept: one probe taken while another process held the cores (a job exiting, a
        W&B service starting) measured 0.12 instead of 0.36 TFLOP/s and reported MFU 140%.
        A peak from a table or ``trainer.peak_tflops`` is returned unchanged."""
        if not (self.peak and self.peak_source.startswith("measured: ")):
            return self
        again = measure_matmul_flops.__wrapped__(_DTYPES[_cpu_probe(self.dtype)])  # not the cache
        if again <= self.peak:
            return self
        return dataclasses.replace(self, peak=again)

    def summary(self) -> Dict[str, object]:
        return {"flops_per_token": self.per_token, "hfu_flops_per_token": self.hardware_per_token,
                "peak_tflops": self.peak / 1e12 if self.peak else None, "peak_source": self.peak_source,
                "peak_dtype": self.dtype}

