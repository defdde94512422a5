"""Property-based test of bad input: generated overrides (wrong types, zero, negative,
huge, NaN/inf, empty lists, unknown strings) for every field of every config group are
thrown at composition and at the build order's steps 1-2 (instantiation, validation).
Each either succeeds or fails with tfx's one-line error (or Hydra's composition error
for schema fields), never another exception; NaN, negative numbers and (but for the
fields listed below) infinity are never accepted by a numeric field. Bounded: 200
derandomized examples over all groups, 40 over the options added later (FOCUS), each
of their keys alone against NaN/inf/negatives, and exact checks of the optimizers' and
pipeline parallel's ranges: ~30 s for the file on 2 shared cores (load average ~4.5)."""
from __future__ import annotations

import copy
import functools
import math
from typing import Dict, List, Optional, Tuple

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hypothesis import HealthCheck, given, settings, strategies as st
from omegaconf import DictConfig, OmegaConf

from conftest import CONF, TINY
from tfx.cli import check_group_overrides
from tfx.config import (build_loop, build_model, build_techniques, check_choices, model_spec,
                        optimizer_factory, register_configs, scheduler_factory)
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
                    "[compressed_export]", "[powersgd]", "[fp16_comm]", "[bf16_comm]",
                    "[wanda]", "[sparsegpt]", "[gptq]"],
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
ACCEPTS_NEGATIVE: set = set()  # numeric fields where any negative number is meaningful: none
ACCEPTS = {("compression.gptq.group_size", "-1")}  # (field, value): one group per row
ACCEPTS_INF = {"trainer.grad_clip"}  # clip at inf: measure the norm, never clip
#: not checked yet by tfx/compression/oneshot (reported; remove once they refuse NaN/inf/negatives)
KNOWN_GAPS: set = set()  # keys known to accept a bad value (none now)


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
    return checked_steps(compose_tiny(overrides), world)


def checked_steps(cfg: DictConfig, world: int) -> DictConfig:
    """The build order's steps 1-2 on a composed config."""
    check_choices(cfg)
    loop = build_loop(cfg)
    resolve_device(loop.device)
    techniques = build_techniques(cfg)
    make_optimizer, make_scheduler = optimizer_factory(cfg), scheduler_factory(cfg)
    model = build_model(cfg, 64, 32)
    make_scheduler(make_optimizer(model), loop.max_steps)
    plan = Plan(techniques, world_size=world, device_type="cpu", accum_steps=loop.accum_steps,
                model=model_spec(cfg), max_steps=loop.max_steps, batch_size=loop.batch_size)
    Pipeline(techniques).validate(plan)
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


def check(picks: Dict[str, str], values: Dict[str, str], cfg: Optional[DictConfig] = None) -> None:
    """Compose ``picks`` and ``values`` (or take ``cfg``, composed with them) and run the
    build order's steps 1-2: one-line error or success, and no NaN/negative/inf accepted."""
    overrides = [f"{g}={o}" for g, o in picks.items()] + [x for o in picks.values() for x in NEEDS.get(o, [])]
    overrides += [f"{k}={v}" for k, v in values.items()]
    try:
        world = world_size(picks)
        cfg = build_steps(overrides, world) if cfg is None else checked_steps(cfg, world)
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

    accepted = [k for k, v in values.items() if number(k) is not None and (k, v) not in ACCEPTS
                and k not in KNOWN_GAPS
                and (v == "nan" or (v in NEGATIVE and k not in ACCEPTS_NEGATIVE)
                     or (v == "inf" and k not in ACCEPTS_INF))]
    assert not accepted, f"{overrides}: accepted {[f'{k}={values[k]}' for k in accepted]}"


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_generated_overrides_fail_in_one_line_or_succeed(hydra_ctx, case):
    check(*case)


