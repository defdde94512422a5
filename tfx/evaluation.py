"""Quality, speed and size measurements shared by training, evaluate.py and benchmarks."""
from __future__ import annotations

import io
import math
import time
from typing import Dict, Optional

import torch
from torch import nn

from tfx.data import TokenBlocks, eval_batches
from tfx.train.loss import IGNORE_INDEX, ce_sum


@torch.no_grad()
def evaluate_lm(model: nn.Module, blocks: TokenBlocks, batch_size: int, device,
                max_batches: Optional[int] = None, ctx=None) -> Dict[str, float]:
    """Token-weighted mean cross-entropy and perplexity over ``blocks`` (in order)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(blocks, batch_size, max_batches):
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        total += float(ce_sum(model(ids), labels))
        count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    loss = total / max(1, count)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


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


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes ``torch.save(model.state_dict())`` takes: the model's size on disk."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def count_params(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n
