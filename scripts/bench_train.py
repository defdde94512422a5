"""Training-step benchmark: tfx against plain PyTorch and Hugging Face, plus
precision, compile and activation-checkpointing variants, side by side.

    python scripts/bench_train.py            # full (a few minutes on 2 CPU cores)
    python scripts/bench_train.py --quick    # smoke run

Each variant runs in its own subprocess so peak memory (peak RSS on CPU, max
allocated on CUDA) belongs to that variant alone; the tfx/plain pair is repeated
alternately and the median taken, so slow drift of a shared machine cancels out.
All variants train the same model size on the same pydocs batches.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = dict(n_layer=4, n_head=4, d_model=256)  # conf/model/small.yaml


def _cfg(args, *overrides):
    from hydra import compose, initialize_config_dir

    from tfx.config import register_configs

    register_configs()
    base = ["data=pydocs", "model=small", "optim=adamw", f"data.seq_len={args.seq_len}",
            f"trainer.batch_size={args.batch_size}", "logger=none", "trainer.progress=false",
            f"trainer.max_steps={args.warmup + args.steps}", "trainer.eval_every=0", "trainer.ckpt_every=0"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("train", overrides=base + list(overrides))


def _timed(step, args, device):
    import torch

    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_tfx(args, overrides):
    import tempfile

    from tfx.train.run import build

    job = build(_cfg(args, *overrides), tempfile.mkdtemp())
    return _timed(job.trainer.train_step, args, job.ctx.device), job.ctx.device


def run_plain(args, overrides):
    """The same GPT and optimizer in the shortest correct PyTorch loop."""
    import torch
    import torch.nn.functional as F

    from tfx.data import BlockLoader, prepare_data
    from tfx.model import GPT, GPTConfig
    from tfx.optim import WarmupDecay, adamw
    from tfx.train.build import resolve_device

    cfg = _cfg(args)
    data = prepare_data(cfg.data)
    device = resolve_device("auto")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=data.vocab_size, block_size=args.seq_len, **MODEL)).to(device)
    opt = adamw(model, lr=1e-3)
    sched = WarmupDecay("cosine", 20)(opt, 1000)
    loader = BlockLoader(data.train, args.batch_size)

    def step():
        batch = next(loader)
        x, y = batch["input_ids"].to(device), batch["labels"].to(device)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()

    return _timed(step, args, device), device


def _hf_model(vocab, args):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=args.seq_len, n_embd=MODEL["d_model"],
                                      n_layer=MODEL["n_layer"], n_head=MODEL["n_head"], resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa"))


def run_hf_plain(args, overrides):
    import torch

    from tfx.data import BlockLoader, prepare_data
    from tfx.train.build import resolve_device

    data = prepare_data(_cfg(args).data)
    device = resolve_device("auto")
    model = _hf_model(data.vocab_size, args).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    loader = BlockLoader(data.train, args.batch_size)

    def step():
        ids = next(loader)["input_ids"].to(device)
        model(input_ids=ids, labels=ids).loss.backward()  # HF shifts labels itself
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _timed(step, args, device), device


def run_hf_trainer(args, overrides):
    import tempfile

    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from tfx.data import prepare_data
    from tfx.train.build import resolve_device

    data = prepare_data(_cfg(args).data)
    device = resolve_device("auto")
    blocks = data.train

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            ids = torch.from_numpy(blocks.block(i)[:-1].astype("int64"))
            return {"input_ids": ids, "labels": ids}

    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    targs = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=args.warmup + args.steps,
                              per_device_train_batch_size=args.batch_size, learning_rate=1e-3,
                              weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, report_to=[],
                              save_strategy="no", logging_strategy="no", use_cpu=device.type == "cpu",
                              dataloader_num_workers=0, disable_tqdm=True)
    Trainer(model=_hf_model(data.vocab_size, args), args=targs, train_dataset=Blocks(),
            callbacks=[StepTimer()]).train()
    return statistics.median(times[args.warmup:]), device


VARIANTS = {
    "plain PyTorch loop": (run_plain, []),
    "tfx fp32": (run_tfx, []),
    "HF GPT2LMHeadModel, plain loop": (run_hf_plain, []),
    "HF transformers.Trainer": (run_hf_trainer, []),
    "tfx bf16": (run_tfx, ["precision=bf16"]),
    "tfx compile": (run_tfx, ["compile=true"]),
    "tfx activation ckpt (full)": (run_tfx, ["memory=activation_ckpt"]),
    "tfx activation ckpt (selective)": (run_tfx, ["memory=selective_ckpt"]),
}


def worker(args) -> None:
    import torch

    from tfx.log import peak_memory_mb

    torch.manual_seed(0)
    fn, overrides = VARIANTS[args.worker]
    step_s, device = fn(args, overrides)
    print(json.dumps({"step_s": step_s, "peak_mb": peak_memory_mb(device), "device": str(device)}))


def spawn(name, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="alternating tfx/plain pairs")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats, args.batch_size = 4, 2, 1, 8
    if args.worker:
        return worker(args)

    results = {}
    for _ in range(args.repeats):  # alternate the pair whose ratio must be precise
        for name in ("plain PyTorch loop", "tfx fp32"):
            results.setdefault(name, []).append(spawn(name, args))
    for name in list(VARIANTS)[2:]:
        results[name] = [spawn(name, args)]

    tokens = args.batch_size * args.seq_len
    ok = {k: [r for r in v if "error" not in r] for k, v in results.items()}
    med = {k: statistics.median(r["step_s"] for r in v) for k, v in ok.items() if v}
    mem = {k: max(r["peak_mb"] for r in v) for k, v in ok.items() if v}
    device = next(r["device"] for v in ok.values() for r in v)
    base, base_mem = med["tfx fp32"], mem["tfx fp32"]
    print(f"# bench_train: model {MODEL}, batch {args.batch_size} x seq {args.seq_len}, "
          f"{args.steps} timed steps (median), device {device}, {time.strftime('%Y-%m-%d')}")
    print("| variant | step (ms) | tokens/s | time vs tfx fp32 | peak mem (MB) | mem vs tfx fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in VARIANTS:
        if name not in med:
            err = results[name][0].get("error", "failed")
            print(f"| {name} | failed: {err[:80]} | | | | |")
            continue
        print(f"| {name} | {1000 * med[name]:.0f} | {tokens / med[name]:,.0f} | {med[name] / base:.2f}x "
              f"| {mem[name]:,.0f} | {mem[name] / base_mem:.2f}x |")
    if "plain PyTorch loop" in med:
        overhead = med["tfx fp32"] / med["plain PyTorch loop"] - 1
        print(f"\ntfx overhead vs the plain loop: {100 * overhead:+.1f}% (target: at most +3%)")


if __name__ == "__main__":
    main()