# -- every numeric key of the optimizers: finite, in range, one line naming both ------------
NAN, INF = math.nan, math.inf
#: (allowed range as the error states it, values refused, values accepted), by hand
POSITIVE = ("> 0 and finite", [0, -1, NAN, INF, -INF], [1e-12, 1e300])
NONNEG = (">= 0 and finite", [-1e-12, NAN, INF, -INF], [0, 0.5])
UNIT = ("a number in [0, 1)", [1, 1.5, -0.1, NAN, INF], [0, 0.99])
OPTIM_KEYS = {
    "adamw": {"lr": POSITIVE, "eps": POSITIVE, "weight_decay": NONNEG},
    "sgd": {"lr": POSITIVE, "momentum": UNIT, "weight_decay": NONNEG},
    "muon": {"lr": POSITIVE, "adamw_lr": POSITIVE, "adamw_eps": POSITIVE, "weight_decay": NONNEG,
             "adamw_weight_decay": NONNEG, "momentum": UNIT,
             "ns_steps": ("an integer in [1, 100)", [0, 100, -1], [1, 99])},
}
BETAS = {"adamw": "betas", "muon": "adamw_betas"}
FLAGS = {"adamw": {"fused"}}  # true/false/null switches, not numbers
WRONG_TYPES = ["abc", True, [1]]  # the signature check or the range check: one line


def optim_error(base: DictConfig, key: str, value) -> str:
    cfg = copy.deepcopy(base)
    OmegaConf.update(cfg, f"optim.{key}", value, merge=False)
    try:
        optimizer_factory(cfg)
    except TfxError as err:
        assert "\n" not in str(err), err
        return str(err)
    return ""


@pytest.mark.parametrize("optim", sorted(OPTIM_KEYS))
def test_every_numeric_optimizer_key_is_checked(hydra_ctx, optim):
    base = compose_tiny([f"optim={optim}"])
    numeric = {k for k, v in base.optim.items() if not k.startswith("_") and k not in FLAGS.get(optim, ())
               and (isinstance(v, (int, float)) and not isinstance(v, bool) or v is None)}
    for key in FLAGS.get(optim, ()):
        assert optim_error(base, key, 1.5).startswith(f"optim.{key}="), key
    assert numeric == set(OPTIM_KEYS[optim]), f"a numeric key of conf/optim/{optim}.yaml has no entry here"
    for key, (allowed, bad, good) in OPTIM_KEYS[optim].items():
        for value in bad:
            assert optim_error(base, key, value) == f"optim.{key}={value!r} must be {allowed}", (key, value)
        for value in WRONG_TYPES + ([5.0, NAN, INF] if allowed.startswith("an integer") else []):
            assert optim_error(base, key, value).startswith(f"optim.{key}="), (key, value)
        for value in good:
            assert optim_error(base, key, value) == "", (key, value)
    if optim in BETAS:
        key = BETAS[optim]
        for value in ([0.9, INF], [0.9, NAN], [0.9], [1.0, 0.9], [-0.1, 0.9], "abc", ["a", "b"], [True, 0.9]):
            err = optim_error(base, key, value)
            assert err.startswith(f"optim.{key}=") and "must be two numbers in [0, 1)" in err, (value, err)
        assert optim_error(base, key, [0, 0.999]) == ""


# -- parallel=pp: micro-batches and stages, refused in validate (torch's schedules as reference)
def pp_plan(world: int, batch_size: int = 8, n_layer: int = 8) -> Plan:
    from tfx.model import GPTConfig

    return Plan([], world_size=world, model=GPTConfig(n_layer=n_layer), batch_size=batch_size)


def torch_accepts(schedule: str, world: int, stages_per_rank: int, n: int) -> bool:
    """Whether torch's schedule constructor takes ``n`` micro-batches for this layout
    (stages are stand-ins with the attributes the constructors read)."""
    from types import SimpleNamespace

    from tfx.parallel.pp import SCHEDULES

    n_stages = world * stages_per_rank
    stages = [SimpleNamespace(stage_index=s, num_stages=n_stages, group_size=world, group_rank=0,
                              is_first=s == 0, is_last=s == n_stages - 1, has_backward=True)
              for s in range(0, n_stages, world)]
    try:
        cls = SCHEDULES[schedule]
        cls(stages if schedule == "interleaved_1f1b" else stages[0], n_microbatches=n)
    except ValueError:
        return False
    return True


