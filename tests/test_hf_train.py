"""Hugging Face causal LMs as tfx models (``model=hf``): the spec, the wrapper the loop
calls, the model's tokenizer driving the data, training techniques against their
references (exact ones exactly), export with ``save_pretrained``, refusals, and the
real SmolLM2 (one fine-tune step, its perplexity vs a random copy).

Fast tests use a tiny random Llama in SmolLM2's shape (tests/hf_utils.py). The real
model is built once into the user's model cache, as in tests/test_hf_models.py."""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from conftest import GradRecorder, one_line, run_cli  # noqa: E402
from hf_utils import HF_TINY, USER_CACHE, compose, hf_cfg, save_tiny_gpt2  # noqa: E402
from tfx.config import model_spec, use_model_tokenizer  # noqa: E402
from tfx.core import ConfigError, Plan  # noqa: E402
from tfx.data import to_data_config  # noqa: E402
from tfx.data.pack import cache_path  # noqa: E402
from tfx.model import CausalLM, HFModel, export_hf  # noqa: E402
from tfx.model.anatomy import anatomy_of  # noqa: E402
from tfx.model.hf import ensure_smollm2, load_tokenizer  # noqa: E402
from tfx.train.build import build, config_dict  # noqa: E402
from tfx.train.run import train  # noqa: E402

# read at import (collection), before conftest points TFX_CACHE_DIR at a temp dir
def first_grads(cfg, run_dir, data):
    rec = GradRecorder()
    job = build(cfg, run_dir, data=data, extra_techniques=[rec])
    job.trainer.train_step()
    return rec.grads[0]


def losses(cfg, run_dir, data, steps):
    job = build(cfg, run_dir, data=data)
    return [job.trainer.train_step()["loss"] for _ in range(steps)]


# --- the spec and the wrapper ---------------------------------------------------------

def test_spec_reads_the_config_only(llama_dir):
    spec = HFModel(str(llama_dir))
    assert spec.family == "hf_llama" and spec.vocab_size == 320 and spec.max_positions == 128
    assert spec.tokenizer_config() == {"kind": "pretrained", "name": str(llama_dir)}
    assert "tiny-llama" in repr(spec)


def test_wrapper_is_called_like_the_gpt(llama_dir):
    model = HFModel(str(llama_dir)).build(vocab_size=300, block_size=32)
    assert isinstance(model, CausalLM)
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        logits = model(idx)
        ref = model.lm(input_ids=idx).logits
        logits2, hidden = model(idx, return_hidden=True)
    assert torch.equal(logits, ref) and torch.equal(logits2, ref)
    assert hidden.shape == (2, 16, 48)
    torch.testing.assert_close(model.lm.lm_head(hidden), logits, rtol=1e-5, atol=1e-5)
    # the anatomy looks through the wrapper; state-dict keys are the HF model's under "lm."
    anat = anatomy_of(model)
    assert anat.family == "hf_llama" and anat.decoder_layers(model) == list(model.lm.model.layers)
    assert set(model.state_dict()) == {f"lm.{k}" for k in model.lm.state_dict()}


def test_flops_per_token_counts_like_the_gpt(llama_dir):
    """docs/metrics.md: 6 x matmul weights + causal attention (T (T + 1) / 2 pairs)."""
    model = HFModel(str(llama_dir)).build(vocab_size=300, block_size=32)
    d, kv, f = 48, 16, 128  # hidden, KV width (2 heads x 8), MLP
    weights = 2 * (2 * d * d + 2 * d * kv + 3 * d * f) + d * 320  # 2 layers + tied head
    assert model.flops_per_token(32) == 6.0 * weights + 2 * 12.0 * (6 * 8) * 33 / 2


def test_vocab_and_context_are_checked(llama_dir):
    spec = HFModel(str(llama_dir))
    with pytest.raises(ConfigError) as err:
        spec.build(vocab_size=500, block_size=32)
    assert "500" in one_line(err) and "320" in str(err.value)
    with pytest.raises(ConfigError) as err:
        spec.build(vocab_size=300, block_size=256)
    assert "data.seq_len=256" in one_line(err)


@pytest.mark.parametrize("kwargs, needle", [
    ({}, "model.name_or_path"),
    ({"dtype": "float8"}, "float8"),
    ({"attn_implementation": "magic"}, "magic"),
])
def test_bad_spec_values_are_one_line(llama_dir, kwargs, needle):
    args = {"name_or_path": str(llama_dir), **kwargs} if kwargs else {}
    with pytest.raises(ConfigError) as err:
        HFModel(**args)
    assert needle in one_line(err)


