"""The build order: state is loaded once, facts are declared, and a new technique
needs nothing but its own module, its YAML and its test."""
from __future__ import annotations

import collections
import textwrap

import pytest
import torch

from conftest import compose, tiny, TINY
from tfx.ckpt import RNGState
from tfx.core import ConfigError, Plan, Stage, Technique
from tfx.data import BlockLoader
from tfx.precision import Precision
from tfx.train.run import build
from tfx.train.trainer import LoopState


class Probe(Technique):
    """Counts its hooks; its state must come back exactly once, after apply_to_model."""

    stage = Stage.SURGERY
    name = "probe"

    def __init__(self):
        self.calls = collections.Counter()
        self.steps_seen = 0

    def apply_to_model(self, model, ctx):
        self.calls["apply"] += 1
        self.resuming = ctx.resuming
        return model

    def after_optimizer_step(self, model, info, ctx):
        self.steps_seen += 1

    def state_dict(self):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state):
        assert self.calls["apply"] == 1, "state loaded before the technique was applied"
        self.calls["load"] += 1
        self.steps_seen = state["steps_seen"]


def test_resume_loads_every_stateful_part_exactly_once(tmp_path, pydocs_data, monkeypatch):
    first = build(tiny("trainer.max_steps=6"), tmp_path, data=pydocs_data, extra_techniques=[Probe()])
    first.trainer.callbacks.append(lambda t: t.state.step == 3 and t.request_stop("test"))
    first.trainer.fit()

    calls = collections.Counter()

    def spy(cls, name="load_state_dict"):
        original = getattr(cls, name)

        def wrapped(self, *args, **kwargs):
            calls[cls.__name__] += 1
            return original(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, wrapped)

    for cls in (torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR,
                BlockLoader, RNGState, LoopState, Precision):
        spy(cls)
    probe = Probe()
    second = build(tiny("trainer.max_steps=6"), tmp_path, data=pydocs_data, extra_techniques=[probe])
    assert second.resumed_from is not None and second.trainer.state.step == 3
    assert probe.resuming and probe.calls == {"apply": 1, "load": 1} and probe.steps_seen == 3
    assert calls == {"Module": 1, "Optimizer": 1, "LambdaLR": 1, "BlockLoader": 1, "RNGState": 1,
                     "LoopState": 1, "Precision": 1}, calls


def test_facts_are_declared_not_searched():
    class Half(Technique):
        compute_dtype = torch.float16

    facts = Plan([Precision("bf16")]).facts()
    assert facts.compute_dtype == torch.bfloat16 and not facts.skips_nonfinite
    assert Plan([Precision("fp16")]).facts().skips_nonfinite
    with pytest.raises(ConfigError, match="disagree on compute_dtype"):
        Plan([Precision("bf16"), Half()]).facts()


PLUGIN = '''
from tfx.core import Stage, Technique

CALLS = []


class NoOp(Technique):
    """A technique that only records which hooks ran."""

    stage = Stage.MEMORY
    name = "noop"

    def __init__(self, note: str = "hi") -> None:
        self.note = note

    def apply_to_model(self, model, ctx):
        CALLS.append("apply")
        return model

    def after_optimizer_step(self, model, info, ctx):
        CALLS.append("step")

    def metrics(self):
        return {"noop/steps": float(CALLS.count("step"))}
'''


def test_new_technique_is_one_module_one_yaml(tmp_path, pydocs_data, monkeypatch):
    """A technique module and its YAML, added outside the repository's files, compose,
    validate, train and report without any edit elsewhere."""
    (tmp_path / "tfx_noop_plugin.py").write_text(textwrap.dedent(PLUGIN))
    conf = tmp_path / "conf" / "memory"
    conf.mkdir(parents=True)
    (conf / "noop.yaml").write_text("_target_: tfx_noop_plugin.NoOp\nnote: from yaml\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose(TINY + ["trainer.max_steps=3", "memory=noop",
                          f"hydra.searchpath=[file://{tmp_path / 'conf'}]"])
    job = build(cfg, tmp_path / "run", data=pydocs_data)
    job.trainer.fit()
    import tfx_noop_plugin

    assert tfx_noop_plugin.CALLS == ["apply", "step", "step", "step"]
    assert "memory:noop" in job.pipeline.order()
    assert job.pipeline.metrics()["noop/steps"] == 3.0
    with pytest.raises(ConfigError, match=r"unknown key 'nte'.*note"):
        build(compose(TINY + ["memory=noop", "+memory.nte=1", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]),
              tmp_path / "run2", data=pydocs_data)
