"""Fine-tuning benchmark on the real SmolLM2-135M: tfx's training step against
``transformers.Trainer`` on the same model, batch, precision and optimizer settings,
and full fine-tuning against LoRA (peft) in both.

    python scripts/bench_hf.py                 # a few minutes on 2 CPU cores
    python scripts/bench_hf.py --quick         # smoke run
    python scripts/bench_hf.py --batch-size 4 --seq-len 256 --steps 8

Each variant runs in its own subprocess, so its peak memory (peak RSS on CPU, max
allocated on CUDA) is its own; the tfx/Trainer pair is repeated alternately and the
median taken, so slow drift of a shared machine cancels out. Every variant trains on
the same Shakespeare blocks, tokenized with SmolLM2's own tokenizer, with AdamW
(lr 1e-4, betas 0.9/0.95, weight decay 0.1 on matrices), gradient clipping at 1.0.
The model is built once from the offline GGUF (``tfx.model.hf.ensure_smollm2``).
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

LORA = dict(rank=8, alpha=16, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
LR, BETAS, WD, CLIP = 1e-4, (0.9, 0.95), 0.1, 1.0


def _cfg(args, *overrides):
    from hydra import compose, initialize_config_dir

    from tfx.config import register_configs

    register_configs()
    base = ["model=smollm2", "data=shakespeare", "optim=adamw", f"data.seq_len={args.seq_len}",
            f"trainer.batch_size={args.batch_size}", "logger=none", "trainer.progress=false",
            f"trainer.max_steps={args.warmup + args.steps}", "trainer.eval_every=0",
            "trainer.ckpt_every=0", f"optim.lr={LR}", f"trainer.grad_clip={CLIP}",
            f"optim.fused={str(args.fused).lower()}"]
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


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_tfx(args, lora: bool):
    import tempfile

    from tfx.train.run import build

    overrides = []
    if lora:
        overrides = ["compression=lora"] + [
            f"compression.lora.{k}={json.dumps(v) if isinstance(v, list) else v}".replace('"', "")
            for k, v in LORA.items()]
    job = build(_cfg(args, *overrides), tempfile.mkdtemp())
    return _timed(job.trainer.train_step, args, job.ctx.device), job.ctx.device, _trainable(job.model)


def run_trainer(args, lora: bool):
    import tempfile

    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from tfx.config import model_spec, use_model_tokenizer
    from tfx.data import prepare_data
    from tfx.model.hf import SMOLLM2_PRESET, load_causal_lm
    from tfx.train.build import resolve_device

    cfg = _cfg(args)
    use_model_tokenizer(cfg, model_spec(cfg))  # SmolLM2's tokenizer, as tfx's build does
    data = prepare_data(cfg.data)
    device = resolve_device("auto")
    blocks = data.train
    model = load_causal_lm(SMOLLM2_PRESET).train()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"],
                                                 lora_dropout=LORA["dropout"],
                                                 target_modules=LORA["target_modules"]))

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
                              per_device_train_batch_size=args.batch_size, learning_rate=LR,
                              adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=WD,
                              max_grad_norm=CLIP, report_to=[], save_strategy="no",
                              logging_strategy="no", use_cpu=device.type == "cpu",
                              optim="adamw_torch_fused" if args.fused else "adamw_torch",
                              dataloader_num_workers=0, disable_tqdm=True)
    trainable = _trainable(model)
    Trainer(model=model, args=targs, train_dataset=Blocks(), callbacks=[StepTimer()]).train()
    return statistics.median(times[args.warmup:]), device, trainable


VARIANTS = {
    "tfx, full fine-tune": (run_tfx, False),
    "transformers.Trainer, full fine-tune": (run_trainer, False),
    "tfx, LoRA r=8 (q,k,v,o)": (run_tfx, True),
    "transformers.Trainer + peft, LoRA r=8": (run_trainer, True),
}
PAIR = ("tfx, full fine-tune", "transformers.Trainer, full fine-tune")


def worker(args) -> None:
    import torch

    from tfx.log import peak_memory_mb

    torch.manual_seed(0)
    fn, lora = VARIANTS[args.worker]
    step_s, device, trainable = fn(args, lora)
    print(json.dumps({"step_s": step_s, "peak_mb": peak_memory_mb(device), "device": str(device),
                      "trainable": trainable}))


def spawn(name, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    if not args.fused:
        cmd.append("--no-fused")
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="alternating tfx/Trainer pairs")
    p.add_argument("--no-fused", dest="fused", action="store_false",
                   help="foreach AdamW in both (default: fused AdamW in both, Trainer's default)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats, args.batch_size, args.seq_len = 2, 1, 1, 1, 64
    if args.worker:
        return worker(args)

    from tfx.model.hf import ensure_smollm2

    ensure_smollm2()  # converted once, outside the timed subprocesses
    results = {}
    for _ in range(args.repeats):
        for name in PAIR:
            results.setdefault(name, []).append(spawn(name, args))
    for name in VARIANTS:
        if name not in PAIR:
            results[name] = [spawn(name, args)]

    tokens = args.batch_size * args.seq_len
    ok = {k: [r for r in v if "error" not in r] for k, v in results.items()}
    med = {k: statistics.median(r["step_s"] for r in v) for k, v in ok.items() if v}
    mem = {k: max(r["peak_mb"] for r in v) for k, v in ok.items() if v}
    device = next((r["device"] for v in ok.values() for r in v), "?")
    print(f"# bench_hf: SmolLM2-135M, batch {args.batch_size} x seq {args.seq_len}, fp32, "
          f"{'fused' if args.fused else 'foreach'} AdamW, {args.steps} timed steps (median), "
          f"device {device}, {time.strftime('%Y-%m-%d')}")
    print("| variant | trainable params | step (s) | tokens/s | vs Trainer full | peak mem (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    ref = med.get(PAIR[1])
    for name in VARIANTS:
        if name not in med:
            err = results[name][0].get("error", "failed")
            print(f"| {name} | failed: {err[:100]} | | | | |")
            continue
        trainable = ok[name][0]["trainable"]
        speed = f"{ref / med[name]:.2f}x" if ref else "-"
        print(f"| {name} | {trainable:,} | {med[name]:.2f} | {tokens / med[name]:,.0f} | {speed} "
              f"| {mem[name]:,.0f} |")


if __name__ == "__main__":
    main()
