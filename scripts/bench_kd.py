"""Distillation from a real Hugging Face teacher: SmolLM2-135M-Instruct (the offline
preset, ``tfx.model.hf.ensure_smollm2``) teaches a 4-layer student of its own
architecture (``model=smollm2_student``: random init, SmolLM2's tokenizer) on
Shakespeare; the same student trained alone is the baseline.

    python scripts/bench_kd.py                  # 150 steps x 4 x 64 tokens: 18 min on 2 shared CPU cores
    python scripts/bench_kd.py --steps 1000 --batch-size 16 --seq-len 256 --precision bf16   # a GPU (not run here)
    python scripts/bench_kd.py --quick          # smoke run: 6 steps (6 min on 2 heavily loaded cores)

Both students are real tfx training runs (``tfx.train.run.train`` on a composed
config, what ``python train.py model=smollm2_student [compression=[distill] ...]``
does) with equal steps, batch, seed, optimizer and schedule, on the same data blocks
in the same order; only ``compression=[distill]`` differs. All three models are then
measured on the same validation blocks (``--eval-batches`` batches from the start of
the validation split, the trainer's final evaluation): loss in nats per token,
perplexity and bits per UTF-8 byte. The teacher is measured as it is (no training).
The teacher's weights are dequantized from a 4-bit GGUF (see docs/models.md), so it
is a little weaker than the published checkpoint.

Prints a Markdown table, the exact settings and the machine's load average; writes
``results.json`` to ``--out`` when given. Timing is not the point: the teacher's
forward (135M parameters) makes a distillation step dearer than a plain one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tfx.config import model_spec, use_model_tokenizer  # noqa: E402
from tfx.data import prepare_data  # noqa: E402
from tfx.evaluation import evaluate_lm  # noqa: E402
from tfx.model import count_params  # noqa: E402
from tfx.model.hf import SMOLLM2_PRESET, CausalLM, load_causal_lm  # noqa: E402
from tfx.train.build import resolve_device  # noqa: E402
from tfx.train.run import train  # noqa: E402


def compose(overrides: List[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    from tfx.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return hydra_compose(config_name="train", overrides=overrides)


def base_overrides(args) -> List[str]:
    return ["model=smollm2_student", "optim=adamw", f"model.config_overrides.num_hidden_layers={args.layers}",
            "data=shakespeare", f"data.seq_len={args.seq_len}", f"trainer.batch_size={args.batch_size}",
            f"trainer.max_steps={args.steps}", "trainer.eval_every=0", "trainer.ckpt_every=0",
            f"trainer.final_eval_batches={args.eval_batches}", "trainer.log_every=10",
            "trainer.progress=false", "logger=none", f"seed={args.seed}", f"optim.lr={args.lr}",
            f"scheduler.warmup_steps={min(args.lr_warmup, args.steps)}", f"precision={args.precision}"]


def kd_overrides(args) -> List[str]:
    return ["compression=[distill]", f"compression.distill.teacher={args.teacher}",
            f"compression.distill.alpha={args.alpha}", f"compression.distill.temperature={args.temperature}"]


def run_student(name: str, overrides: List[str], data, out: Path) -> Dict[str, Any]:
    t0 = time.perf_counter()
    summary = train(compose(overrides), out / name, data=data)
    if summary.get("stopped_early"):  # SIGTERM/SIGINT stop a run cleanly: do not compare half runs
        raise SystemExit(f"the {name} run stopped early ({summary['stopped_early']}); no table")
    return {"val_loss": summary["val_loss"], "val_ppl": summary["val_ppl"], "val_bpb": summary["val_bpb"],
            "params": summary["params"], "steps": summary["step"], "wall_s": time.perf_counter() - t0,
            "kd": summary.get("distill/kd")}


def run_teacher(args, data, device) -> Dict[str, Any]:
    t0 = time.perf_counter()
    teacher = CausalLM(load_causal_lm(args.teacher)).to(device)
    res = evaluate_lm(teacher, data.val, args.batch_size, device, max_batches=args.eval_batches,
                      tokenizer=data.tokenizer)
    return {"val_loss": res["loss"], "val_ppl": res["ppl"], "val_bpb": res["bpb"],
            "params": count_params(teacher), "steps": None, "wall_s": time.perf_counter() - t0}


def table(rows: Dict[str, Dict[str, Any]]) -> str:
    lines = ["| model | params | train steps | val loss | val ppl | val bits/byte |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        steps = "pretrained" if r["steps"] is None else str(r["steps"])
        lines.append(f"| {name} | {r['params'] / 1e6:.1f}M | {steps} | {r['val_loss']:.4f} | "
                     f"{r['val_ppl']:.1f} | {r['val_bpb']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of each student")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--eval-batches", type=int, default=40, help="validation batches (same for all three)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the student (SmolLM2 has 30)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-warmup", type=int, default=20)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--precision", default="fp32", help="fp32 | bf16 (autocast, GPUs)")
    p.add_argument("--teacher", default=SMOLLM2_PRESET, help="an HF model with SmolLM2's tokenizer")
    p.add_argument("--out", help="keep the runs and results.json here (default: a temporary directory)")
    p.add_argument("--quick", action="store_true", help="smoke run: 6 steps, 4 eval batches")
    args = p.parse_args()
    if args.quick:
        args.steps, args.eval_batches = 6, 4
    os.environ.setdefault("WANDB_MODE", "disabled")

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="bench_kd-")
    out = Path(args.out or tmp.name)
    base = base_overrides(args)
    cfg = compose(base)
    use_model_tokenizer(cfg, model_spec(cfg))  # SmolLM2's tokenizer drives the data, as in train.py
    data = prepare_data(cfg.data)
    device = resolve_device("auto")
    rows = {
        "student alone": run_student("alone", base, data, out),
        "student + KD from SmolLM2": run_student("kd", base + kd_overrides(args), data, out),
        "teacher: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)": run_teacher(args, data, device),
    }
    if tmp is not None:
        tmp.cleanup()

    print()
    print(table(rows))
    print()
    n_val = args.eval_batches * args.batch_size * args.seq_len
    print(f"students: {args.layers} layers of SmolLM2's architecture, random init (seed {args.seed}); "
          f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens "
          f"({args.steps * args.batch_size * args.seq_len:,} tokens); AdamW lr {args.lr}, cosine, "
          f"{min(args.lr_warmup, args.steps)} warm-up steps; precision {args.precision}; "
          f"KD alpha {args.alpha}, T {args.temperature}")
    print(f"validation: first {args.eval_batches} batches of Shakespeare's validation split "
          f"(~{n_val:,} tokens); device {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"wall: alone {rows['student alone']['wall_s']:.0f}s, KD "
          f"{rows['student + KD from SmolLM2']['wall_s']:.0f}s, total {time.perf_counter() - t0:.0f}s; "
          f"load average (1/5/15 min) before {'/'.join(f'{x:.1f}' for x in load_before)}, after "
          f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    if args.out:
        (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
