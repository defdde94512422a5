"""int8 inference on this CPU: every candidate path, on the real SmolLM2-135M.

    python scripts/bench_int8.py                  # ~10 minutes on 2 CPU cores
    python scripts/bench_int8.py --quick          # smoke run
    python scripts/bench_int8.py --only fp32-eager,pt2e-dynamic

For each candidate: prefill throughput (tokens/s of a batch x seq forward, median of
``--iters`` after warm-up) and validation perplexity on Shakespeare (SmolLM2's own
tokenizer), both against fp32 eager measured in the same run. Each candidate runs in
its own subprocess so compiled kernels, threads and memory never mix.

Candidates (all quantize the decoder Linears; embeddings and the tied head stay fp32):

* ``fp32-eager`` / ``fp32-compile``: the baselines (compile: inductor, freezing on).
* ``legacy-dynamic``: ``torch.ao.quantization.quantize_dynamic`` (fbgemm/onednn
  int8 dynamic Linear; deprecated by PyTorch in favour of torchao).
* ``torchao-dyn-eager`` / ``torchao-dyn-compile``: torchao
  ``Int8DynamicActivationInt8WeightConfig`` without / with ``torch.compile``.
* ``torchao-wo-compile``: torchao ``Int8WeightOnlyConfig`` with ``torch.compile``.
* ``pt2e-dynamic`` / ``pt2e-static``: torchao's PT2E flow with ``X86InductorQuantizer``
  (export -> prepare -> calibrate -> convert -> ``torch.compile`` with freezing), the
  x86 CPU path PyTorch and torchao document for int8 inference.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CANDIDATES = ["fp32-eager", "fp32-compile", "legacy-dynamic", "torchao-dyn-eager", "torchao-dyn-compile",
              "torchao-wo-compile", "pt2e-dynamic", "pt2e-static"]


def _data(seq_len: int):
    from hydra import compose, initialize_config_dir

    from tfx.config import model_spec, register_configs, use_model_tokenizer
    from tfx.data import prepare_data

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=["model=smollm2", "data=shakespeare", f"data.seq_len={seq_len}",
                                          "logger=none"])
    use_model_tokenizer(cfg, model_spec(cfg))
    return prepare_data(cfg.data)


class Logits(torch.nn.Module):
    """The HF model as ``ids -> logits`` (what export and compile see)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits


def _is_block_linear(module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and "lm_head" not in fqn


def build(name: str, example, calib):
    import torch._inductor.config as inductor_config

    from tfx.model.hf import SMOLLM2_PRESET, load_causal_lm

    inductor_config.freezing = True  # constant-folds and prepacks weights (int8 needs it)
    model = Logits(load_causal_lm(SMOLLM2_PRESET)).eval()
    if name == "fp32-eager":
        return model
    if name == "fp32-compile":
        return torch.compile(model)
    if name == "legacy-dynamic":
        import warnings

        warnings.filterwarnings("ignore")
        layers = model.lm.model.layers  # the decoder Linears only, like the others
        torch.ao.quantization.quantize_dynamic(layers, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        return model
    if name.startswith("torchao-"):
        from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                          quantize_)

        config = Int8WeightOnlyConfig() if "-wo-" in name else Int8DynamicActivationInt8WeightConfig()
        quantize_(model, config, filter_fn=_is_block_linear)
        return torch.compile(model) if name.endswith("compile") else model
    if name.startswith("pt2e-"):
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        dynamic = name == "pt2e-dynamic"
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_dynamic=dynamic))
        # keep the tied head in fp32 like the other candidates
        quantizer.set_module_name_qconfig("lm.lm_head", None)
        with torch.no_grad():
            exported = torch.export.export(model, (example,), strict=False).module()
            prepared = prepare_pt2e(exported, quantizer)
            for x in calib:
                prepared(x)
            converted = convert_pt2e(prepared)
        move_exported_model_to_eval(converted)
        return torch.compile(converted)
    raise SystemExit(f"unknown candidate {name!r}; choose from {CANDIDATES}")


def worker(args) -> None:
    torch.manual_seed(0)
    data = _data(args.seq_len)
    val = data.val
    n_val = min(args.val_blocks, len(val))
    batches = [val.get_batch(range(i, min(i + args.batch_size, n_val))) for i in range(0, n_val, args.batch_size)]
    batches = [b for b in batches if b["input_ids"].shape[0] == args.batch_size]
    train = data.train
    calib = [train.get_batch(range(i * args.batch_size, (i + 1) * args.batch_size))["input_ids"]
             for i in range(args.calib_batches)]
    example = batches[0]["input_ids"]
    t0 = time.perf_counter()
    model = build(args.worker, example, calib)
    times = []
    with torch.no_grad():
        for i in range(args.warmup + args.iters):
            t = time.perf_counter()
            model(example)
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
        nll, count = 0.0, 0
        for b in batches:
            logits = model(b["input_ids"])
            nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten(),
                                                     reduction="sum").item()
            count += b["labels"].numel()
    step = statistics.median(times)
    print(json.dumps({"tokens_per_s": example.numel() / step, "ppl": math.exp(nll / count),
                      "setup_s": time.perf_counter() - t0 - sum(times), "val_tokens": count}))


def spawn(name, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--val-blocks",
           str(args.val_blocks), "--calib-batches", str(args.calib_batches)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if out.returncode != 0:
        lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
        return {"error": lines[-1] if lines else "?"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", help="comma-separated candidates (fp32-eager is always run)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--val-blocks", type=int, default=64)
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.iters, args.warmup, args.val_blocks, args.calib_batches, args.seq_len = 2, 1, 8, 1, 64
    if args.worker:
        return worker(args)
    names = CANDIDATES if not args.only else ["fp32-eager"] + [n for n in args.only.split(",") if n != "fp32-eager"]
    from tfx.model.hf import ensure_smollm2

    ensure_smollm2()
    results = {n: spawn(n, args) for n in names}
    base = results["fp32-eager"]
    flags = [f for f in ("avx512_vnni", "amx_int8", "avx512_bf16", "avx2") if f in Path("/proc/cpuinfo").read_text()]
    print(f"# bench_int8: SmolLM2-135M prefill, batch {args.batch_size} x seq {args.seq_len}, "
          f"{args.iters} timed forwards (median), {os.cpu_count()} CPUs ({', '.join(flags)}), "
          f"ppl on {base.get('val_tokens', '?')} Shakespeare validation tokens, {time.strftime('%Y-%m-%d')}")
    print("| candidate | tokens/s | vs fp32 eager | val ppl | ppl change | setup (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for n, r in results.items():
        if "error" in r:
            print(f"| {n} | failed: {r['error'][:110]} | | | | |")
            continue
        speed = r["tokens_per_s"] / base["tokens_per_s"] if "tokens_per_s" in base else float("nan")
        dppl = 100 * (r["ppl"] / base["ppl"] - 1) if "ppl" in base else float("nan")
        print(f"| {n} | {r['tokens_per_s']:,.0f} | {speed:.2f}x | {r['ppl']:.3f} | {dppl:+.2f}% | {r['setup_s']:.0f} |")


if __name__ == "__main__":
    main()
