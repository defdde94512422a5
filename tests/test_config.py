"""Every config file composes and instantiates; bad configs fail early and clearly."""
from __future__ import annotations

import re

import pytest
from hydra.errors import ConfigCompositionException

from conftest import CONF, compose
from tfx.config import build_techniques, check_choices
from tfx.core import ConfigError, Pipeline, Technique

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment"))


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_instantiates(group, option):
    value = f"[{option}]" if group == "compression" and option != "none" else option
    cfg = compose([f"{group}={value}"])
    check_choices(cfg)
    techniques = build_techniques(cfg)
    assert all(isinstance(t, Technique) for t in techniques)
    Pipeline(techniques)  # no duplicates, sortable by stage


def test_default_config_values():
    cfg = compose()
    assert cfg.trainer.max_steps > 0 and cfg.resume == "auto" and cfg.data.source == "shakespeare"
    assert [t.describe() for t in build_techniques(cfg)] == ["precision:fp32"]


def test_misspelled_key_names_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["trainer.max_stepz=5"])
    text = f"{err.value} {err.value.__cause__}"
    assert "max_stepz" in text and "not in 'TrainerConfig'" in text


def test_wrong_type_fails_at_compose():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["trainer.max_steps=lots"])
    text = f"{err.value} {err.value.__cause__}"
    assert "max_steps" in text and "lots" in text


def test_unknown_option_lists_choices():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["precision=bf17"])
    text = str(err.value)
    assert "bf17" in text and "bf16" in text and "fp32" in text


def test_unknown_technique_key_names_valid_keys():
    cfg = compose(["precision=fp16", "+precision.scale_init=3"])
    with pytest.raises(ConfigError, match=r"precision: unknown key 'scale_init'.*init_scale"):
        build_techniques(cfg)


def test_wrong_technique_value_type():
    cfg = compose(["memory=activation_ckpt", "memory.every=often"])
    with pytest.raises(ConfigError, match=r"memory.every='often': expected int"):
        build_techniques(cfg)


@pytest.mark.parametrize("override,match", [
    ("logger.mode=sometimes", r"logger.mode"),
])
def test_invalid_choice_values(override, match):
    with pytest.raises(ConfigError, match=match):
        check_choices(compose([override]))


@pytest.mark.parametrize("override,match", [
    ("scheduler.decay=step", r"scheduler.decay='step'; choose one of \['cosine', 'linear', 'constant'\]"),
    ("optim.lr=-1", r"optim.lr=-1 must be > 0"),
    ("optim.adamw_betas=[0.9]", r"optim.adamw_betas=\[0.9\] must be two numbers"),
    ("optim.lr=fast", r"optim.lr='fast': expected float"),
    ("model.n_layer=0", r"n_layer=0 must be >= 1"),
    ("trainer.batch_size=0", r"trainer.batch_size=0 must be > 0"),
])
def test_bad_values_fail_before_any_work(override, match):
    from tfx.config import build_loop, build_model, optimizer_factory, scheduler_factory

    with pytest.raises(Exception) as err:
        cfg = compose([override])
        build_loop(cfg), optimizer_factory(cfg), scheduler_factory(cfg), build_model(cfg, 64, 32)
    assert isinstance(err.value, (ConfigError, ConfigCompositionException)), err.value

    assert re.search(match, f"{err.value} {err.value.__cause__}"), str(err.value)


def test_unknown_optimizer_option_lists_choices():
    with pytest.raises(ConfigCompositionException, match="adamw"):
        compose(["optim=adam"])


def test_bad_precision_value():
    cfg = compose(["precision.dtype=fp8"])
    with pytest.raises(ConfigError, match=r"precision.dtype='fp8'; choose one of"):
        build_techniques(cfg)
