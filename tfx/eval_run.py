"""evaluate.py's work: reload a run's newest checkpoint and measure it, together with
every compressed artefact the run exported (sparse ``.tfxs``, compressed ``.tfxz``,
post-training-quantized ``model_<scheme>.pt``), so each sits next to fp32; or, with no
run, measure a pretrained model as it is (:func:`evaluate_pretrained`, the "before" row
of a fine-tuning or compression comparison)."""
from __future__ import annotations

import copy
import json
import math
import re
import sys
import time
import zipfile
from collections import abc
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from tfx.ckpt import find_checkpoint, load_run_with_meta, reapply_surgery
from tfx.compression import (load_compressed, load_compressed_state, load_gptq, load_sparse,
                             make_permanent, quantize_model)
from tfx.config import build_model, model_spec, use_model_tokenizer
from tfx.core import ConfigError
from tfx.core.loss import IGNORE_INDEX
from tfx.data import TokenData, prepare_data, to_data_config
from tfx.evaluation import _model_ce_sum, evaluate_lm, inference_speed
from tfx.model import count_params, state_dict_bytes
from tfx.train.build import resolve_device

SPLITS = ("validation", "test")
SPLIT_KEYS = {"validation": "val", "test": "test"}


# -- the command line's values, checked before anything is loaded -----------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_args(batch_size: Any = 16, device: Any = "auto", max_batches: Any = None,
               speed_batches: Any = 10, splits: Any = SPLITS, out: Any = None,
               progress: Any = True, compile: Any = False) -> None:
    """evaluate.py's own keys (``conf/evaluate.yaml``): one-line :class:`ConfigError`
    naming the key, the value and what is allowed."""
    for key, value in (("batch_size", batch_size), ("speed_batches", speed_batches)):
        if not _is_int(value) or value < 1:
            raise ConfigError(f"{key}={value!r} must be an integer >= 1")
    if max_batches is not None and (not _is_int(max_batches) or max_batches < 1):
        raise ConfigError(f"max_batches={max_batches!r} must be an integer >= 1 (per split), or null "
                          f"for all batches")
    listed = not isinstance(splits, str) and isinstance(splits, abc.Sequence)
    if not listed or not splits or len(set(map(str, splits))) != len(splits) or any(s not in SPLITS for s in splits):
        raise ConfigError(f"splits={splits!r} must be a non-empty list of distinct names from "
                          f"{list(SPLITS)}, e.g. splits=[validation]")
    if out is not None and (not isinstance(out, str) or not out):
        raise ConfigError(f"out={out!r} must be a directory path, or null (the run directory)")
    for key, value in (("progress", progress), ("compile", compile)):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
    check_device(device)


def check_device(spec: Any) -> torch.device:
    """``device``: auto, cpu, cuda or cuda:N of a GPU this machine has."""
    if spec == "auto":
        return resolve_device("auto")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device={spec!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={spec} but CUDA is not available; use device=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={spec} but this machine has {torch.cuda.device_count()} GPU(s); "
                          f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={spec!r}: evaluate.py runs on auto, cpu, cuda or cuda:N")
    return device


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/step_*``)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def check_run(run: Any) -> Path:
    """``run=``: a directory with checkpoints, or a checkpoint; returns the checkpoint.
    A file that is not a ``torch.save`` archive (tfx writes zip archives) is refused here,
    in one line, rather than by the unpickler after a minute of loading."""
    if not isinstance(run, str) or not run:
        raise ConfigError(f"run={run!r} must be a run directory or a checkpoint path")
    ckpt = find_checkpoint(run)
    if ckpt.is_file() and not zipfile.is_zipfile(ckpt):
        raise ConfigError(f"run={run} is a file but not a checkpoint (a torch.save archive such as "
                          f"checkpoints/step_*.pt); give the run directory or a checkpoint file")
    return ckpt


def eval_json_path(run: Optional[str], out: Optional[str], default_dir=None) -> Path:
    """Where eval.json goes: ``out`` if given, else the run's directory (``run=``), else
    ``default_dir`` (Hydra's output directory, for a pretrained model)."""
    if out:
        return Path(out).expanduser() / "eval.json"
    if run:
        return run_dir_of(find_checkpoint(run)) / "eval.json"
    return Path(default_dir) / "eval.json"


# -- measuring ---------------------------------------------------------------------------
def n_batches(n_blocks: int, batch_size: int, max_batches: Optional[int]) -> int:
    """Batches :func:`tfx.data.eval_batches` yields for ``n_blocks`` blocks."""
    n = math.ceil(n_blocks / batch_size)
    return n if max_batches is None else min(n, max_batches)


def _progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr, as the trainer's (``trainer.progress``); shown only on a
    terminal (``disable=None``), so logs and pipes get no carriage-return noise."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5, disable=None if enabled else True)