def test_pretrained_false_is_random_and_seeded(llama_dir, hf_data, tmp_path):
    a = build(hf_cfg(llama_dir, "model.pretrained=false"), tmp_path / "a", data=hf_data).model
    b = build(hf_cfg(llama_dir, "model.pretrained=false"), tmp_path / "b", data=hf_data).model
    c = build(hf_cfg(llama_dir), tmp_path / "c", data=hf_data).model
    saved = HFModel(str(llama_dir)).build(300, 32)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k  # same seed, same initial weights
        assert torch.equal(c.state_dict()[k], saved.state_dict()[k]), k  # pretrained: the saved ones
    q = "lm.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a.state_dict()[q], c.state_dict()[q])


# --- the model's tokenizer drives the data ----------------------------------------------

def test_data_uses_the_models_tokenizer_keyed_by_content(llama_dir, hf_data, tmp_path):
    cfg = hf_cfg(llama_dir)  # data=pydocs asks for BPE 4096; the model's tokenizer wins
    job = build(cfg, tmp_path / "run", data=None)
    assert cfg.data.tokenizer.kind == "pretrained" and cfg.data.tokenizer.name == str(llama_dir)
    assert job.data.cache_path == hf_data.cache_path and job.data.vocab_size == 300
    text = "def main(): return None"
    assert job.data.tokenizer.encode(text) == load_tokenizer(str(llama_dir)).encode(
        text, add_special_tokens=False)
    # the same tokenizer under another path shares the cache; another tokenizer does not
    copy = tmp_path / "copy"
    shutil.copytree(llama_dir, copy)
    cfg2 = hf_cfg(copy)
    use_model_tokenizer(cfg2, model_spec(cfg2))
    assert cache_path(to_data_config(cfg2.data)) == hf_data.cache_path
    from hf_utils import tiny_tokenizer
    tiny_tokenizer(vocab_size=290).save_pretrained(copy)
    assert cache_path(to_data_config(cfg2.data)) != hf_data.cache_path
    # checkpoints record the resolved config: the tokenizer the model was trained with
    assert config_dict(job.cfg)["data"]["tokenizer"]["name"] == str(llama_dir)


# --- techniques against their references -----------------------------------------------

@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_precision_trains(precision, llama_dir, hf_data, tmp_path):
    out = losses(hf_cfg(llama_dir, f"precision={precision}"), tmp_path, hf_data, steps=3)
    assert all(math.isfinite(x) for x in out) and out[-1] < out[0]


