"""Typed config schemas (registered with Hydra's ConfigStore) and technique building.

The fixed groups (model, data, optim, trainer, logger) are dataclasses, so a
misspelled key or a wrong type fails when Hydra composes the config. The technique
groups (precision, memory, attention, compression, parallel) hold a ``_target_``
class; :func:`build_techniques` checks their keys against the constructor's
signature before instantiating anything, so a typo there fails just as early with
the group, the key and the valid keys.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf

from tfx.core.errors import ConfigError
from tfx.core.technique import Technique
from tfx.data.config import DataConfig

TECHNIQUE_GROUPS = ("precision", "attention", "compression", "memory", "parallel")


@dataclass
class ModelConfig:
    name: str = "small"
    vocab_size: Optional[int] = None  # None: taken from the tokenizer
    block_size: Optional[int] = None  # None: data.seq_len
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    d_ff: Optional[int] = None
    dropout: float = 0.0
    bias: bool = False
    tie_embeddings: bool = True


@dataclass
class OptimConfig:
    name: str = "adamw"          # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.9        # sgd only
    schedule: str = "cosine"     # cosine | linear | constant
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: Optional[float] = 1.0
    accum_steps: int = 1


@dataclass
class TrainerConfig:
    max_steps: int = 160
    batch_size: int = 16         # micro-batch per process; global = batch * accum * world
    eval_every: int = 100
    eval_batches: int = 20       # batches per periodic evaluation
    final_eval_batches: Optional[int] = None  # None: the whole validation split
    log_every: int = 10
    ckpt_every: int = 100        # 0: only at the end
    keep_last: int = 2
    max_bad_steps: int = 3       # consecutive non-finite losses before stopping (not fp16)
    device: str = "auto"         # auto | cpu | cuda | cuda:N
    progress: bool = True
    deterministic: bool = False


@dataclass
class LoggerConfig:
    backend: str = "wandb"       # wandb | none  (metrics.jsonl/summary.json are always written)
    project: str = "tfx"
    entity: Optional[str] = None
    mode: str = "auto"           # auto (online with an API key, else offline) | online | offline
    group: Optional[str] = None  # None: the sweep directory for multiruns
    tags: List[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    precision: Any = None
    attention: Any = None
    compression: Any = None
    memory: Any = None
    parallel: Any = None
    seed: int = 1337
    resume: str = "auto"         # auto | never | <checkpoint file or run dir>
    compile: bool = False
    run_dir: Optional[str] = None  # filled in from Hydra's output directory
    experiment: Optional[str] = None


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


_CHOICE_FIELDS = {
    ("optim", "name"): ("adamw", "sgd"),
    ("optim", "schedule"): ("cosine", "linear", "constant"),
    ("logger", "backend"): ("wandb", "none"),
    ("logger", "mode"): ("auto", "online", "offline", "disabled"),
}


def check_choices(cfg: DictConfig) -> None:
    """String fields with a fixed set of values: fail with the valid choices."""
    for (group, key), choices in _CHOICE_FIELDS.items():
        value = OmegaConf.select(cfg, f"{group}.{key}")
        if value is not None and value not in choices:
            raise ConfigError(f"{group}.{key}={value!r} is not valid; choose one of {list(choices)}")
    resume = cfg.get("resume", "auto")
    if not isinstance(resume, str) or not resume:
        raise ConfigError("resume must be 'auto', 'never' or a checkpoint path")


def _entries(group: str, node: Any) -> List[tuple]:
    """(label, config) pairs of a technique group; multi-select groups such as
    ``compression=[prune,distill]`` hold one sub-config per chosen option."""
    if node is None:
        return []
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{group}: expected a config mapping, got {node!r}")
    if "_target_" in node:
        return [(group, node)]
    return [(f"{group}.{k}", v) for k, v in node.items() if isinstance(v, DictConfig) and "_target_" in v]


def _check_signature(label: str, node: DictConfig) -> None:
    from hydra.utils import get_class

    try:
        cls = get_class(node._target_)
    except Exception as err:
        raise ConfigError(f"{label}: cannot import _target_ {node._target_!r} ({err})") from err
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self"]
    for key in node:
        if key.startswith("_"):
            continue
        if key not in params:
            raise ConfigError(f"{label}: unknown key {key!r} for {cls.__name__}; valid keys: {valid}")
        _check_type(label, key, node[key], params[key].annotation)


def _check_type(label: str, key: str, value: Any, annotation: Any) -> None:
    kinds = {"int": int, "float": (int, float), "bool": bool, "str": str}
    expected = kinds.get(annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""))
    if expected is None or value is None:
        return
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{label}.{key}={value!r}: expected {annotation if isinstance(annotation, str) else annotation.__name__}")


def build_techniques(cfg: DictConfig, groups=TECHNIQUE_GROUPS) -> List[Technique]:
    """Instantiate every chosen technique from its group config (checked first)."""
    from hydra.utils import instantiate

    techniques: List[Technique] = []
    for group in groups:
        for label, node in _entries(group, cfg.get(group)):
            _check_signature(label, node)
            try:
                tech = instantiate(node, _convert_="all")
            except ConfigError:
                raise
            except Exception as err:
                cause = err.__cause__ or err
                if isinstance(cause, ConfigError):  # already names the key and the fix
                    raise cause from None
                raise ConfigError(f"{label}: {cause}") from err
            if not isinstance(tech, Technique):
                raise ConfigError(f"{label}: {node._target_} is not a tfx Technique")
            techniques.append(tech)
    if cfg.get("compile", False):
        from tfx.train.compile import Compile

        techniques.append(Compile())
    return techniques