def measure(model: nn.Module, data: TokenData, seq_len: int, batch_size: int, device,
            max_batches: Optional[int], speed_batches: int, splits: Sequence[str],
            label: str = "eval", progress: bool = True, compile: bool = False) -> Dict[str, Any]:
    """Loss, perplexity, bits per byte and tokens of each split, inference speed and
    parameter count of ``model``. ``label``: the progress bar's name. ``compile``: the
    speed is timed on ``torch.compile(model)`` (compiled during the warm-up forwards, which
    are not timed); quality is always the eager model's, so it does not depend on it."""
    blocks = {"validation": data.val, "test": data.test}
    out: Dict[str, Any] = {}
    total = sum(n_batches(len(blocks[s]), batch_size, max_batches) for s in splits)
    bar = _progress_bar(total, label, progress)
    try:
        for split in splits:
            bar.set_postfix_str(split)
            tokens = torch.zeros((), dtype=torch.int64, device=device)

            def ce_sum_fn(m, batch):  # evaluate_lm's per-batch hook: count, advance the bar
                nonlocal tokens
                tokens = tokens + (batch["labels"] != IGNORE_INDEX).sum()
                bar.update(1)
                return _model_ce_sum(m, batch)

            m = evaluate_lm(model, blocks[split], batch_size, device, max_batches=max_batches,
                            ce_sum_fn=ce_sum_fn, tokenizer=data.tokenizer)
            key = SPLIT_KEYS[split]
            out[f"{key}_loss"], out[f"{key}_ppl"], out[f"{key}_bpb"] = m["loss"], m["ppl"], m["bpb"]
            out[f"{key}_tokens"] = int(tokens)
        bar.set_postfix_str("inference speed" + (" (compiling)" if compile else ""))
        timed = torch.compile(model) if compile else model
        speed = inference_speed(timed, batch_size, seq_len, data.vocab_size, device, iters=speed_batches)
    finally:
        bar.close()
    out.update({"inference_tokens_per_sec": speed["tokens_per_sec"],
                "latency_ms_per_batch": speed["latency_ms"], "params": count_params(model)})
    return out


def exported_variants(run_dir: Path, model: nn.Module, cfg, vocab_size: int,
                      meta: Optional[Dict[str, Any]] = None) -> Dict[str, tuple]:
    """name -> (model rebuilt from the exported file, file path). The fresh model gets
    the run's attention (sparse kernels), so a variant differs only by its weights."""
    def fresh():
        base = reapply_surgery(build_model(cfg, vocab_size, cfg.data.seq_len), cfg, meta or {},
                               groups=("attention",))
        return base.to(next(model.parameters()).device)

    found: Dict[str, tuple] = {}
    for path in sorted(run_dir.glob("*.tfxs")):
        found[f"sparse ({path.name})"] = (load_compressed_state(fresh(), load_sparse(path)).eval(), path)
    for path in sorted(run_dir.glob("*.tfxz")):
        found[f"compressed ({path.name})"] = (load_compressed_state(fresh(), load_compressed(path)).eval(), path)
    for path in sorted(run_dir.glob("model_*.pt")):
        m = re.fullmatch(r"model_(int8_dynamic|int8_weight_only|int4_weight_only)\.pt", path.name)
        if m:  # torchao tensors need a model quantized the same way; re-quantize the weights
            found[f"ptq {m.group(1)}"] = (quantize_model(copy.deepcopy(model), m.group(1)).eval(), path)
    for path in sorted(run_dir.glob("model_gptq.pt")):  # packed GPTQ/RTN codes, dequantized exactly
        found[f"gptq ({path.name})"] = (load_compressed_state(fresh(), load_gptq(path)).eval(), path)
    return found


