"""Typed config schemas (registered with Hydra's ConfigStore) and instantiation.

Every group is a ``_target_`` node whose keys are the target's constructor
arguments (lightning-hydra-template style):

* ``model``: a model spec, e.g. :class:`tfx.model.GPTConfig`; ``spec.build(vocab_size,
  block_size)`` makes the ``nn.Module`` (sizes left ``null`` come from the data);
* ``optim``: ``_partial_: true`` optimizer factory called with the model
  (:func:`tfx.optim.adamw`, ``sgd``, ``tfx.optim.muon.muon``);
* ``scheduler``: a schedule (:class:`tfx.optim.WarmupDecay`) called with
  ``(optimizer, max_steps)``;
* ``trainer``: the loop's own :class:`TrainerConfig`;
* technique groups (precision, memory, attention, compression, parallel): a
  :class:`~tfx.core.Technique` subclass.

Fixed-shape nodes (trainer, logger, data, the GPT model) are dataclass schemas, so a
misspelled key or a wrong type fails when Hydra composes the config. For the others
:func:`instantiate_checked` compares the keys with the target's signature before
anything is built, so a typo fails just as early, naming the group, the key and the
valid keys. Values out of range fail in the constructors with a :class:`ConfigError`.
"""
from __future__ import annotations

import inspect
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from tfx.core.errors import ConfigError
from tfx.core.technique import Technique
from tfx.data.config import DataConfig
from tfx.model.gpt import GPTConfig

TECHNIQUE_GROUPS = ("precision", "attention", "compression", "memory", "parallel")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    if not (value > 0 or (allow_zero and value == 0)):  # NaN is neither
        raise ConfigError(f"{name}={value} must be {'>= 0' if allow_zero else '> 0'}")


def _finite_positive(name: str, value, what: str, integer: bool = False) -> None:
    """None, or a finite number > 0 (an integer if ``integer``)."""
    if value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    whole = number and float(value).is_integer()  # False for inf and nan
    if not number or not 0 < value < math.inf or (integer and not whole):
        kind = "an integer" if integer else "a finite number"
        shown = int(value) if integer and whole else value  # 5e7 composes as 50000000.0
        raise ConfigError(f"{name}={shown!r} must be {kind} > 0 ({what}), or null")


@dataclass
class TrainerConfig:
    """The training loop's parameters (``trainer`` group): one optimizer step sees
    ``batch_size * accum_steps * data-parallel ranks`` sequences."""

    _target_: str = "tfx.config.TrainerConfig"
    max_steps: int = 160
    batch_size: int = 16         # micro-batch per process
    accum_steps: int = 1         # micro-batches per optimizer step (exact: token-normalised)
    grad_clip: Optional[float] = 1.0  # max global grad norm; null = no clipping
    eval_every: int = 100        # 0: only the final evaluation
    eval_batches: int = 20       # batches per periodic evaluation
    final_eval_batches: Optional[int] = None  # None: the whole validation split
    log_every: int = 10
    ckpt_every: int = 100        # 0: only at the end
    keep_last: int = 2           # newest checkpoints kept; 0: keep all
    max_bad_steps: int = 3       # consecutive non-finite losses before stopping (every precision)
    max_scaler_skips: int = 50   # fp16: consecutive steps the loss scaler skipped before stopping
    device: str = "auto"         # auto | cpu | cuda | cuda:N
    progress: bool = True
    deterministic: bool = False
    # stop early (whichever comes first, with max_steps); a normal end: export, final eval
    budget_tokens: Optional[float] = None    # stop at the step reaching this many target tokens (5e7 ok)
    budget_seconds: Optional[float] = None   # stop after this many seconds of training (spans resumes)
    target_loss: Optional[float] = None      # stop at the first evaluation with val loss <= this
    peak_tflops: Optional[float] = None      # one device's peak for MFU/HFU; None: GPU table / CPU probe

    def __post_init__(self) -> None:
        for key in ("max_steps", "eval_every", "ckpt_every", "keep_last"):
            _positive(f"trainer.{key}", getattr(self, key), allow_zero=True)
        for key in ("batch_size", "accum_steps", "eval_batches", "log_every", "max_bad_steps",
                    "max_scaler_skips", "final_eval_batches", "grad_clip"):
            _positive(f"trainer.{key}", getattr(self, key))
        _finite_positive("trainer.budget_tokens", self.budget_tokens, "a number of target tokens",
                         integer=True)
        if self.budget_tokens is not None:
            self.budget_tokens = int(self.budget_tokens)  # typed float so that 5e7 composes
        for key, what in (("budget_seconds", "seconds of training"),
                          ("target_loss", "the validation loss, nats per token"),
                          ("peak_tflops", "one device's peak TFLOP/s")):
            _finite_positive(f"trainer.{key}", getattr(self, key), what)
        if self.target_loss is not None and not self.eval_every:
            raise ConfigError(f"trainer.target_loss={self.target_loss} is checked at the periodic "
                              f"evaluations, but trainer.eval_every=0; set trainer.eval_every > 0")


