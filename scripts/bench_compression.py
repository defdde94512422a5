"""Compare compression techniques on one small GPT: params, size, speed, perplexity.

    python scripts/bench_compression.py            # full (~10-15 min on 2 CPU cores)
    python scripts/bench_compression.py --quick    # smoke version (~2 min)

Trains a baseline, then derives every variant through the same tfx techniques that
``compression=[...]`` uses, with the trainer's hook order (Pipeline.apply_to_model,
transform_loss, after_optimizer_step, export). Pruning, N:M, structured, QAT and
low-rank start from the trained baseline and fine-tune for ``--ft-steps``; the row
"baseline +ft" continues the baseline for the same steps, so quality differences
are not just extra training. The distilled student trains from scratch for as many
steps as the baseline (same config and seed), so "baseline" is "the student alone".

Speed is eager CPU inference (batch x seq tokens through the model, median of
repeats); it is noisy on a shared machine and says nothing about GPUs. Prints a
markdown table with ratios to the baseline in every column.
"""
from __future__ import annotations

import argparse
import copy
import glob
import math
import os
import sys
import sysconfig
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tfx.compression import (Distillation, LowRank, MagnitudePruning, NMPruning, QAT,  # noqa: E402
                             StructuredPruning, make_permanent, quantize_model, save_sparse)
from tfx.compression.quantize import convert_qat, save_quantized  # noqa: E402
from tfx.core import Pipeline, RunContext, StepInfo, TfxError  # noqa: E402
from tfx.model import GPT, GPTConfig  # noqa: E402

CTX = RunContext()


