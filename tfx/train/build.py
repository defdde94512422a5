"""Building the pieces of a run from its config (no Hydra needed)."""
from __future__ import annotations

import os
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tfx.core import ConfigError, RunContext, Stage, Technique
from tfx.model import GPT, GPTConfig

_MODEL_KEYS = ("n_layer", "n_head", "d_model", "d_ff", "dropout", "bias", "tie_embeddings")


def build_model(model_cfg, vocab_size: int, block_size: int) -> GPT:
    """GPT from the ``model`` group; vocab and context default to the data's."""
    get = (lambda k: model_cfg.get(k)) if hasattr(model_cfg, "get") else (lambda k: getattr(model_cfg, k))
    kwargs = {k: get(k) for k in _MODEL_KEYS if get(k) is not None}
    try:
        return GPT(GPTConfig(vocab_size=get("vocab_size") or vocab_size,
                             block_size=get("block_size") or block_size, **kwargs))
    except ValueError as err:
        raise ConfigError(f"model: {err}") from err


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={spec} but CUDA is not available; use trainer.device=auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_dtype(techniques: List[Technique]) -> Optional[torch.dtype]:
    from tfx.precision import Precision

    prec = next((t for t in techniques if isinstance(t, Precision)), None)
    return prec.compute_dtype if prec is not None else None


def reapply_surgery(model: nn.Module, cfg: DictConfig, state: Dict[str, Any]) -> nn.Module:
    """Re-create a run's structural changes on a fresh model before loading weights."""
    from tfx.config import build_techniques
    from tfx.core import Pipeline

    techs = [t for t in build_techniques(cfg, groups=("attention", "compression"))
             if t.stage == Stage.SURGERY and t.reapply_on_load]
    pipe = Pipeline(techs)
    pipe.load_state_dict(state.get("techniques", {}))
    ctx = RunContext(vocab_size=state.get("vocab_size"), tokenizer_id=state.get("tokenizer_id"))
    return pipe.apply_to_model(model, ctx)


def config_dict(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)