@dataclass
class GPTSchema(GPTConfig):
    """``conf/model/*.yaml`` of tfx's GPT: the keys are :class:`GPTConfig`'s fields."""

    _target_: str = "tfx.model.GPTConfig"


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
    model: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: Any = None
    scheduler: Any = None
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

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="model", name="gpt_schema", node=GPTSchema)


_CHOICE_FIELDS = {
    ("logger", "backend"): ("wandb", "none"),
    ("logger", "mode"): ("auto", "online", "offline", "disabled"),
}


def check_choices(cfg: DictConfig) -> None:
    """String fields with a fixed set of values (fail with the valid choices), and the
    top-level values: ``seed`` (NumPy's range), ``resume``, the constructor groups."""
    for (group, key), choices in _CHOICE_FIELDS.items():
        value = OmegaConf.select(cfg, f"{group}.{key}")
        if value is not None and value not in choices:
            raise ConfigError(f"{group}.{key}={value!r} is not valid; choose one of {list(choices)}")
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 32:
        raise ConfigError(f"seed={seed!r} must be an integer in [0, 2**32) (NumPy's seed range)")
    resume = cfg.get("resume", "auto")
    if not isinstance(resume, str) or not resume:
        raise ConfigError("resume must be 'auto', 'never' or a checkpoint path")
    for group in ("model", "optim", "scheduler"):
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"{group}: expected a config with a _target_, got {node!r}; "
                              f"choose one of conf/{group}/*.yaml")


# -- instantiation ----------------------------------------------------------------------
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


def check_signature(label: str, node: DictConfig, bound: int = 0) -> None:
    """Every key of ``node`` must be an argument of its ``_target_``, of the right type.
    ``bound``: leading arguments supplied by the caller (a partial's model/optimizer)."""
    try:
        target = get_object(node._target_)
    except Exception as err:
        raise ConfigError(f"{label}: cannot import _target_ {node._target_!r} ({err})") from err
    fn = target.__init__ if inspect.isclass(target) else target
    params = dict(inspect.signature(fn).parameters)
    params.pop("self", None)
    names = list(params)[bound:]
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: check names only
        hints = {}
    for key in node:
        if key.startswith("_"):
            continue
        if key not in names:
            raise ConfigError(f"{label}: unknown key {key!r} for {getattr(target, '__name__', target)}; "
                              f"valid keys: {[n for n in names if not n.startswith('_')]}")
        _check_type(label, key, node[key], hints.get(key))


def _allowed(annotation: Any) -> Optional[tuple]:
    """Python types a config value may have for ``annotation`` (None: don't check)."""
    if annotation in (int,):
        return (int,)
    if annotation is float:
        return (int, float)
    if annotation in (bool, str):
        return (annotation,)
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        parts = [a for a in typing.get_args(annotation) if a is not type(None)]
        allowed = [_allowed(a) for a in parts]
        if any(a is None for a in allowed):
            return None
        return tuple(t for a in allowed for t in a)
    if origin in (list, tuple, typing.List, typing.Tuple) or annotation in (list, tuple):
        return (list, tuple, ListConfig)
    return None


def _check_type(label: str, key: str, value: Any, annotation: Any) -> None:
    expected = _allowed(annotation)
    if expected is None or value is None:
        return
    ok = isinstance(value, expected) and not (bool not in expected and isinstance(value, bool))
    if not ok:
        name = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        raise ConfigError(f"{label}.{key}={value!r}: expected {name}")


def instantiate_checked(label: str, node: DictConfig, *args, bound: Optional[int] = None,
                        **kwargs) -> Any:
    """``hydra.utils.instantiate`` after :func:`check_signature`; a ConfigError raised
    by the target comes out as itself, any other failure as one line naming ``label``.
    ``bound``: leading arguments a partial gets later (default: ``len(args)``)."""
    check_signature(label, node, bound=len(args) if bound is None else bound)
    try:
        return instantiate(node, *args, _convert_="all", **kwargs)
    except ConfigError:
        raise
    except Exception as err:
        cause = err.__cause__ or err
        if isinstance(cause, ConfigError):  # already names the key and the fix
            raise cause from None
        raise ConfigError(f"{label}: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}") from err


