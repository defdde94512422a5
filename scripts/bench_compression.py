"""Compare compression techniques on one small GPT: params, size, speed, perplexity.

    python scripts/bench_compression.py            # full: 7 min on 2 CPU cores (more when shared)
    python scripts/bench_compression.py --quick    # smoke run, ~2 min

Every variant is a real tfx training run (``tfx.train.run.train`` on a composed
config, exactly what ``python train.py compression=[...]`` does) on the default
dataset (Shakespeare; BPE with 1024 tokens so the head does not dominate a small
model on 2 CPU cores) with a 4-layer, d=96 GPT:

* baseline: ``--steps`` steps from scratch; it is also "the student trained alone";
* pruning / 2:4 / structured / QAT / low-rank: ``from_checkpoint=<baseline>`` and
  ``--ft-steps`` of fine-tuning; the row "baseline +ft" fine-tunes the baseline with
  the same recipe and nothing removed (prune at sparsity 0), so it is the reference
  for quality after fine-tuning;
* PTQ: ``quantize_model`` on the trained baseline (no training);
* distillation: a ~4x larger teacher trained for ``--steps``, then a student with the
  baseline's config, steps and seed trained with ``compression=[distill]``.

Measurements use ``tfx.evaluation``: validation perplexity on the same
``--eval-batches``, and eager inference tokens/s timed round-robin after all
training (best of several rounds, so that load from other processes hits all
variants alike). Sizes are the files an inference user would ship: ``.tfxs`` for
unstructured/2:4 sparsity, torchao's quantized state_dict for int8, a plain
``torch.save`` state_dict otherwise. Ratios are to the baseline in every column.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tfx.ckpt import load_run  # noqa: E402
from tfx.compression import make_permanent, quantize_model, save_sparse  # noqa: E402
from tfx.compression.quantize import convert_qat, save_quantized  # noqa: E402
from tfx.core import TfxError  # noqa: E402
from tfx.data import prepare_data  # noqa: E402
from tfx.evaluation import evaluate_lm, inference_speed  # noqa: E402
from tfx.model import count_params, state_dict_bytes  # noqa: E402
from tfx.train.run import train  # noqa: E402


def compose(overrides: List[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    from tfx.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return hydra_compose(config_name="train", overrides=overrides)


class Bench:
    def __init__(self, args) -> None:
        self.args, self.out = args, Path(args.out or tempfile.mkdtemp(prefix="bench_compression_"))
        self.t0 = time.time()
        self.base = ["optim=adamw", "data.seq_len=128", "data.tokenizer.vocab_size=1024",
                     "model.n_layer=4", "model.n_head=4", "model.d_model=96",
                     f"trainer.batch_size={args.batch_size}", "trainer.eval_every=0",
                     "trainer.ckpt_every=0", "trainer.final_eval_batches=2", "trainer.progress=false",
                     "logger=none", "optim.lr=3e-3", "scheduler.warmup_steps=20", "resume=never"]
        self.data = prepare_data(compose(self.base).data)

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.0f}s] {msg}", flush=True)

    def run(self, name: str, *overrides: str, steps: Optional[int] = None) -> Path:
        cfg = compose(self.base + [f"trainer.max_steps={steps or self.args.steps}", *overrides])
        train(cfg, self.out / name, data=self.data)
        self.log(f"trained {name}")
        return self.out / name

    def finetune(self, name: str, option: str, *overrides: str) -> Path:
        base = self.out / "baseline"
        return self.run(name, f"compression=[{option}]", f"compression.{option}.from_checkpoint={base}",
                        "optim.lr=1e-3", "scheduler.warmup_steps=0", *overrides, steps=self.args.ft_steps)


def measure(bench: Bench, rows: List[Dict]) -> None:
    """Perplexity now; speed afterwards for all models together."""
    args = bench.args
    for r in rows:
        if "model" in r:
            m = evaluate_lm(r["model"], bench.data.val, 8, torch.device("cpu"), max_batches=args.eval_batches)
            r["ppl"] = m["ppl"]
    bench.log("perplexities")
    timed = [r for r in rows if "model" in r]
    for r in timed:
        r["tok_s"] = 0.0
    vocab = timed[0]["model"].cfg.vocab_size
    for _ in range(args.speed_rounds):
        for r in timed:
            s = inference_speed(r["model"], 8, 128, vocab, torch.device("cpu"), iters=2, warmup=1)
            r["tok_s"] = max(r["tok_s"], s["tokens_per_sec"])
    bench.log("speed")


def sparse_row(name: str, run: Path, note: str) -> Dict:
    model = make_permanent(load_run(run)[0])
    nnz = sum(int((p != 0).sum()) for p in {id(p): p for p in model.parameters()}.values())
    size = save_sparse(model, run / "bench.tfxs")["bytes"]
    return {"variant": name, "model": model, "params": nnz, "bytes": size, "note": note}


def dense_row(name: str, model, note: str = "", nparams: Optional[int] = None, path=None) -> Dict:
    model = make_permanent(model)  # ship folded weights, not weight_orig + weight_mask
    size = os.path.getsize(path) if path else state_dict_bytes(model)
    return {"variant": name, "model": model, "params": nparams or count_params(model), "bytes": size,
            "note": note}


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few steps, a smoke run")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ft-steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-batches", type=int, default=20, help="of 8 x 128 tokens")
    ap.add_argument("--speed-rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="1: on a shared 2-core box, 2 threads ran 5-10x slower (spinning)")
    ap.add_argument("--out", default=None, help="where the runs go (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.ft_steps, args.eval_batches, args.speed_rounds = 20, 10, 2, 1
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    ft, end = args.ft_steps, max(args.ft_steps * 3 // 5, 2)
    prune_sched = [f"compression.prune.end_step={end}", f"compression.prune.frequency={max(end // 6, 1)}"]

    base_dir = bench.run("baseline")
    base = load_run(base_dir)[0]
    rows = [dense_row("baseline (fp32)", base, "also the student trained alone")]
    rows.append(dense_row(f"baseline +{ft} ft steps", load_run(bench.finetune(
        "baseline_ft", "prune", "compression.prune.sparsity=0.0", *prune_sched))[0],
        "reference for the fine-tuned rows"))
    for s in (0.5, 0.8, 0.9):
        run = bench.finetune(f"prune{int(s * 100)}", "prune", f"compression.prune.sparsity={s}", *prune_sched)
        rows.append(sparse_row(f"unstructured {int(s * 100)}% (global, cubic)", run,
                               "params = non-zeros; .tfxs file; dense kernels"))
    for r in (0.25, 0.5):
        run = bench.finetune(f"structured{int(r * 100)}", "structured",
                             f"compression.structured.head_ratio={r}", f"compression.structured.neuron_ratio={r}")
        rows.append(dense_row(f"structured {int(r * 100)}% heads + neurons", load_run(run)[0]))
    rows.append(sparse_row("2:4 (N:M masks)", bench.finetune("nm24", "nm"),
                           "dense kernels on CPU (2:4 kernels are CUDA-only)"))
    for scheme in ("int8_dynamic", "int8_weight_only", "int4_weight_only"):
        try:
            q = quantize_model(copy.deepcopy(base), scheme)
            path = bench.out / f"ptq_{scheme}.pt"
            save_quantized(q, path)
            rows.append(dense_row(f"PTQ {scheme}", q, nparams=count_params(base), path=path))
        except TfxError as err:
            rows.append({"variant": f"PTQ {scheme}", "note": f"unsupported on CPU: {type(err).__name__}"})
    qat_dir = bench.finetune("qat_int8", "qat")
    rows.append(dense_row("QAT int8 (+ft, converted)", convert_qat(load_run(qat_dir)[0], "int8"),
                          nparams=count_params(base), path=qat_dir / "model_qat_int8.pt"))
    for ratio in (0.5, 0.25):
        run = bench.finetune(f"lowrank{ratio}", "lowrank", f"compression.lowrank.rank_ratio={ratio}")
        rows.append(dense_row(f"low-rank {ratio:g} rank (+ft)", load_run(run)[0]))
    teacher_dir = bench.run("teacher", "model.d_model=192", "model.n_head=8")
    rows.append(dense_row("teacher (4x blocks, trained alone)", load_run(teacher_dir)[0]))
    student = bench.run("student_distilled", "compression=[distill]",
                        f"compression.distill.teacher={teacher_dir}")
    rows.append(dense_row("student distilled from teacher", load_run(student)[0],
                          "same config, steps, seed as baseline"))
    measure(bench, rows)
    print_table(rows, args)
    (bench.out / "bench.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "model"} for r in rows], indent=2))


def print_table(rows: List[Dict], args) -> None:
    base = rows[0]
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads={args.threads}; steps={args.steps}, "
          f"ft_steps={args.ft_steps}, batch={args.batch_size}x128\n")
    print("| variant | params | size (KB) | tokens/s | val ppl | note |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "ppl" not in r:
            print(f"| {r['variant']} | - | - | - | - | {r['note']} |")
            continue
        cells = [f"{r['params'] / 1e6:.2f}M ({r['params'] / base['params']:.2f}x)",
                 f"{r['bytes'] / 1024:.0f} ({r['bytes'] / base['bytes']:.2f}x)",
                 f"{r['tok_s']:.0f} ({r['tok_s'] / base['tok_s']:.2f}x)",
                 f"{r['ppl']:.1f} ({r['ppl'] / base['ppl']:.2f}x)"]
        print(f"| {r['variant']} | " + " | ".join(cells) + f" | {r['note']} |")


if __name__ == "__main__":
    main()
