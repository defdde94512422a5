"""evaluate.py's work: reload a run's newest checkpoint and measure it, together with
every compressed artefact the run exported (sparse ``.tfxs``, compressed ``.tfxz``,
post-training-quantized ``model_<scheme>.pt``), so each sits next to fp32; or, with no
run, measure a pretrained model as it is (:func:`evaluate_pretrained`, the "before" row
of a fine-tuning or compression comparison)."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from torch import nn

from tfx.ckpt import find_checkpoint, load_run
from tfx.compression import (load_compressed, load_compressed_state, load_gptq, load_sparse,
                             make_permanent, quantize_model)
from tfx.config import build_model, model_spec, use_model_tokenizer
from tfx.core import ConfigError
from tfx.data import TokenData, prepare_data, to_data_config
from tfx.evaluation import evaluate_lm, inference_speed
from tfx.model import count_params, state_dict_bytes
from tfx.train.build import resolve_device


def measure(model: nn.Module, data: TokenData, seq_len: int, batch_size: int, device,
            max_batches: Optional[int], speed_batches: int, splits: List[str]) -> Dict[str, Any]:
    blocks = {"validation": data.val, "test": data.test}
    out: Dict[str, Any] = {}
    for split in splits:
        m = evaluate_lm(model, blocks[split], batch_size, device, max_batches=max_batches,
                        tokenizer=data.tokenizer)
        key = "val" if split == "validation" else split
        out[f"{key}_loss"], out[f"{key}_ppl"], out[f"{key}_bpb"] = m["loss"], m["ppl"], m["bpb"]
    speed = inference_speed(model, batch_size, seq_len, data.vocab_size, device, iters=speed_batches)
    out.update({"inference_tokens_per_sec": speed["tokens_per_sec"],
                "latency_ms_per_batch": speed["latency_ms"], "params": count_params(model)})
    return out


def exported_variants(run_dir: Path, model: nn.Module, cfg, vocab_size: int) -> Dict[str, tuple]:
    """name -> (model rebuilt from the exported file, file path)."""
    def fresh():
        return build_model(cfg, vocab_size, cfg.data.seq_len).to(next(model.parameters()).device)

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


def evaluate_run(run: str, batch_size: int = 16, device: str = "auto", max_batches: Optional[int] = None,
                 speed_batches: int = 10, splits: List[str] = ("validation", "test")) -> Dict[str, Any]:
    ckpt = find_checkpoint(run)
    dev = resolve_device(device)
    model, cfg = load_run(ckpt, device=str(dev))
    make_permanent(model)  # fold pruning masks: weights are counted once, as plain Linears
    data = prepare_data(cfg.data)
    args = (data, cfg.data.seq_len, batch_size, dev, max_batches, speed_batches, list(splits))
    result: Dict[str, Any] = {"checkpoint": str(ckpt), "batch_size": batch_size, **measure(model, *args),
                              "size_on_disk_bytes": state_dict_bytes(model),
                              "checkpoint_bytes": _disk_bytes(ckpt)}
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    variants = {}
    for name, (variant, path) in exported_variants(run_dir, model, cfg, data.vocab_size).items():
        variants[name] = {**measure(variant, *args), "size_on_disk_bytes": path.stat().st_size,
                          "file": path.name}
    if variants:
        result["variants"] = variants
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def evaluate_pretrained(cfg, out_dir, batch_size: int = 16, device: str = "auto",
                        max_batches: Optional[int] = None, speed_batches: int = 10,
                        splits: List[str] = ("validation", "test")) -> Dict[str, Any]:
    """Measure the model ``cfg.model`` names, as it is, on ``cfg.data`` tokenized with
    its own tokenizer (``python evaluate.py model=smollm2 [data=...]``): the same
    numbers as :func:`evaluate_run`, written to ``out_dir/eval.json``. A spec without
    weights of its own (tfx's GPT) is refused: evaluate a trained run instead."""
    spec = model_spec(cfg)
    if not callable(getattr(spec, "tokenizer_config", None)):
        raise ConfigError(f"model={type(spec).__name__} has no pretrained weights to evaluate; "
                          f"train it and pass run=<run directory>, or choose model=hf/smollm2")
    use_model_tokenizer(cfg, spec)
    dev = resolve_device(device)
    data = prepare_data(cfg.data)
    seq_len = to_data_config(cfg.data).seq_len
    model = build_model(cfg, data.vocab_size, seq_len, spec=spec).to(dev).eval()
    args = (data, seq_len, batch_size, dev, max_batches, speed_batches, list(splits))
    result: Dict[str, Any] = {"model": spec.name_or_path, "pretrained": spec.pretrained,
                              "data": to_data_config(cfg.data).source, "seq_len": seq_len, "batch_size": batch_size,
                              **measure(model, *args), "size_on_disk_bytes": state_dict_bytes(model)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
