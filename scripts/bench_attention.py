"""Sparse attention vs dense causal SDPA: forward+backward time and peak memory.

    python scripts/bench_attention.py            # T = 1k, 2k, 4k, 8k; B=1, H=4, D=64
    python scripts/bench_attention.py --quick    # T = 512, 1k, 2k, fewer repeats
    python scripts/bench_attention.py --no-kernels --train   # GPT training, one run per config

All variants run side by side in one process on the same inputs. Columns:

* ``ms``: best of ``--repeats`` forward+backward calls (after one warm-up call that
  also builds the cached layout / block mask). Best-of, because the box is shared.
* ``speedup``: dense ms / variant ms.
* ``ideal``: causal pairs / allowed pairs of the pattern, i.e. 1 / mask density: the
  speedup a kernel that computes exactly the mask would get over a causal kernel that
  computes exactly the lower triangle. For a sliding window this is ~ T / (2 window).
* ``tile bound``: causal pairs / pairs the implementation actually scores (blocked:
  band rounded up to whole tiles, shared columns scored for every query tile;
  dense_mask: all T^2 pairs; flex: not counted).
* ``peak MiB``: CPU: the peak of bytes held by PyTorch's CPU allocator during one
  forward+backward above what was live before it, read from ``torch.profiler``'s
  memory events (profile_memory=True) in a separate, untimed call; inputs excluded,
  input gradients included. CUDA: ``torch.cuda.max_memory_allocated`` delta.

``--threads`` defaults to 1: on a shared 2-core box, 2 OpenMP threads stall at every
parallel region whenever another process holds a core, which adds noise that has
nothing to do with the kernels.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tfx.attention import FixedBlockSparse, GlobalLocal, SlidingWindow, build_layout, make_kernel  # noqa: E402


def dense_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def fwd_bwd(fn, q, k, v) -> None:
    for x in (q, k, v):
        x.grad = None
    fn(q, k, v).sum().backward()


def best_ms(fn, q, k, v, repeats: int) -> float:
    fwd_bwd(fn, q, k, v)  # warm-up: layouts, block masks, compilation
    times = []
    for _ in range(repeats):
        if q.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fwd_bwd(fn, q, k, v)
        if q.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def peak_mib(fn, q, k, v) -> float:
    for x in (q, k, v):
        x.grad = None
    if q.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(fn, q, k, v)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fwd_bwd(fn, q, k, v)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        events = [e["args"] for e in json.load(open(path))["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return float("nan")
    base = events[0]["Total Allocated"] - events[0]["Bytes"]
    return (max(e["Total Allocated"] for e in events) - base) / 2**20


@contextlib.contextmanager
def _native_stderr_silenced():
    """Kineto writes 'USDT ... profiler_start/stop' from C++ straight to fd 2 on every
    profile; keep those lines out of the table (Python warnings are unaffected)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def variants(args, device):
    """(label, pattern or None, kernel, keys scored per query or None) for one T's rows."""
    patterns = [SlidingWindow(args.window), FixedBlockSparse(args.block, args.stride),
                GlobalLocal(args.window, args.n_global)]
    impl = args.impl if args.impl != "auto" else ("flex" if device.type == "cuda" else "blocked")
    rows = [("dense causal SDPA", None, dense_causal)]
    if args.with_dense_mask:
        rows.append((f"dense_mask {patterns[0]}", patterns[0], make_kernel(patterns[0], "dense_mask")))
    rows += [(f"{impl} {p}", p, make_kernel(p, impl, args.tile)) for p in patterns]
    return rows


def tile_bound(label: str, pattern, T: int, tile: int, device) -> float:
    """Causal pairs / pairs the implementation scores (nan where we cannot count them)."""
    if pattern is None:
        return 1.0
    if label.startswith("dense_mask"):
        return 0.5 * (T + 1) / T  # all T^2 pairs
    if label.startswith("blocked"):
        return T * (T + 1) / 2 / build_layout(pattern, T, tile, device).scored_pairs
    return float("nan")


