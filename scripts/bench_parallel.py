"""Parallel modes side by side: model-state bytes per rank, bytes communicated per
step, tokens/s and step time; then PowerSGD ranks 1-4 against fp32 all-reduce.

    python scripts/bench_parallel.py            # model=small, 30 steps per mode
    python scripts/bench_parallel.py --quick    # model=tiny, 8 steps (a minute or two on CPU)

Every mode trains the same global batch through the real training loop (workers
started by tfx's launcher, as `python train.py parallel=...` does) and prints one
Markdown table. Byte counts come from the runs themselves (tfx.parallel.memory,
tfx.parallel.comm_meter), not from formulas.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from tfx.config import register_configs  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
GLOBAL_BATCH = 8
MODES = [  # (label, parallel option, workers, per-worker batch)
    ("single", "single", 1, GLOBAL_BATCH),
    ("DDP", "ddp", 2, GLOBAL_BATCH // 2),
    ("FSDP2", "fsdp", 2, GLOBAL_BATCH // 2),
    ("TP+SP", "tp", 2, GLOBAL_BATCH),
    ("PP 1F1B", "pp", 2, GLOBAL_BATCH),
    ("2-D FSDP+TP", "fsdp_tp", 4, GLOBAL_BATCH // 2),
]


def make_cfg(run_dir: Path, overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


def run(run_dir: Path, nproc: int, overrides) -> dict:
    from tfx.launch import launch
    from tfx.train.run import train

    cfg = make_cfg(run_dir, overrides)
    return train(cfg, run_dir) if nproc == 1 else launch(cfg, run_dir, nproc=nproc)


def single_state_bytes(cfg) -> dict:
    """The single-process run has no parallel technique to report its bytes: measure
    the same way on a freshly built model after one AdamW step."""
    from tfx.config import build_model, optimizer_factory
    from tfx.data import prepare_data
    from tfx.parallel.memory import state_bytes

    data = prepare_data(cfg.data)
    model = build_model(cfg, data.vocab_size, cfg.data.seq_len)
    opt = optimizer_factory(cfg)(model)
    model(torch.zeros(1, cfg.data.seq_len, dtype=torch.long)).sum().backward()
    opt.step()
    return state_bytes(model, opt)


def mb(x) -> str:
    return "-" if x is None else f"{x / 2**20:.2f}"


def bench_modes(base, tmp: Path) -> str:
    rows = ["| mode | ranks | params MB/rank | grads MB/rank | optim MB/rank | comm MB/step/rank "
            "| tokens/s | step ms | val loss |", "|---|---|---|---|---|---|---|---|---|"]
    for label, option, nproc, batch in MODES:
        overrides = base + [f"parallel={option}", f"trainer.batch_size={batch}"]
        t0 = time.perf_counter()
        s = run(tmp / option, nproc, overrides)
        if option == "single":
            s.update(single_state_bytes(make_cfg(tmp / option, overrides)))
        rows.append(f"| {label} | {nproc} | {mb(s.get('mem/param_bytes'))} | {mb(s.get('mem/grad_bytes'))} "
                    f"| {mb(s.get('mem/optim_bytes'))} | {mb(s.get('comm/bytes_per_step', 0))} "
                    f"| {s['tokens_per_sec']:,.0f} | {s['step_time_ms']:.0f} | {s['val_loss']:.4f} |")
        print(f"  {label}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return "\n".join(rows)


def bench_powersgd(base, tmp: Path, steps: int) -> str:
    rows = ["| DDP gradient hook | hook MB/step/rank | vs fp32 all-reduce | val loss after "
            f"{steps} steps |", "|---|---|---|---|"]
    variants = [("fp32 all-reduce (no hook)", [])] + \
               [(f"{d} cast", [f"compression=[{d}_comm]"]) for d in ("fp16", "bf16")] + \
               [(f"PowerSGD rank {r}", ["compression=[powersgd]", f"compression.powersgd.rank={r}",
                                        "compression.powersgd.warmup_steps=2"]) for r in (1, 2, 3, 4)]
    fp32 = None
    for label, extra in variants:
        s = run(tmp / f"hook{len(rows)}", 2, base + ["parallel=ddp", f"trainer.batch_size={GLOBAL_BATCH // 2}",
                                                      *extra])
        sent = s.get("comm/hook_bytes_per_step", s.get("comm/bytes_per_step"))
        fp32 = fp32 or sent
        rows.append(f"| {label} | {mb(sent)} | {sent / fp32:.3f} | {s['val_loss']:.4f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--skip-powersgd", action="store_true")
    args = ap.parse_args()
    steps = args.steps or (8 if args.quick else 30)
    model = ["model=tiny", "data.seq_len=64"] if args.quick else ["model=small", "data.seq_len=128"]
    # no trainer.final_eval_batches: the final evaluation covers the whole validation split
    base = model + ["data=pydocs", "optim=adamw", f"trainer.max_steps={steps}", "trainer.eval_every=0", "trainer.ckpt_every=0",
                    "trainer.log_every=5", "logger=none", "trainer.progress=false", "resume=never", "scheduler.warmup_steps=2"]
    os.environ.setdefault("WANDB_MODE", "offline")
    with tempfile.TemporaryDirectory() as tmp:
        print(f"## Parallel modes ({' '.join(model)}, global batch {GLOBAL_BATCH}, {steps} steps)\n")
        print(bench_modes(base, Path(tmp)), flush=True)
        if not args.skip_powersgd:
            print(f"\n## Gradient compression (DDP, 2 ranks, {steps} steps)\n")
            print(bench_powersgd(base, Path(tmp), steps))


if __name__ == "__main__":
    main()