def test_accumulation_equals_large_batch(llama_dir, hf_data, tmp_path):
    big = first_grads(hf_cfg(llama_dir, "trainer.batch_size=8"), tmp_path / "a", hf_data)
    acc = first_grads(hf_cfg(llama_dir, "trainer.batch_size=2", "trainer.accum_steps=4"),
                      tmp_path / "b", hf_data)
    assert big.keys() == acc.keys() and len(big) == len(list(HFModel(str(llama_dir)).build(300, 32)
                                                              .parameters()))
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("memory", ["activation_ckpt", "selective_ckpt"])
def test_activation_checkpointing_same_gradients(memory, llama_dir, hf_data, tmp_path):
    ref = first_grads(hf_cfg(llama_dir), tmp_path / "ref", hf_data)
    rec = GradRecorder()
    job = build(hf_cfg(llama_dir, f"memory={memory}"), tmp_path / "ac", data=hf_data,
                extra_techniques=[rec])
    wrapped = [type(layer).__name__ for layer in anatomy_of(job.model).decoder_layers(job.model)]
    assert wrapped == ["CheckpointWrapper"] * 2
    job.trainer.train_step()
    assert ref.keys() == rec.grads[0].keys()
    for name in ref:
        torch.testing.assert_close(rec.grads[0][name], ref[name], rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.slow
def test_compile_matches_eager(llama_dir, hf_data, tmp_path):
    pytest.importorskip("torch._inductor")
    eager = losses(hf_cfg(llama_dir), tmp_path / "eager", hf_data, steps=2)
    job = build(hf_cfg(llama_dir, "compile=true"), tmp_path / "compiled", data=hf_data)
    layers = anatomy_of(job.model).decoder_layers(job.model)
    assert all(layer._compiled_call_impl is not None for layer in layers)
    compiled = [job.trainer.train_step()["loss"] for _ in range(2)]
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_pipeline_parallel_refuses_in_validate(llama_dir):
    """(Tensor parallel works on hf_llama: tests/test_hf_tp.py.)"""
    from tfx.model import GPTConfig
    from tfx.parallel import PipelineParallel

    spec = HFModel(str(llama_dir))
    for tech, needle in ((PipelineParallel(), "parallel=pp"),):
        with pytest.raises(ConfigError) as err:
            tech.validate(Plan([tech], world_size=2, model=spec))
        msg = one_line(err)
        assert needle in msg and "hf_llama" in msg and "parallel=fsdp" in msg
        tech.validate(Plan([tech], world_size=2, model=GPTConfig()))  # tfx's GPT: fine


def test_resume_equals_uninterrupted(llama_dir, hf_data, tmp_path):
    from parallel_utils import assert_same_training, interrupt_after

    full = tmp_path / "full"
    train(hf_cfg(llama_dir, "trainer.ckpt_every=2", "trainer.keep_last=0"), full, data=hf_data)
    resumed = interrupt_after(full, tmp_path / "resumed", 2)  # as if killed after step 2
    train(hf_cfg(llama_dir, "trainer.ckpt_every=2", "trainer.keep_last=0", "resume=auto"), resumed,
          data=hf_data)
    assert_same_training(resumed, full, steps={3, 4}, atol=0, rtol=0, weight_atol=0)


# --- export ---------------------------------------------------------------------------

def test_export_reloads_with_identical_logits(llama_dir, hf_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tfx.ckpt import load_run

    # activation checkpointing wraps the layers: the exported keys must still be plain
    summary = train(hf_cfg(llama_dir, "trainer.max_steps=2", "memory=selective_ckpt"), tmp_path,
                    data=hf_data)
    out = Path(summary["hf_model"])
    assert out == tmp_path / "hf_model" and (out / "model.safetensors").is_file()
    assert summary["tflops"] > 0
    trained, _ = load_run(tmp_path)  # the final checkpoint: the weights export saw
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained(ids))
    assert not torch.equal(trained.lm.lm_head.weight, HFModel(str(llama_dir)).build(300, 32).lm.lm_head.weight)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # still tied
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.encode("import os", add_special_tokens=False) == hf_data.tokenizer.encode("import os")


def test_gpt2_architecture_trains_checkpointed_and_exports(hf_data, tmp_path):
    """HF GPT-2 (fused qkv Conv1D, learned positions, biases): activation checkpointing
    leaves the gradients alone, training runs, the export reloads identically."""
    from transformers import AutoModelForCausalLM

    from tfx.ckpt import load_run

    folder = save_tiny_gpt2(tmp_path / "tiny-gpt2")
    assert HFModel(str(folder)).family == "hf_gpt2"
    ref = first_grads(hf_cfg(folder), tmp_path / "ref", hf_data)  # same tokenizer: same data
    ckpt = first_grads(hf_cfg(folder, "memory=activation_ckpt"), tmp_path / "ac", hf_data)
    assert ref.keys() == ckpt.keys() and any("c_attn" in k for k in ref)
    for name in ref:
        torch.testing.assert_close(ckpt[name], ref[name], rtol=1e-6, atol=1e-8, msg=name)
    summary = train(hf_cfg(folder, "trainer.max_steps=2", "memory=activation_ckpt"), tmp_path / "run",
                    data=hf_data)
    trained, _ = load_run(tmp_path / "run")
    reloaded = AutoModelForCausalLM.from_pretrained(summary["hf_model"]).eval()
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained(ids))


def test_changed_architecture_is_not_exported(llama_dir, tmp_path):
    model = HFModel(str(llama_dir)).build(300, 32)
    model.lm.model.layers[0].mlp.up_proj = nn.Linear(48, 64, bias=False)  # what pruning would do
    out = export_hf(model, tmp_path)
    assert "hf_model" not in out and "up_proj" in out["hf_model_skipped"]
    assert not (tmp_path / "hf_model").exists()
    assert export_hf(nn.Linear(2, 2), tmp_path) == {}  # not an HF model: nothing to say


# --- data parallel: 2 gloo ranks == one process ---------------------------------------------