def pp_error(plan: Plan, **kwargs) -> str:
    from tfx.parallel import PipelineParallel

    try:
        tech = PipelineParallel(**kwargs)
        plan.techniques = [tech]
        tech.validate(plan)
    except TfxError as err:
        assert "\n" not in str(err)
        return str(err)
    return ""


@pytest.mark.parametrize("schedule, stages_per_rank", [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2),
                                                       ("interleaved_1f1b", 3)])
def test_pp_microbatches_refused_where_torch_would_refuse(schedule, stages_per_rank):
    for world in (2, 3, 4):
        for n in range(1, 13):
            plan = pp_plan(world, batch_size=n * 5, n_layer=world * stages_per_rank)
            err = pp_error(plan, schedule=schedule, n_microbatches=n, stages_per_rank=stages_per_rank)
            assert (err == "") == torch_accepts(schedule, world, stages_per_rank, n), (world, n, err)
            assert err == "" or err.startswith(f"parallel.n_microbatches={n} "), err


def test_pp_bad_values_fail_in_one_line():
    for n in (0, -1, 2.5, "abc", True, None):
        assert pp_error(pp_plan(2), n_microbatches=n).startswith(
            f"parallel.n_microbatches={n!r} must be an integer >= 1"), n
    for n in (0, -2, 1.5, "x"):
        assert pp_error(pp_plan(2), schedule="interleaved_1f1b", stages_per_rank=n).startswith(
            f"parallel.stages_per_rank={n!r} must be an integer >= 1"), n
    # the micro-batches split the batch: 8 sequences into 4 (ok) or 3 (refused)
    assert pp_error(pp_plan(2, batch_size=8), n_microbatches=4) == ""
    assert pp_error(pp_plan(2, batch_size=8), n_microbatches=3) == (
        "parallel.n_microbatches=3 must divide trainer.batch_size=8 (each micro-step's batch is split "
        "into n_microbatches); choose a divisor of 8 or change trainer.batch_size")
    # more stages than layers: 2 ranks x 2 stages need 4 layers
    assert pp_error(pp_plan(2, n_layer=3), schedule="interleaved_1f1b", n_microbatches=4).startswith(
        "4 pipeline stages (2 ranks x stages_per_rank=2) need model.n_layer >= 4, got 3")
    assert pp_error(pp_plan(2, n_layer=4), schedule="interleaved_1f1b", n_microbatches=4) == ""


#: options added since the first fuzz run, each fuzzed on its own keys only
FOCUS = {"compression": ["[wanda]", "[sparsegpt]", "[gptq]"], "optim": ["muon"], "parallel": ["pp"]}


#: the values a numeric field must refuse (but for ACCEPTS/ACCEPTS_INF), as Hydra parses them,
#: and two of another type that must fail in one line or be taken as text
SWEEP = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "-1": -1, "-1e300": -1e300,
         "abc": "abc", "[]": []}


def test_each_key_of_the_new_options_alone(hydra_ctx):
    """Every key of the options in FOCUS, alone, set to each SWEEP value: generated cases
    mostly change 2-3 keys, and the first bad one hides the others."""
    failures = []
    for group, options in FOCUS.items():
        for option in options:
            base = compose_tiny([f"{group}={option}"])
            for key in fields(group, option):
                for text, value in SWEEP.items():
                    cfg = copy.deepcopy(base)
                    OmegaConf.update(cfg, key, value, merge=False)
                    try:
                        check({group: option}, {key: text}, cfg=cfg)
                    except AssertionError as err:
                        failures.append(str(err).splitlines()[0])
    assert not failures, "\n".join(failures)


@st.composite
def focused_cases(draw):
    group = draw(st.sampled_from(sorted(FOCUS)))
    picks = {group: draw(st.sampled_from(FOCUS[group]))}
    keys = sorted(fields(group, picks[group]))
    chosen = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=2, unique=True))
    return picks, {k: draw(st.sampled_from(VALUES)) for k in chosen}


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=focused_cases())
def test_new_option_keys_fail_in_one_line_or_succeed(hydra_ctx, case):
    check(*case)
