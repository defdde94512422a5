"""Distillation with Hugging Face models: an HF teacher (a model folder, as a hub id or
the SmolLM2 preset would resolve), an HF student, the loss against a hand computation,
the tokenizer rule (same token ids, compared by content), and the warm-up schedule in
steps or fractions of the run.

Tiny random Llamas in SmolLM2's shape and the tiny tokenizer of tests/hf_utils.py; the
Hinton loss itself is checked against its formula in tests/test_compression.py."""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_utils import hf_cfg, save_tiny_llama, tiny_llama_config, tiny_tokenizer  # noqa: E402
from conftest import one_line  # noqa: E402
from tfx.compression.distill import Distillation, kd_vocab  # noqa: E402
from tfx.config import model_spec, use_model_tokenizer  # noqa: E402
from tfx.core import ConfigError, Plan  # noqa: E402
from tfx.data import BlockLoader, prepare_data  # noqa: E402
from tfx.model import CausalLM, HFModel  # noqa: E402
from tfx.train.build import build  # noqa: E402

KD = ["compression=[distill]", "compression.distill.alpha=0.3", "compression.distill.temperature=2.5"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Student and teacher: different random weights, the same tokenizer; and a teacher
    whose tokenizer differs (other merges, so other ids for the same text)."""
    root = tmp_path_factory.mktemp("distill_hf")
    student, teacher = save_tiny_llama(root / "student", seed=0), save_tiny_llama(root / "teacher", seed=1)
    other = root / "other"
    torch.manual_seed(2)
    transformers.LlamaForCausalLM(tiny_llama_config()).save_pretrained(other)
    tiny_tokenizer(vocab_size=280, text="completely different merges for another vocabulary").save_pretrained(other)
    return {"student": student, "teacher": teacher, "other": other}


@pytest.fixture(scope="module")
def hf_data(dirs, _isolated_env):
    cfg = hf_cfg(dirs["student"])
    use_model_tokenizer(cfg, model_spec(cfg))
    return prepare_data(cfg.data)


def kd_cfg(dirs, *extra):
    return hf_cfg(dirs["student"], *KD, f"compression.distill.teacher={dirs['teacher']}", *extra)


def reference_loss(job, teacher_lm, batch, alpha, temperature, weight) -> float:
    """``(1 - w a) CE + w a T^2 KL(p_t^T || p_s^T)``, token sums / tokens, written out
    with exp/log (no log_softmax, no kl_div) from the student's current weights."""
    idx, y = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        s = job.model(idx).double()
        t = teacher_lm(input_ids=idx).logits.double()
    n = y.numel()
    log_q = s - torch.log(torch.exp(s).sum(-1, keepdim=True))
    ce = -log_q.gather(-1, y[..., None]).sum() / n
    p_t = torch.exp(t / temperature) / torch.exp(t / temperature).sum(-1, keepdim=True)
    log_p_s = s / temperature - torch.log(torch.exp(s / temperature).sum(-1, keepdim=True))
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum() / n
    a = weight * alpha
    return float((1 - a) * ce + a * temperature ** 2 * kl)


def test_hf_student_learns_from_hf_teacher(dirs, hf_data, tmp_path):
    from tfx.ckpt import load_run
    from tfx.train.run import train

    teacher_before = transformers.AutoModelForCausalLM.from_pretrained(dirs["teacher"]).state_dict()
    cfg = kd_cfg(dirs, "compression.distill.hidden_weight=0.5", "trainer.max_steps=8")
    job = build(cfg, tmp_path / "a", data=hf_data)
    tech = job.pipeline.techniques[-1]
    assert isinstance(job.model, CausalLM) and isinstance(tech.teacher, CausalLM)
    assert tech.teacher.training is False and not any(p.requires_grad for p in tech.teacher.parameters())
    assert not any(p is q for q in tech.teacher.parameters() for g in job.trainer.optimizer.param_groups
                   for p in g["params"])
    assert any(p is job.model.distill_proj.weight for g in job.trainer.optimizer.param_groups
               for p in g["params"])
    losses = [job.trainer.train_step()["loss"] for _ in range(8)]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    for k, v in tech.teacher.lm.state_dict().items():  # frozen: not a single weight moved
        assert torch.equal(v, teacher_before[k]), k

    summary = train(cfg, tmp_path / "b", data=hf_data)  # the whole run: eval, export, reload
    assert summary["distill/weight"] == 1.0 and summary["distill/kd"] > 0
    assert "hf_model" in summary  # save_pretrained of the student alone (no distill_proj)
    model, _ = load_run(tmp_path / "b")  # rebuilds distill_proj from the checkpoint, no teacher
    assert model.distill_proj.weight.shape == (48, 48)


def test_loss_is_the_hand_computed_kd_mix(dirs, hf_data, tmp_path):
    cfg = kd_cfg(dirs)
    job = build(cfg, tmp_path, data=hf_data)
    teacher_lm = transformers.AutoModelForCausalLM.from_pretrained(dirs["teacher"])  # loaded apart
    batches = BlockLoader(hf_data.train, cfg.trainer.batch_size, seed=cfg.seed)  # the trainer's order
    for _ in range(2):
        want = reference_loss(job, teacher_lm, next(batches), 0.3, 2.5, weight=1.0)
        assert job.trainer.train_step()["loss"] == pytest.approx(want, rel=1e-5)


def test_fraction_warmup_equals_absolute_warmup(dirs, hf_data, tmp_path):
    base = ["trainer.max_steps=8"]
    steps = build(kd_cfg(dirs, *base, "compression.distill.warmup=4"), tmp_path / "a", data=hf_data)
    frac = build(kd_cfg(dirs, *base, "compression.distill.warmup=0.5"), tmp_path / "b", data=hf_data)
    teacher_lm = transformers.AutoModelForCausalLM.from_pretrained(dirs["teacher"])
    batches = BlockLoader(hf_data.train, 4, seed=frac.cfg.seed)
    for step in range(6):
        want = reference_loss(frac, teacher_lm, next(batches), 0.3, 2.5, weight=min(1.0, step / 4))
        a, b = steps.trainer.train_step()["loss"], frac.trainer.train_step()["loss"]
        assert a == b and b == pytest.approx(want, rel=1e-5), step
    assert frac.pipeline.metrics()["distill/weight"] == 1.0


@pytest.mark.parametrize("warmup,match", [
    ("20", r"compression.distill.warmup resolves to step 20, past trainer.max_steps=8"),
    ("1.5", r"compression.distill.warmup=1.5 as a fraction of trainer.max_steps must lie in \[0, 1\]"),
])
def test_warmup_past_the_run_is_refused(dirs, tmp_path, warmup, match):
    with pytest.raises(ConfigError, match=match) as err:
        build(kd_cfg(dirs, "trainer.max_steps=8", f"compression.distill.warmup={warmup}"), tmp_path)
    one_line(err)


def test_hf_student_with_other_tokenizer_is_refused_before_data(dirs, tmp_path):
    cache = tmp_path / "cache"
    cfg = hf_cfg(dirs["student"], "compression=[distill]", f"compression.distill.teacher={dirs['other']}",
                 f"data.cache_dir={cache}")
    with pytest.raises(ConfigError) as err:
        build(cfg, tmp_path / "run")
    assert not cache.exists()  # refused in validate, before the data was read
    msg = one_line(err)
    assert "tokenizer" in msg and "model=smollm2_student" in msg and str(dirs["student"]) in msg


def test_gpt_student_tokenizer_rule_names_the_fix(dirs, pydocs_data, tmp_path):
    """An own-GPT student on BPE data is refused with the overrides to set; setting
    exactly those makes the same run build and train (the teacher's vocabulary has
    320 rows for a 300-token tokenizer: KD compares the 300 the data can hold)."""
    from conftest import tiny

    teacher = f"compression.distill.teacher={dirs['teacher']}"
    with pytest.raises(ConfigError) as err:
        build(tiny("compression=[distill]", teacher), tmp_path / "a", data=pydocs_data)
    msg = one_line(err)
    fix = f"data.tokenizer.kind=pretrained data.tokenizer.name={dirs['teacher']}"
    assert msg.endswith(f"set {fix}"), msg
    job = build(tiny("compression=[distill]", teacher, *fix.split()), tmp_path / "b")
    assert job.pipeline.techniques[-1].kd_vocab == job.data.vocab_size == 300
    assert math.isfinite(job.trainer.train_step()["loss"])


def test_tfx_run_teacher_with_the_same_tokenizer(dirs, hf_data, tmp_path):
    """A tfx run trained on the tokenizer (here: an HF model's own) teaches an HF student
    whose data is another cache of the same tokenizer (other max_docs): content, not the
    cache's name, decides."""
    from tfx.train.run import train

    train(hf_cfg(dirs["teacher"], "trainer.max_steps=2"), tmp_path / "teacher", data=hf_data)
    cfg = hf_cfg(dirs["student"], "compression=[distill]", f"compression.distill.teacher={tmp_path / 'teacher'}",
                 "data.max_docs=40")  # another data cache, same tokenizer
    job = build(cfg, tmp_path / "student")
    assert job.data.cache_path != hf_data.cache_path
    assert math.isfinite(job.trainer.train_step()["loss"])
    bad = hf_cfg(dirs["other"], "compression=[distill]", f"compression.distill.teacher={tmp_path / 'teacher'}",
                 "data.max_docs=40")
    with pytest.raises(ConfigError, match="tokenizer") as err:
        build(bad, tmp_path / "bad")
    one_line(err)


def test_student_spec_overrides_the_config(dirs):
    spec = HFModel(str(dirs["teacher"]), pretrained=False, config_overrides={"num_hidden_layers": 1})
    model = spec.build(vocab_size=300, block_size=32)
    assert len(model.lm.model.layers) == 1 and spec.family == "hf_llama"
    assert spec.tokenizer_config() == {"kind": "pretrained", "name": str(dirs["teacher"])}
    with pytest.raises(ConfigError, match="config_overrides.n_layers is not a field"):
        HFModel(str(dirs["teacher"]), config_overrides={"n_layers": 1})


def test_pretrained_with_fewer_layers_keeps_the_first_ones(dirs):
    """pretrained=true + num_hidden_layers: transformers loads the layers that still fit."""
    full = HFModel(str(dirs["teacher"])).build(vocab_size=300, block_size=32)
    short = HFModel(str(dirs["teacher"]), config_overrides={"num_hidden_layers": 1}).build(300, 32)
    assert len(short.lm.model.layers) == 1
    for (name, a), (_, b) in zip(full.lm.model.layers[0].state_dict().items(),
                                 short.lm.model.layers[0].state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(full.lm.model.embed_tokens.weight, short.lm.model.embed_tokens.weight)


def test_pipeline_parallel_is_refused():
    from tfx.core import Stage, Technique

    class OwnsForward(Technique):  # what pipeline parallel declares
        stage, name, owns_forward = Stage.PIPELINE, "pp", True

    with pytest.raises(ConfigError, match="pp runs the forward itself.*parallel=ddp or fsdp") as err:
        Distillation(teacher="outputs/big").validate(Plan([OwnsForward()], max_steps=8))
    one_line(err)


def test_missing_teacher_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="compression.distill.teacher=.*does not exist.*tfx teacher") as err:
        Distillation(teacher=str(tmp_path / "no-such-run")).validate(Plan([], max_steps=8))
    one_line(err)


def test_kd_vocab_widths():
    assert kd_vocab(320, 320) == 320 and kd_vocab(320, 300, data_vocab=300) == 300
    with pytest.raises(ConfigError, match="vocab_size=320"):
        kd_vocab(320, 300)  # the data's vocabulary unknown: refuse
    with pytest.raises(ConfigError, match="vocab_size=320"):
        kd_vocab(320, 290, data_vocab=300)  # the student cannot predict every data token



def test_tensor_parallel_is_refused():
    from tfx.parallel import TensorParallel

    with pytest.raises(ConfigError, match="tensor parallel shards the logits") as err:
        Distillation(teacher="outputs/big").validate(Plan([TensorParallel()], world_size=2, max_steps=8))
    one_line(err)