# SGD: AdamW divides by sqrt(v), so a rarely seen token's embedding row (gradient ~0)
# turns float32 round-off of the gradient reduction order into a visible update
# difference (seen: 2e-4 on one of 15,360 entries after 3 steps); SGD keeps the
# comparison at round-off, so weights can be held to a tight tolerance.
_DP = ("trainer.max_steps=3", "resume=never", "optim=sgd", "optim.lr=0.1")


@pytest.fixture(scope="module")
def hf_reference(llama_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hf_single")
    train(hf_cfg(llama_dir, *_DP, run_dir=run_dir), run_dir)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_data_parallel_matches_single(mode, llama_dir, hf_reference, tmp_path):
    from parallel_utils import assert_same_training

    from tfx.launch import launch

    cfg = hf_cfg(llama_dir, *_DP, f"parallel={mode}", "trainer.batch_size=2", run_dir=tmp_path)
    summary = launch(cfg, tmp_path, nproc=2)
    assert summary["dp_size"] == 2
    assert_same_training(tmp_path, hf_reference, atol=1e-6, rtol=1e-5)
    if mode == "fsdp":  # sharded parameters: the tfx checkpoint holds them, no hf_model/
        assert "sharded" in summary["hf_model_skipped"] and not (tmp_path / "hf_model").exists()
    else:
        assert Path(summary["hf_model"]).is_dir()


# --- the command line: evaluate.py model=..., one-line errors, nothing written -----------

def test_evaluate_pretrained_model_without_a_run(llama_dir, hf_data, tmp_path):
    out = tmp_path / "eval"
    res = run_cli(["evaluate.py", "model=hf", f"model.name_or_path={llama_dir}", "data=pydocs",
                   "data.seq_len=32", "max_batches=2", "speed_batches=1", "batch_size=4",
                   f"hydra.run.dir={out}"])
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    assert result["model"] == str(llama_dir) and result["pretrained"] is True
    for key in ("val_loss", "val_ppl", "test_ppl", "inference_tokens_per_sec", "params",
                "size_on_disk_bytes"):
        assert key in result, key
    assert 100 < result["val_ppl"] < 1000  # a random 300-token model: about uniform


def test_evaluate_needs_a_run_or_a_model(tmp_path):
    res = run_cli(["evaluate.py", f"hydra.run.dir={tmp_path / 'a'}"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: nothing to evaluate")
    from tfx.eval_run import evaluate_pretrained

    with pytest.raises(ConfigError) as err:  # tfx's GPT has no weights of its own
        evaluate_pretrained(compose(["model=tiny"], config_name="evaluate"), tmp_path / "b")
    assert "no pretrained weights" in one_line(err) and not (tmp_path / "b").exists()


@pytest.mark.slow  # two train.py subprocesses: ~30 s on 2 shared cores
def test_bad_model_input_exits_2_with_one_line_and_writes_nothing(tmp_path):
    for i, (args, env, expected) in enumerate([
        (["model=hf", "model.name_or_path=/no/such/model"], {},
         "error: model folder '/no/such/model' does not exist"),
        (["model=gpt2_hf"], {"HF_HUB_OFFLINE": "1"},
         "error: could not load hub model 'openai-community/gpt2': no network"),
    ]):
        run_dir, cache = tmp_path / f"run{i}", tmp_path / f"cache{i}"
        res = run_cli(["train.py", *HF_TINY, *args, f"hydra.run.dir={run_dir}"],
                      env={"TFX_CACHE_DIR": str(cache), **env})
        assert res.returncode == 2, (args, res.stderr[-2000:])
        assert res.stderr.strip().splitlines()[-1].startswith(expected), res.stderr[-2000:]
        assert "Traceback" not in res.stderr
        assert not cache.exists()  # no data cache, no model folder
        assert not {p.name for p in run_dir.iterdir()} & {"checkpoints", "metrics.jsonl", "summary.json"}


@pytest.fixture
def hub_offline(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import


def test_bad_model_input_in_the_build_is_one_line(tmp_path, monkeypatch, hub_offline):
    """What train.py reports (``error: <message>``, exit 2) for the other bad inputs,
    checked in-process: each stops before any data or model is made."""
    gguf = tmp_path / "model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF not really")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    cache = tmp_path / "cache"
    monkeypatch.setenv("TFX_CACHE_DIR", str(cache))
    for args, expected in [
        (["model=hf"], "model=hf needs model.name_or_path"),
        (["model=smollm2_hub"], "could not load hub model 'HuggingFaceTB/SmolLM2-135M': no network"),
        (["model=hf", f"model.name_or_path={gguf}"],
         "loading model.Q4_1.gguf needs the gguf package: pip install gguf"),
        (["model=hf", f"model.name_or_path={tmp_path}", "model.gguf_file=absent.gguf"],
         "GGUF file 'absent.gguf' not found"),
    ]:
        cfg = compose([*HF_TINY, *args])
        with pytest.raises(ConfigError) as err:
            train(cfg, tmp_path / "run")
        assert one_line(err).startswith(expected), one_line(err)
    assert not cache.exists() and not (tmp_path / "run" / "checkpoints").exists()


# --- the real SmolLM2 -------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(_isolated_env):
    """The converted SmolLM2 folder (user cache), and Shakespeare's raw texts copied into
    this session's data cache when the user cache has them (no download then)."""
    folder = ensure_smollm2(USER_CACHE)
    raw = USER_CACHE / "raw" / "shakespeare"
    mine = Path(os.environ["TFX_CACHE_DIR"]) / "raw" / "shakespeare"
    if (raw / "texts").is_dir() and not mine.exists():
        shutil.copytree(raw, mine)
    return folder


def smollm2_cfg(folder, *extra):
    return compose(["model=smollm2", f"model.name_or_path={folder}", "data=shakespeare",
                    "data.seq_len=64", "trainer.batch_size=1", "trainer.max_steps=1",
                    "trainer.eval_every=0", "trainer.ckpt_every=0", "trainer.progress=false",
                    "logger=none", "scheduler.warmup_steps=0", "optim.lr=1e-4", *extra])


@pytest.mark.slow
def test_smollm2_fine_tune_step(smollm2, tmp_path):
    job = build(smollm2_cfg(smollm2), tmp_path)
    assert anatomy_of(job.model).n_layers(job.model) == 30 and job.data.vocab_size == 49152
    before = job.model.lm.model.layers[0].mlp.down_proj.weight.detach().clone()
    out = job.trainer.train_step()
    # a pretrained model starts far below uniform (ln 49152 = 10.8) on Shakespeare
    assert math.isfinite(out["loss"]) and out["loss"] < 6.0 and out["applied"] == 1.0
    assert not torch.equal(before, job.model.lm.model.layers[0].mlp.down_proj.weight)


@pytest.mark.slow
def test_smollm2_perplexity_far_below_a_random_copy(smollm2, tmp_path):
    from omegaconf import OmegaConf

    from tfx.eval_run import evaluate_pretrained

    ppl = {}
    for pretrained in (True, False):
        cfg = compose(["model=smollm2", f"model.name_or_path={smollm2}", f"model.pretrained={pretrained}",
                       "data=shakespeare", "data.seq_len=128"], config_name="evaluate")
        torch.manual_seed(0)
        result = evaluate_pretrained(cfg, tmp_path / str(pretrained), batch_size=2, max_batches=2,
                                     speed_batches=1, splits=["validation"])
        assert OmegaConf.select(cfg, "data.tokenizer.kind") == "pretrained"
        ppl[pretrained] = result["val_ppl"]
    print(f"SmolLM2 on held-out Shakespeare plays: ppl {ppl[True]:.1f}, random copy {ppl[False]:.0f}")
    assert ppl[True] < 100 and ppl[False] > 10_000


@pytest.mark.slow
def test_smollm2_structured_prune_export_reload(smollm2, tmp_path):
    """The real model: whole KV groups (with their query heads) and MLP neurons removed,
    saved with save_pretrained, reloaded by transformers alone with the same logits."""
    from transformers import AutoModelForCausalLM

    from tfx.ckpt import load_run

    summary = train(smollm2_cfg(smollm2, "compression=structured", "compression.structured.head_ratio=0.34",
                                "trainer.max_steps=0", "trainer.final_eval_batches=2"), tmp_path)
    assert "hf_model_skipped" not in summary and math.isfinite(summary["val_loss"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_model").eval()
    cfg = reloaded.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (6, 2) and cfg.intermediate_size == 1152
    model, _ = load_run(tmp_path)
    x = torch.randint(0, 49152, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, model.eval()(x), atol=1e-4, rtol=1e-4)
