"""evaluate.py's work: reload a run's newest checkpoint and measure it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from tfx.ckpt import load_run
from tfx.ckpt.run import find_checkpoint
from tfx.data import prepare_data
from tfx.evaluation import count_params, evaluate_lm, inference_speed, state_dict_bytes
from tfx.train.build import resolve_device


def evaluate_run(run: str, batch_size: int = 16, device: str = "auto", max_batches: Optional[int] = None,
                 speed_batches: int = 10, splits: List[str] = ("validation", "test")) -> Dict[str, Any]:
    ckpt = find_checkpoint(run)
    dev = resolve_device(device)
    model, cfg = load_run(ckpt, device=str(dev))
    data = prepare_data(cfg.data)
    blocks = {"validation": data.val, "test": data.test}
    result: Dict[str, Any] = {"checkpoint": str(ckpt)}
    for split in splits:
        m = evaluate_lm(model, blocks[split], batch_size, dev, max_batches=max_batches)
        key = "val" if split == "validation" else split
        result[f"{key}_loss"], result[f"{key}_ppl"] = m["loss"], m["ppl"]
    speed = inference_speed(model, batch_size, cfg.data.seq_len, data.vocab_size, dev, iters=speed_batches)
    result.update({"inference_tokens_per_sec": speed["tokens_per_sec"],
                   "latency_ms_per_batch": speed["latency_ms"], "batch_size": batch_size,
                   "params": count_params(model), "size_on_disk_bytes": state_dict_bytes(model),
                   "checkpoint_bytes": ckpt.stat().st_size})
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