def build_techniques(cfg: DictConfig, groups=TECHNIQUE_GROUPS) -> List[Technique]:
    """Instantiate every chosen technique from its group config (checked first)."""
    techniques: List[Technique] = []
    for group in groups:
        for label, node in _entries(group, cfg.get(group)):
            tech = instantiate_checked(label, node)
            if not isinstance(tech, Technique):
                raise ConfigError(f"{label}: {node._target_} is not a tfx Technique")
            techniques.append(tech)
    if cfg.get("compile", False):
        techniques.append(instantiate_checked("compile", OmegaConf.create({"_target_": "tfx.compile.Compile"})))
    return techniques


def build_loop(cfg: DictConfig) -> TrainerConfig:
    return instantiate_checked("trainer", cfg.trainer)


def model_spec(cfg: DictConfig):
    """The ``model`` group's spec (holds no tensors; an HF spec has read its config)."""
    return instantiate_checked("model", cfg.model)


def use_model_tokenizer(cfg: DictConfig, spec) -> None:
    """A model that brings its own tokenizer (an HF spec's ``tokenizer_config()``) makes
    it ``cfg.data.tokenizer``, in place, so data, checkpoints and resumes all see the
    tokenizer the model was trained with. tfx's GPT leaves the data's tokenizer alone."""
    get = getattr(spec, "tokenizer_config", None)
    if not callable(get) or "data" not in cfg:
        return
    wanted = dict(get())
    with open_dict(cfg):
        if cfg.data.get("tokenizer") is None:
            cfg.data.tokenizer = {}
        for key, value in wanted.items():  # key by key: a typed node keeps its schema
            cfg.data.tokenizer[key] = value


def build_model(cfg: DictConfig, vocab_size: int, block_size: int, spec=None):
    """The ``model`` group's spec, built for the data (sizes left null come from it);
    ``spec``: one already instantiated from ``cfg.model``."""
    spec = spec if spec is not None else model_spec(cfg)
    if isinstance(spec, GPTConfig):
        check_gpt_fits(spec, vocab_size, block_size)
    try:
        return spec.build(vocab_size=vocab_size, block_size=block_size)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from err


def _memory_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return None


def check_gpt_fits(spec: GPTConfig, vocab_size: int, block_size: int) -> None:
    """Before building: a vocabulary smaller than the tokenizer's cannot embed the data,
    and fp32 weights larger than this machine's memory cannot even be built."""
    if spec.vocab_size is not None and spec.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={spec.vocab_size} is smaller than the tokenizer's "
                          f"{vocab_size} tokens; raise it or leave it null (the tokenizer's)")
    v, b = spec.vocab_size or vocab_size, spec.block_size or block_size
    d, f, n = spec.d_model, spec.d_ff or 4 * spec.d_model, spec.n_layer
    params = (v + b) * d + n * (4 * d * d + 2 * d * f + 4 * d) + (0 if spec.tie_embeddings else v * d)
    memory = _memory_bytes()
    if memory and 4 * params > memory:
        raise ConfigError(f"model: n_layer={n}, d_model={d}, d_ff={f}, vocab {v}, block_size {b} make "
                          f"about {params / 1e9:,.1f}B parameters ({4 * params / 2**30:,.0f} GiB in fp32), "
                          f"more than this machine's {memory / 2**30:,.0f} GiB of memory; choose a "
                          f"smaller model")


def optimizer_factory(cfg: DictConfig):
    """``optim`` group: a partial that takes the model and returns the optimizer. It is
    tried once on a 2x2 Linear so that bad values fail now, before data or model exist."""
    factory = instantiate_checked("optim", cfg.optim, bound=1)
    try:
        factory(torch.nn.Linear(2, 2))
    except ConfigError:
        raise
    except Exception as err:  # a bad value torch itself refuses
        raise ConfigError(f"optim: {str(err).splitlines()[0]}") from err
    return factory


def scheduler_factory(cfg: DictConfig):
    """``scheduler`` group: an object called with ``(optimizer, max_steps)``."""
    return instantiate_checked("scheduler", cfg.scheduler)
