"""Property-based test of bad input: generated overrides (wrong types, zero, negative,
huge, NaN/inf, empty lists, unknown strings) for every field of every config group are
thrown at composition and at the build order's steps 1-2 (instantiation, validation).
Each either succeeds or fails with tfx's one-line error (or Hydra's composition error
for schema fields), never another exception; NaN, negative numbers and (but for the
fields listed below) infinity are never accepted by a numeric field. Bounded: 200
derandomized examples, ~20-30 s on 2 cores."""
from __future__ import annotations

import functools
from typing import Dict, List, Tuple

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hypothesis import HealthCheck, given, settings, strategies as st
from omegaconf import DictConfig, OmegaConf

from conftest import CONF, TINY
from tfx.cli import check_group_overrides
from tfx.config import (build_loop, build_model, build_techniques, check_choices, optimizer_factory,
                        register_configs, scheduler_factory)
from tfx.core import Pipeline, Plan, TfxError
from tfx.data import check_data_config, to_data_config
from tfx.train.build import resolve_device

# group -> options whose constructor arguments are fuzzed (model: tiny only, for speed)
OPTIONS: Dict[str, List[str]] = {
    "optim": ["adamw", "sgd", "muon"],
    "scheduler": ["cosine", "linear", "constant"],
    "precision": ["fp32", "bf16", "fp16"],
    "memory": ["activation_ckpt", "selective_ckpt"],
    "attention": ["sliding_window", "block_sparse", "global_local"],
    "compression": ["[prune]", "[nm]", "[ptq]", "[qat]", "[distill]", "[lowrank]", "[structured]",
                    "[compressed_export]", "[powersgd]", "[fp16_comm]", "[bf16_comm]"],
    "parallel": ["ddp", "fsdp", "tp", "pp", "fsdp_tp"],
    "data": ["pydocs", "files", "shakespeare", "tinystories", "wikitext103"],
}
#: overrides an option needs to get past validation, so that its other values are checked
NEEDS = {"[distill]": ["compression.distill.teacher=outputs/teacher"]}
ALWAYS = ("trainer", "model", "data", "logger")  # fields present in every composition
TOP_LEVEL = ["seed", "resume", "compile"]
GROUPS = sorted(OPTIONS) + ["model", "logger", "experiment"]  # option names get bad values too

# Hydra override values: numbers of every sign and size, NaN/inf, bools, null, strings,
# lists and a mapping. (Model sizes are bounded by build_model's memory check.)
VALUES = ["0", "1", "2", "3", "7", "64", "-1", "-7", "1000000000000", "-1000000000000",
          "0.0", "0.5", "-0.5", "1.0", "1.5", "1e-12", "1e300", "-1e300", "nan", "inf", "-inf",
          "true", "false", "null", "''", "abc", "'cuda:7'", "[]", "[0.9]", "[0.9,0.95]", "[1,2,3]",
          "['a']", "{}"]
NEGATIVE = {"-1", "-7", "-1000000000000", "-0.5", "-1e300", "-inf"}
ACCEPTS_NEGATIVE: set = set()  # numeric fields where a negative number is meaningful: none
ACCEPTS_INF = {"trainer.grad_clip"}  # clip at inf: measure the norm, never clip
# optim=muon (tfx/optim/muon.py) checks these only for > 0 / >= 0 so far:
MUON_ACCEPTS_INF = {"optim.lr", "optim.weight_decay", "optim.adamw_lr", "optim.adamw_eps",
                    "optim.adamw_weight_decay"}


