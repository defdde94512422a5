"""Quality, speed and size measurements shared by training, evaluate.py and benchmarks."""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from tfx.data import TokenBlocks, eval_batches
from tfx.core.loss import IGNORE_INDEX, ce_sum


def _model_ce_sum(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    return ce_sum(model(batch["input_ids"]), batch["labels"])


@torch.no_grad()
def evaluate_lm(model: nn.Module, blocks: TokenBlocks, batch_size: int, device,
                max_batches: Optional[int] = None,
                ce_sum_fn: Optional[Callable[[nn.Module, Dict[str, torch.Tensor]], torch.Tensor]] = None,
                tokenizer=None) -> Dict[str, float]:
    """Token-weighted mean cross-entropy and perplexity over ``blocks`` (in order).

    ``ce_sum_fn(model, batch)``: summed cross-entropy of a batch on the device (default:
    the model's logits; pipeline parallel passes its schedule's). With ``tokenizer``
    the result also has ``bpb`` (bits per UTF-8 byte of the predicted text, comparable
    across tokenizers) and ``bits_per_token``. The loss is summed on the device and read
    once at the end: no host-device synchronisation per batch."""
    ce_sum_fn = ce_sum_fn or _model_ce_sum
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count, n_blocks = 0, 0
    for batch in eval_batches(blocks, batch_size, max_batches):
        count += int((batch["labels"] != IGNORE_INDEX).sum())  # on the host
        n_blocks += batch["labels"].shape[0]
        ce = ce_sum_fn(model, {k: v.to(device) for k, v in batch.items()})
        if isinstance(ce, DTensor):  # tensor parallel's loss_parallel: a replicated scalar
            ce = ce.full_tensor()
        total += torch.as_tensor(ce, device=device).double()
    model.train(was_training)
    nats = float(total)
    loss = nats / max(1, count)
    out = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
    if tokenizer is not None:
        n_bytes = predicted_bytes(blocks, n_blocks, tokenizer)
        out["bits_per_token"] = loss / math.log(2)
        out["bpb"] = nats / math.log(2) / max(1, n_bytes)
    return out


def predicted_bytes(blocks: TokenBlocks, n_blocks: int, tokenizer) -> int:
    """UTF-8 bytes of the text whose tokens the first ``n_blocks`` blocks predict.

    Block ``i`` predicts tokens ``i*T+1 .. (i+1)*T`` (see TokenBlocks), so the first
    ``n`` blocks predict tokens ``1 .. n*T``: decode them once (end-of-document tokens
    are separators, not text: 0 bytes) and count the bytes."""
    ids = np.asarray(blocks.tokens[1:n_blocks * blocks.seq_len + 1], dtype=np.int64)
    ids = ids[ids != tokenizer.eos_id]
    return len(tokenizer.decode(ids.tolist()).encode("utf-8"))


@torch.no_grad()
def inference_speed(model: nn.Module, batch_size: int, seq_len: int, vocab_size: int, device,
                    iters: int = 10, warmup: int = 2) -> Dict[str, float]:
    """Forward-only throughput on random tokens: tokens/s and median latency per batch."""
    model.eval()
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), device=device)
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        model(ids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {"tokens_per_sec": batch_size * seq_len / median, "latency_ms": 1000 * median}