def _disk_bytes(path: Path) -> int:
    """A file's size, or the total of a sharded (DCP) checkpoint directory."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _write(result: Dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def evaluate_run(run: str, batch_size: int = 16, device: str = "auto", max_batches: Optional[int] = None,
                 speed_batches: int = 10, splits: Sequence[str] = SPLITS, out: Optional[str] = None,
                 progress: bool = True, compile: bool = False) -> Dict[str, Any]:
    """Measure a run's newest checkpoint (and its exported variants); write eval.json to
    ``out`` or the run directory (:func:`eval_json_path`) and return its content."""
    start = time.perf_counter()
    check_args(batch_size, device, max_batches, speed_batches, list(splits), out, progress, compile)
    ckpt = check_run(run)
    dev = check_device(device)
    model, cfg, meta = load_run_with_meta(ckpt, device=str(dev))
    make_permanent(model)  # fold pruning masks: weights are counted once, as plain Linears
    data = prepare_data(cfg.data)
    args = (data, cfg.data.seq_len, batch_size, dev, max_batches, speed_batches, list(splits))
    result: Dict[str, Any] = {"checkpoint": str(ckpt), "step": meta.get("step"),
                              "data": to_data_config(cfg.data).source, "seq_len": cfg.data.seq_len,
                              "batch_size": batch_size, "compiled": compile,
                              **measure(model, *args, label=f"eval {ckpt.name}", progress=progress,
                                        compile=compile),
                              "size_on_disk_bytes": state_dict_bytes(model),
                              "checkpoint_bytes": _disk_bytes(ckpt)}
    run_dir = run_dir_of(ckpt)
    variants = {}
    for name, (variant, path) in exported_variants(run_dir, model, cfg, data.vocab_size, meta).items():
        variants[name] = {**measure(variant, *args, label=f"eval {name}", progress=progress, compile=compile),
                          "size_on_disk_bytes": path.stat().st_size, "file": path.name}
    if variants:
        result["variants"] = variants
    result["eval_seconds"] = time.perf_counter() - start
    _write(result, eval_json_path(run, out))
    return result


def evaluate_pretrained(cfg, out_dir, batch_size: int = 16, device: str = "auto",
                        max_batches: Optional[int] = None, speed_batches: int = 10,
                        splits: Sequence[str] = SPLITS, progress: bool = True,
                        compile: bool = False) -> Dict[str, Any]:
    """Measure the model ``cfg.model`` names, as it is, on ``cfg.data`` tokenized with
    its own tokenizer (``python evaluate.py model=smollm2 [data=...]``): the same
    numbers as :func:`evaluate_run`, written to ``out_dir/eval.json``. A spec without
    weights of its own (tfx's GPT) is refused: evaluate a trained run instead."""
    start = time.perf_counter()
    check_args(batch_size, device, max_batches, speed_batches, list(splits), None, progress, compile)
    spec = model_spec(cfg)
    if not callable(getattr(spec, "tokenizer_config", None)):
        raise ConfigError(f"model={type(spec).__name__} has no pretrained weights to evaluate; "
                          f"train it and pass run=<run directory>, or choose model=hf/smollm2")
    use_model_tokenizer(cfg, spec)
    dev = check_device(device)
    data = prepare_data(cfg.data)
    seq_len = to_data_config(cfg.data).seq_len
    model = build_model(cfg, data.vocab_size, seq_len, spec=spec).to(dev).eval()
    args = (data, seq_len, batch_size, dev, max_batches, speed_batches, list(splits))
    result: Dict[str, Any] = {"model": spec.name_or_path, "pretrained": spec.pretrained,
                              "data": to_data_config(cfg.data).source, "seq_len": seq_len,
                              "batch_size": batch_size, "compiled": compile,
                              **measure(model, *args, label=f"eval {spec.name_or_path}", progress=progress,
                                        compile=compile),
                              "size_on_disk_bytes": state_dict_bytes(model)}
    result["eval_seconds"] = time.perf_counter() - start
    _write(result, Path(out_dir) / "eval.json")
    return result


# -- the printed summary -----------------------------------------------------------------
def _mb(n_bytes: Optional[int]) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2 ** 20:.2f}"


def format_summary(result: Dict[str, Any], path: Path) -> str:
    """eval.json's numbers as a few aligned lines (evaluate.py prints them): what was
    measured, a quality table (one row per model and split: loss, perplexity, bits per
    byte, tokens evaluated), a speed and size table, the time taken and the file."""
    main = "trained" if "checkpoint" in result else "pretrained"
    models = [(main, result)] + list(result.get("variants", {}).items())
    what = (f"{result['checkpoint']} (step {result.get('step')})" if "checkpoint" in result
            else f"{result['model']} ({'pretrained' if result.get('pretrained') else 'random init'} weights)")
    lines = [f"evaluated  {what}",
             f"data       {result.get('data', '?')}, seq_len {result.get('seq_len', '?')}, "
             f"batch {result['batch_size']}"]
    width = max(len("model"), *(len(name) for name, _ in models))

    def row(name, *cells):  # the model's name left-aligned, then right-aligned cells
        return "  ".join([f"{name:<{width}}", *cells])

    lines.append(row("model", f"{'split':<10}", f"{'loss':>8}", f"{'ppl':>10}", f"{'bits/byte':>9}",
                     f"{'tokens':>11}"))
    for name, r in models:
        for split, key in SPLIT_KEYS.items():
            if f"{key}_loss" in r:
                bpb = r.get(f"{key}_bpb")
                lines.append(row(name, f"{split:<10}", f"{r[f'{key}_loss']:>8.4f}", f"{r[f'{key}_ppl']:>10.2f}",
                                 f"{'-' if bpb is None else f'{bpb:.4f}':>9}", f"{r.get(f'{key}_tokens', 0):>11,}"))
    lines.append(row("model", f"{'tokens/s':>12}", f"{'ms/batch':>9}", f"{'params':>13}", f"{'size MB':>9}"))
    for name, r in models:
        lines.append(row(name, f"{r['inference_tokens_per_sec']:>12,.0f}", f"{r['latency_ms_per_batch']:>9.2f}",
                         f"{r['params']:>13,}", f"{_mb(r.get('size_on_disk_bytes')):>9}"))
    lines.append(f"time       {result.get('eval_seconds', float('nan')):.1f} s")
    lines.append(f"wrote      {path}")
    return "\n".join(lines)