@pytest.fixture(scope="module")
def hydra_ctx():
    """One Hydra context for the module: composing reuses the loaded yaml files
    (conftest.compose re-initialises Hydra each call, ~3x slower)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        yield


def compose_tiny(overrides: List[str]):
    return compose("train", overrides=TINY + list(overrides))


def world_size(picks: Dict[str, str]) -> int:
    return {"fsdp_tp": 4}.get(picks.get("parallel", ""), 2 if "parallel" in picks else 1)


def leaves(node, prefix: str) -> List[str]:
    out = []
    for key, value in node.items_ex(resolve=False) if isinstance(node, DictConfig) else []:
        if str(key).startswith("_"):
            continue
        path = f"{prefix}.{key}"
        out += leaves(value, path) if isinstance(value, DictConfig) and "_target_" not in value \
            and len(value) else [path]
    return out


@functools.lru_cache(maxsize=None)
def fields(group: str, option: str = "") -> Tuple[str, ...]:
    """The overridable keys of one group option, read from its composed config."""
    cfg = compose_tiny([f"{group}={option}"] if option else [])
    node = cfg[group]
    if option.startswith("["):  # multi-select: compression=[prune] -> compression.prune.*
        name = option.strip("[]")
        return tuple(leaves(node[name], f"{group}.{name}"))
    if "_target_" in node or group in ALWAYS:
        return tuple(leaves(node, group))
    # a composite option (parallel=fsdp_tp): every sub-technique's keys
    return tuple(k for sub, v in node.items() for k in
                 (leaves(v, f"{group}.{sub}") if isinstance(v, DictConfig) else [f"{group}.{sub}"]))


def build_steps(overrides: List[str], world: int) -> DictConfig:
    """Composition (after train.py's check of group overrides) and the build order's
    steps 1-2, nothing that holds data or trains."""
    check_group_overrides(overrides, CONF)
    cfg = compose_tiny(overrides)
    check_choices(cfg)
    loop = build_loop(cfg)
    resolve_device(loop.device)
    techniques = build_techniques(cfg)
    make_optimizer, make_scheduler = optimizer_factory(cfg), scheduler_factory(cfg)
    model = build_model(cfg, 64, 32)
    make_scheduler(make_optimizer(model), loop.max_steps)
    Pipeline(techniques).validate(Plan(techniques, world_size=world, device_type="cpu",
                                       accum_steps=loop.accum_steps))
    check_data_config(to_data_config(cfg.data))
    return cfg


@st.composite
def cases(draw):
    groups = draw(st.lists(st.sampled_from(sorted(OPTIONS)), max_size=2, unique=True))
    picks = {g: draw(st.sampled_from(OPTIONS[g])) for g in groups}
    keys = sorted({k for g in ALWAYS for k in fields(g)} | set(TOP_LEVEL) | set(GROUPS)
                  | {k for g, o in picks.items() for k in fields(g, o)})
    chosen = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True))
    values = {k: draw(st.sampled_from(VALUES)) for k in chosen}
    return picks, values


def check(picks: Dict[str, str], values: Dict[str, str]) -> None:
    overrides = [f"{g}={o}" for g, o in picks.items()] + [x for o in picks.values() for x in NEEDS.get(o, [])]
    overrides += [f"{k}={v}" for k, v in values.items()]
    try:
        cfg = build_steps(overrides, world_size(picks))
    except ConfigCompositionException:
        return
    except TfxError as err:
        assert "\n" not in str(err) and str(err), f"{overrides}: not one line: {err!r}"
        return
    except Exception as err:  # noqa: BLE001 - the property under test
        raise AssertionError(f"{overrides} crashed with {type(err).__name__}: {err}") from err

    def number(key):  # None for string fields: "-1" or "nan" given to them are just text
        value = OmegaConf.select(cfg, key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    inf_ok = ACCEPTS_INF | (MUON_ACCEPTS_INF if picks.get("optim") == "muon" else set())
    accepted = [k for k, v in values.items() if number(k) is not None
                and (v == "nan" or (v in NEGATIVE and k not in ACCEPTS_NEGATIVE)
                     or (v == "inf" and k not in inf_ok))]
    assert not accepted, f"{overrides}: accepted {[f'{k}={values[k]}' for k in accepted]}"


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_generated_overrides_fail_in_one_line_or_succeed(hydra_ctx, case):
    check(*case)