def bench_length(T, args, device):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(args.batch, args.heads, T, args.dim, generator=g, dtype=args.dtype)
               .to(device).requires_grad_() for _ in range(3))
    out, dense_ms, dense_mem = [], None, None
    for label, pattern, fn in variants(args, device):
        ms, mem = best_ms(fn, q, k, v, args.repeats), peak_mib(fn, q, k, v)
        dense_ms, dense_mem = dense_ms or ms, dense_mem or mem
        ideal = 1.0 if pattern is None else 1 / pattern.density(T)
        bound = tile_bound(label, pattern, T, args.tile, device)
        out.append(f"| {T} | {label} | {ms:.1f} | {dense_ms / ms:.2f} | {ideal:.2f} | {bound:.2f} "
                   f"| {mem:.1f} | {mem / dense_mem:.2f} |")
        print(out[-1], flush=True)
    return out


ATTENTION_CONFIGS = ("dense", "sliding_window", "block_sparse", "global_local")


def bench_training(args) -> None:
    """Model level: one ``train.py`` sweep over conf/attention/*.yaml at long context.

    Reads tokens/s, step time, peak memory and validation perplexity from each run's
    summary.json. A short run: the perplexity says "still learns", not final quality.
    """
    sweep = Path(tempfile.mkdtemp(prefix="bench_attention_"))
    configs = args.train_attention
    overrides = [f"attention={','.join(configs)}", f"model={args.train_model}", "optim=adamw",
                 f"data.seq_len={args.train_seq_len}", f"trainer.batch_size={args.train_batch}",
                 f"trainer.max_steps={args.train_steps}", f"trainer.eval_every={args.train_steps}",
                 "trainer.eval_batches=8", "trainer.final_eval_batches=8", "trainer.ckpt_every=0",
                 "trainer.progress=false", "logger.backend=none", "resume=never",
                 f"hydra.sweep.dir={sweep}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", *overrides], check=True, env=env,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"\n# train.py -m {' '.join(overrides[:-1])}\n")
    print(f"| attention | tokens/s | speedup | step ms | peak MB | val ppl after {args.train_steps} steps |")
    print("|---|---|---|---|---|---|")
    base = None
    for i, name in enumerate(configs):
        s = json.loads((sweep / str(i) / "summary.json").read_text())
        base = base or s["tokens_per_sec"]
        print(f"| {name} | {s['tokens_per_sec']:,.0f} | {s['tokens_per_sec'] / base:.2f} | "
              f"{s['step_time_ms']:.0f} | {s['peak_mem_mb']:.0f} | {s['val_ppl']:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T = 512, 1k, 2k and 2 repeats")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--stride", type=int, default=64)
    p.add_argument("--n-global", dest="n_global", type=int, default=16)
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--impl", default="auto", choices=["auto", "blocked", "flex"])
    p.add_argument("--with-dense-mask", action="store_true",
                   help="also time SDPA with the dense sliding-window mask (O(T^2))")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    p.add_argument("--train", action="store_true",
                   help="also train the GPT with each conf/attention/*.yaml (train.py sweep)")
    p.add_argument("--train-model", default="small")
    p.add_argument("--train-seq-len", type=int, default=2048)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--train-attention", nargs="+", default=list(ATTENTION_CONFIGS), choices=ATTENTION_CONFIGS,
                   help="conf/attention options to train, the first is the baseline (default: all)")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="the kernel-level table (--no-kernels: only --train)")
    args = p.parse_args()
    if args.quick:
        args.lengths, args.repeats = [512, 1024, 2048], 2
    args.dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)

    what = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s)"
    print(f"# bench_attention {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch "
          f"{torch.__version__}, {what}\n# B={args.batch} H={args.heads} D={args.dim} {args.dtype}, "
          f"tile={args.tile}, forward+backward, best of {args.repeats}, load average before "
          f"{os.getloadavg()[0]:.1f}\n")
    if args.kernels:
        print("| T | variant | ms | speedup | ideal | tile bound | peak MiB | mem ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for T in args.lengths:
            bench_length(T, args, device)

    if args.train:
        bench_training(args)


if __name__ == "__main__":
    main()