# -- data -------------------------------------------------------------------------------
def load_blocks(seq_len: int, max_bytes: int):
    """(train, val) LongTensors of shape (n, seq_len + 1): byte-level Python stdlib
    sources, a stand-in for the offline ``pydocs`` default that needs no tokenizer."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    text = b"".join(open(f, "rb").read() for f in files)[:max_bytes]
    data = torch.from_numpy(np.frombuffer(text, dtype=np.uint8).astype(np.int64))
    n = len(data) // (seq_len + 1)
    blocks = data[: n * (seq_len + 1)].view(n, seq_len + 1)
    blocks = blocks[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    n_val = max(n // 20, 8)
    return blocks[n_val:], blocks[:n_val]


# -- training (the trainer's hook order, in miniature) ------------------------------------
def train(model, techniques, blocks, steps, lr, batch_size, seed=0):
    pipe = Pipeline(techniques)
    model = pipe.apply_to_model(model, CTX)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1))))
    hidden = any(getattr(t, "needs_hidden", False) for t in pipe.techniques)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        b = blocks[torch.randint(len(blocks), (batch_size,), generator=g)]
        batch = {"input_ids": b[:, :-1], "labels": b[:, 1:]}
        info = StepInfo(step=step)
        with pipe.step_context(model, info, CTX):
            logits, h = model(batch["input_ids"], return_hidden=True)
            ce_sum = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
            out = {"logits": logits, "ce_sum": ce_sum, "norm": batch["labels"].numel()}
            if hidden:
                out["hidden"] = h
            loss = pipe.transform_loss(ce_sum / out["norm"], batch, out, info, CTX)
        pipe.scale_loss(loss).backward()
        pipe.before_optimizer_step(model, opt, info, CTX)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        pipe.optimizer_step(opt)
        opt.zero_grad(set_to_none=True)
        sched.step()
        pipe.after_optimizer_step(model, StepInfo(step=step + 1), CTX)
    return model.eval(), pipe


# -- measurements ------------------------------------------------------------------------
@torch.inference_mode()
def val_ppl(model, val, batch_size=16) -> float:
    total, n = 0.0, 0
    for i in range(0, len(val), batch_size):
        b = val[i:i + batch_size]
        logits = model(b[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), b[:, 1:].flatten(), reduction="sum").item()
        n += b[:, 1:].numel()
    return math.exp(total / n)


@torch.inference_mode()
def measure_speed(rows: List[Dict], models: List, val, batch_size=8, rounds=7) -> None:
    """Tokens/s of every model, timed round-robin after all training so that load from
    other processes hits all variants alike; the fastest of ``rounds`` is kept."""
    x = val[:batch_size, :-1]
    best = [float("inf")] * len(models)
    for m in models:
        m(x)  # warm-up (allocator, torchao kernels)
    for _ in range(rounds):
        for i, m in enumerate(models):
            t0 = time.perf_counter()
            m(x)
            best[i] = min(best[i], time.perf_counter() - t0)
    for r, t in zip(rows, best):
        r["tok_s"] = x.numel() / t


def params(model) -> int:
    return sum({id(p): p.numel() for p in model.parameters()}.values())


def size_of(model, tmp, kind="pt") -> int:
    path = os.path.join(tmp, f"m.{'tfxs' if kind == 'sparse' else 'pt'}")
    if kind == "sparse":
        return save_sparse(model, path)["bytes"]
    return save_quantized(model, path)  # torch.save of the state_dict


def row(name, model, val, tmp, kind="pt", note="", nparams=None) -> Dict:
    return {"variant": name, "params": nparams or params(model), "bytes": size_of(model, tmp, kind),
            "ppl": val_ppl(model, val), "note": note, "model": model}


# -- the benchmark ---------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few steps, for a smoke run")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ft-steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 keeps timings stable on a shared CPU box")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.ft_steps = 20, 10
    torch.set_num_threads(args.threads)
    seq, bs, lr, ft_lr = 128, args.batch_size, 3e-3, 1e-3
    train_blocks, val = load_blocks(seq, 4_000_000)
    val = val[:16] if args.quick else val[:96]
    student_cfg = GPTConfig(vocab_size=256, block_size=seq, n_layer=4, n_head=4, d_model=128)
    teacher_cfg = GPTConfig(vocab_size=256, block_size=seq, n_layer=4, n_head=8, d_model=256)
    rows: List[Dict] = []
    t_start = time.time()
    tmp = tempfile.mkdtemp()

    def fresh(cfg=student_cfg, seed=0):
        torch.manual_seed(seed)
        return GPT(cfg)

    def finetune(techniques, steps=args.ft_steps):
        return train(copy.deepcopy(base), techniques, train_blocks, steps, ft_lr, bs, seed=1)[0]

    def log(msg):
        print(f"[{time.time() - t_start:6.0f}s] {msg}", flush=True)

    base, _ = train(fresh(), [], train_blocks, args.steps, lr, bs)
    rows.append(row("baseline (fp32)", base, val, tmp))
    log("baseline")
    rows.append(row(f"baseline +{args.ft_steps} steps", finetune([]), val, tmp, note="reference for fine-tuned rows"))
    end = max(args.ft_steps * 3 // 5, 2)
    for s in (0.5, 0.8, 0.9):
        m = finetune([MagnitudePruning(sparsity=s, schedule="cubic", start_step=0, end_step=end,
                                       frequency=max(end // 10, 1))])
        make_permanent(m)
        nnz = params(m) - sum(int((p == 0).sum()) for p in m.parameters())
        rows.append(row(f"unstructured {int(s * 100)}% (global)", m, val, tmp, "sparse", nparams=nnz,
                        note="params = non-zeros; .tfxs bitmask file; dense kernels"))
        log(f"unstructured {s}")
    for r in (0.25, 0.5):
        m = finetune([StructuredPruning(head_ratio=r, neuron_ratio=r)])
        rows.append(row(f"structured {int(r * 100)}% heads+neurons", m, val, tmp))
        log(f"structured {r}")
    m = make_permanent(finetune([NMPruning(n=2, m=4)]))
    nnz = params(m) - sum(int((p == 0).sum()) for p in m.parameters())
    rows.append(row("2:4 (N:M masks)", m, val, tmp, "sparse", nparams=nnz,
                    note="dense kernels on CPU; 2:4 kernels need CUDA"))
    log("2:4")
    for scheme in ("int8_dynamic", "int8_weight_only", "int4_weight_only"):
        try:
            q = quantize_model(copy.deepcopy(base), scheme)
            rows.append(row(f"PTQ {scheme}", q, val, tmp, nparams=params(base)))
        except TfxError as err:
            rows.append({"variant": f"PTQ {scheme}", "note": f"unsupported on CPU ({type(err).__name__})"})
        log(scheme)
    m = convert_qat(finetune([QAT(scheme="int8")]), "int8")
    rows.append(row("QAT int8 (+ft)", m, val, tmp, nparams=params(base)))
    log("qat")
    for ratio in (0.5, 0.25):
        m = finetune([LowRank(rank_ratio=ratio)])
        rows.append(row(f"low-rank {ratio:g} rank (+ft)", m, val, tmp))
        log(f"lowrank {ratio}")
    teacher, _ = train(fresh(teacher_cfg, seed=1), [], train_blocks, args.steps, lr, bs)
    rows.append(row("teacher (4x, trained alone)", teacher, val, tmp))
    log("teacher")
    student, _ = train(fresh(), [Distillation(teacher=teacher, alpha=0.5, temperature=2.0)],
                       train_blocks, args.steps, lr, bs)
    rows.append(row("student distilled from teacher", student, val, tmp,
                    note=f"same config/steps/seed as baseline = student alone"))
    log("distill")
    timed = [r for r in rows if "model" in r]
    measure_speed(timed, [r.pop("model") for r in timed], val)
    log("speed")
    print_table(rows, args)


def print_table(rows: List[Dict], args) -> None:
    base = rows[0]
    print(f"\nsteps={args.steps} ft_steps={args.ft_steps} batch={args.batch_size}x128 "
          f"threads={args.threads} torch={torch.__version__}\n")
    print("| variant | params | size (KB) | tokens/s | val ppl | note |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "ppl" not in r:
            print(f"| {r['variant']} | - | - | - | - | {r['note']} |")
            continue
        cells = [f"{r['params'] / 1e6:.3f}M ({r['params'] / base['params']:.2f}x)",
                 f"{r['bytes'] / 1024:.0f} ({r['bytes'] / base['bytes']:.2f}x)",
                 f"{r['tok_s']:.0f} ({r['tok_s'] / base['tok_s']:.2f}x)",
                 f"{r['ppl']:.2f} ({r['ppl'] / base['ppl']:.2f}x)"]
        print(f"| {r['variant']} | " + " | ".join(cells) + f" | {r['note']} |")


if __name__ == "__main__":
    main()
