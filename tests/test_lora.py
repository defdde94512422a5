"""compression=lora (tfx/compression/lora.py): LoRA adapters through peft.

References: the base model itself (at init ``B = 0``, so the adapted model computes the
same logits bitwise), the hand count ``rank * (in + out)`` per adapted Linear, the
merge ``W + alpha / rank * B @ A`` computed by hand, an uninterrupted run (resume is
bitwise), the same run without activation checkpointing, and a one-process run (DDP).
Fast tests use the tiny random Llama of tests/hf_utils.py (SmolLM2's shape), tfx's tiny
GPT and a tiny HF GPT-2."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from conftest import GradRecorder, clean, one_line, tiny  # noqa: E402
from hf_utils import USER_CACHE, hf_cfg, save_tiny_gpt2  # noqa: E402
from tfx.compression import LoRA, MagnitudePruning, apply_lora  # noqa: E402
from tfx.core import ConfigError, Plan  # noqa: E402
from tfx.model import GPTConfig, HFModel, count_params  # noqa: E402
from tfx.train.build import build  # noqa: E402
from tfx.train.run import train  # noqa: E402

ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_LLAMA_ARG = f"compression.lora.target_modules=[{','.join(ALL_LLAMA)}]"
# read at import (collection), before conftest points TFX_CACHE_DIR at a temp dir
def lora_cfg(llama_dir, *extra, run_dir=None):
    return hf_cfg(llama_dir, "compression=lora", "compression.lora.rank=4", *extra, run_dir=run_dir)


def is_adapter(name: str) -> bool:
    return "lora_A" in name or "lora_B" in name


def snapshot(model):
    return {clean(k): v.detach().clone() for k, v in model.state_dict().items()}


# --- the adapted model against the base model ------------------------------------------

def test_forward_at_init_equals_the_base_model(llama_dir):
    base = HFModel(str(llama_dir)).build(300, 32)
    model = HFModel(str(llama_dir)).build(300, 32)
    tuner = apply_lora(model, rank=4, alpha=8, target_modules=ALL_LLAMA, dropout=0.1)
    assert len(tuner.targeted_module_names) == 7 * 2  # every Linear of both decoder layers
    idx = torch.randint(0, 300, (2, 16))
    for mode in ("train", "eval"):  # dropout active or not: B = 0 adds exact zeros
        base.train(mode == "train"), model.train(mode == "train")
        with torch.no_grad():
            assert torch.equal(model(idx), base(idx)), mode


def test_forward_at_init_equals_the_base_model_own_gpt():
    cfg = GPTConfig(n_layer=2, n_head=2, d_model=32, dropout=0.0)
    torch.manual_seed(0)
    base = cfg.build(vocab_size=64, block_size=16).eval()
    torch.manual_seed(0)
    model = cfg.build(vocab_size=64, block_size=16).eval()
    tuner = apply_lora(model, rank=2, target_modules=["q_proj", "v_proj", "fc", "proj"])
    # "proj" is the MLP's output only: suffix matching does not reach q_proj/o_proj
    assert sorted(n.rsplit(".", 1)[-1] for n in tuner.targeted_module_names) == \
        ["fc", "fc", "proj", "proj", "q_proj", "q_proj", "v_proj", "v_proj"]
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_optimizer_gets_only_the_adapters_hand_count(optim, llama_dir, hf_data, tmp_path):
    job = build(lora_cfg(llama_dir, ALL_LLAMA_ARG, f"optim={optim}"), tmp_path, data=hf_data)
    base = HFModel(str(llama_dir)).build(300, 32).lm
    r = 4
    hand = sum(r * (lin.in_features + lin.out_features)
               for layer in base.model.layers for name, lin in layer.named_modules()
               if name.rsplit(".", 1)[-1] in ALL_LLAMA)
    # 48-wide model, 2 KV heads of 8, MLP 128: q,o 48->48; k,v 48->16; gate,up 48->128; down 128->48
    assert hand == 2 * r * (2 * 96 + 2 * 64 + 3 * 176)
    metrics = job.pipeline.metrics()
    assert metrics["lora/trainable_params"] == hand
    assert metrics["lora/trainable_fraction"] == pytest.approx(hand / count_params(job.model), rel=1e-12)
    assert count_params(job.model) == count_params(base) + hand
    given = {id(p) for g in job.trainer.optimizer.param_groups for p in g["params"]}
    adapters = {id(p) for n, p in job.model.named_parameters() if is_adapter(n)}
    assert given == adapters and len(adapters) == 2 * 7 * 2
    assert all(not p.requires_grad for n, p in job.model.named_parameters() if not is_adapter(n))


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_training_changes_only_the_adapters(optim, llama_dir, hf_data, tmp_path):
    job = build(lora_cfg(llama_dir, f"optim={optim}"), tmp_path, data=hf_data)
    before = snapshot(job.model)
    losses = [job.trainer.train_step()["loss"] for _ in range(2)]
    after = snapshot(job.model)
    assert all(math.isfinite(x) for x in losses)
    frozen = [k for k in before if not is_adapter(k)]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # bitwise
    for k in before:
        if "lora_B" in k:
            assert torch.count_nonzero(before[k]) == 0 and torch.count_nonzero(after[k]) > 0, k
        elif "lora_A" in k:  # zero gradient on the first step (B = 0), not on the second
            assert not torch.equal(before[k], after[k]), k


# --- export: merged into a plain HF model -------------------------------------------------

def test_merged_export_reloads_with_the_trained_logits(llama_dir, hf_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from tfx.ckpt import load_run

    # activation checkpointing wraps the layers: the merge must reach through the wrappers
    summary = train(lora_cfg(llama_dir, "trainer.max_steps=3", "optim.lr=1e-2", "memory=selective_ckpt"),
                    tmp_path, data=hf_data)
    assert summary["lora/merged_linears"] == 8 and summary["lora/trainable_params"] == 2560
    trained, _ = load_run(tmp_path)  # the adapters unmerged, rebuilt from the checkpoint
    assert any(is_adapter(k) for k in trained.state_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(summary["hf_model"]).eval()  # no peft involved
    assert not any("lora" in k or "base_layer" in k for k in reloaded.state_dict())
    # the merged weight is W + alpha / r * B @ A, by hand
    q = trained.lm.model.layers[1].self_attn.q_proj
    merged = q.base_layer.weight + 16 / 4 * q.lora_B["default"].weight @ q.lora_A["default"].weight
    torch.testing.assert_close(reloaded.model.layers[1].self_attn.q_proj.weight, merged,
                               rtol=0, atol=1e-6)
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        got, want = reloaded(input_ids=ids).logits, trained(ids)
        base = HFModel(str(llama_dir)).build(300, 32).eval()(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (want - base).abs().max() > 1e-3  # the adapters did change the function
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # still tied


def test_gpt2_conv1d_adapters_merge_and_export(hf_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from tfx.ckpt import load_run

    folder = save_tiny_gpt2(tmp_path / "tiny-gpt2")
    with pytest.raises(ConfigError) as err:  # the Llama default names nothing in GPT-2
        build(hf_cfg(folder, "compression=lora"), tmp_path / "bad", data=hf_data)
    assert "c_attn, c_proj, c_fc" in one_line(err) and "q_proj" in str(err.value)
    summary = train(hf_cfg(folder, "compression=lora", "compression.lora.target_modules=[c_attn,c_fc]",
                           "trainer.max_steps=2", "optim.lr=1e-2"), tmp_path / "run", data=hf_data)
    assert summary["lora/merged_linears"] == 4
    trained, _ = load_run(tmp_path / "run")
    reloaded = AutoModelForCausalLM.from_pretrained(summary["hf_model"]).eval()
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(ids), rtol=0, atol=1e-5)


# --- resume, combinations ----------------------------------------------------------------

def test_resume_equals_uninterrupted(llama_dir, hf_data, tmp_path):
    """Dropout 0.05 (the default) draws from the RNG: the resumed run must restore it."""
    from parallel_utils import assert_same_training, interrupt_after

    extra = ("trainer.ckpt_every=2", "trainer.keep_last=0")
    full = tmp_path / "full"
    train(lora_cfg(llama_dir, *extra), full, data=hf_data)
    resumed = interrupt_after(full, tmp_path / "resumed", 2)  # as if killed after step 2
    train(lora_cfg(llama_dir, *extra, "resume=auto"), resumed, data=hf_data)
    assert_same_training(resumed, full, steps={3, 4}, atol=0, rtol=0, weight_atol=0)


def test_activation_checkpointing_same_adapter_gradients(llama_dir, hf_data, tmp_path):
    grads = {}
    for memory in ("none", "activation_ckpt"):
        rec = GradRecorder()
        job = build(lora_cfg(llama_dir, f"memory={memory}"), tmp_path / memory, data=hf_data,
                    extra_techniques=[rec])
        job.trainer.train_step()
        grads[memory] = rec.grads[0]
    ref, ckpt = grads["none"], grads["activation_ckpt"]
    assert ref.keys() == ckpt.keys() and ref and all(is_adapter(k) for k in ref)
    for name in ref:  # the recomputed forward draws the same dropout masks
        torch.testing.assert_close(ckpt[name], ref[name], rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_the_adapters(precision, llama_dir, hf_data, tmp_path):
    job = build(lora_cfg(llama_dir, f"precision={precision}", "optim.lr=1e-2"), tmp_path, data=hf_data)
    before = snapshot(job.model)
    losses = [job.trainer.train_step()["loss"] for _ in range(3)]
    after = snapshot(job.model)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(torch.equal(before[k], after[k]) for k in before if not is_adapter(k))
    assert all(p.dtype == torch.float32 for n, p in job.model.named_parameters() if is_adapter(n))


def test_fp8_base_layers_keep_float_adapters(llama_dir, hf_data, tmp_path):
    """precision=fp8 (torchao's emulation here; the CUDA path is not tested on CPU) turns
    the base Linears into Float8Linear before LoRA wraps them; the adapters stay float32
    Linears, and the merge writes into the Float8Linear's float weight."""
    from torchao.float8.float8_linear import Float8Linear

    job = build(lora_cfg(llama_dir, "precision=fp8", "precision.emulate=true", "precision.auto_filter=false"),
                tmp_path, data=hf_data)
    q = job.model.lm.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, Float8Linear) and type(q.lora_A["default"]) is torch.nn.Linear
    before = snapshot(job.model)
    assert all(math.isfinite(job.trainer.train_step()["loss"]) for _ in range(2))
    after = snapshot(job.model)
    assert all(torch.equal(before[k], after[k]) for k in before if not is_adapter(k))
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    job.pipeline.export(job.model, tmp_path, job.ctx)
    assert isinstance(job.model.lm.model.layers[0].self_attn.q_proj, Float8Linear)  # merged, unwrapped


def test_own_gpt_adapts_a_trained_run(tmp_path, pydocs_data):
    """tfx's GPT: LoRA on a trained run (``from_checkpoint``) starts from its function,
    trains only the adapters, and merges them at export."""
    from tfx.ckpt import load_run

    base_run = tmp_path / "base"
    train(tiny("trainer.max_steps=2"), base_run, data=pydocs_data)
    base, _ = load_run(base_run)
    cfg = tiny("compression=lora", f"compression.lora.from_checkpoint={base_run}",
               "compression.lora.target_modules=[q_proj,v_proj,fc,proj]")
    job = build(cfg, tmp_path / "lora", data=pydocs_data)
    ids = torch.randint(0, pydocs_data.vocab_size, (2, 32))
    job.model.eval()
    with torch.no_grad():
        assert torch.equal(job.model(ids), base(ids))
    job.model.train()
    for _ in range(2):
        job.trainer.train_step()
    start = snapshot(base)
    now = snapshot(job.model)
    plain = {k.replace(".base_layer", ""): v for k, v in now.items() if not is_adapter(k)}
    assert plain.keys() == start.keys()
    assert all(torch.equal(plain[k], start[k]) for k in start)  # base weights untouched
    job.pipeline.export(job.model, tmp_path, job.ctx)  # merges in place
    assert not any(is_adapter(k) for k in job.model.state_dict())
    assert set(job.model.state_dict()) == set(base.state_dict())


# --- bad values and combinations: one line, before any work --------------------------------

@pytest.mark.parametrize("kwargs, needle", [
    ({"rank": 0}, "compression.lora.rank=0 must be an integer >= 1"),
    ({"rank": 2.5}, "compression.lora.rank=2.5"),
    ({"alpha": 0}, "compression.lora.alpha=0 must be a number > 0"),
    ({"alpha": float("inf")}, "compression.lora.alpha=inf"),
    ({"dropout": 1.0}, "compression.lora.dropout=1.0 must be in [0, 1)"),
    ({"dropout": -0.1}, "compression.lora.dropout=-0.1"),
    ({"target_modules": []}, "compression.lora.target_modules=[] must be a non-empty list"),
])
def test_bad_values_are_refused_in_validate(kwargs, needle):
    tech = LoRA(**kwargs)
    with pytest.raises(ConfigError) as err:
        tech.validate(Plan([tech], model=GPTConfig()))
    assert needle in one_line(err)


def test_bad_target_names_are_refused_when_applied(llama_dir):
    model = HFModel(str(llama_dir)).build(300, 32)
    available = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    with pytest.raises(ConfigError) as err:
        apply_lora(model, target_modules=["q_proj", "qproj", "fc"])
    msg = one_line(err)
    assert "['qproj', 'fc'] match no Linear" in msg and available in msg
    for target, outside in (("lm_head", "lm_head"), ("mlp", "model.layers.0.mlp")):
        with pytest.raises(ConfigError) as err:
            apply_lora(model, target_modules=[target])
        assert f"names {outside}, which is not a Linear of a decoder layer" in one_line(err)
    assert not any(is_adapter(n) for n, _ in model.named_parameters())  # nothing half-applied


def test_bad_combinations_are_refused_in_validate(llama_dir):
    from tfx.parallel import FSDP, PipelineParallel, TensorParallel

    lora = LoRA()
    for other, needle in ((MagnitudePruning(), "['prune']"), (TensorParallel(), "['tp']"),
                          (PipelineParallel(), "['pp']"), (FSDP(), "['fsdp']")):
        with pytest.raises(ConfigError) as err:
            lora.validate(Plan([lora, other], world_size=2, model=GPTConfig()))
        assert "compression=lora" in one_line(err) and needle in str(err.value)
    with pytest.raises(ConfigError) as err:
        lora.validate(Plan([lora], model=SimpleNamespace(family=None)))
    assert "has no tfx anatomy" in one_line(err)
    for spec in (GPTConfig(), HFModel(str(llama_dir))):
        lora.validate(Plan([lora], model=spec))


# --- slow: data parallel, the real SmolLM2 -------------------------------------------------

@pytest.mark.slow  # 40-55 s on 2 shared cores (inductor compiles the decoder layer on CPU)
def test_compile_matches_eager(llama_dir, hf_data, tmp_path):
    pytest.importorskip("torch._inductor")
    losses = {}
    for compile_ in ("false", "true"):
        job = build(lora_cfg(llama_dir, "compression.lora.dropout=0", f"compile={compile_}"),
                    tmp_path / compile_, data=hf_data)
        losses[compile_] = [job.trainer.train_step()["loss"] for _ in range(3)]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)
    assert job.pipeline.export(job.model, tmp_path, job.ctx) == {"lora/merged_linears": 8.0}
    assert not any(is_adapter(k) for k in job.model.state_dict())  # merged through compiled layers


@pytest.mark.slow  # 2 gloo workers + one single run: 30-40 s on 2 shared cores
def test_ddp_matches_single_process(llama_dir, tmp_path):
    from parallel_utils import assert_same_training

    from tfx.launch import launch

    common = ("trainer.max_steps=3", "resume=never", "optim=sgd", "optim.lr=0.5",
              "compression.lora.dropout=0")
    single = tmp_path / "single"
    train(lora_cfg(llama_dir, *common, run_dir=single), single)
    ddp = tmp_path / "ddp"
    summary = launch(lora_cfg(llama_dir, *common, "parallel=ddp", "trainer.batch_size=2", run_dir=ddp),
                     ddp, nproc=2)
    assert summary["dp_size"] == 2 and Path(summary["hf_model"]).is_dir()
    assert_same_training(ddp, single, atol=1e-6, rtol=1e-5)


@pytest.mark.slow  # 20-40 s on 2 shared cores (SmolLM2 converted once into the user cache)
def test_smollm2_lora_step(tmp_path, _isolated_env):
    from hf_utils import compose

    from tfx.model.hf import ensure_smollm2

    folder = ensure_smollm2(USER_CACHE)
    raw = USER_CACHE / "raw" / "shakespeare"
    mine = Path(os.environ["TFX_CACHE_DIR"]) / "raw" / "shakespeare"
    if (raw / "texts").is_dir() and not mine.exists():
        shutil.copytree(raw, mine)
    cfg = compose(["model=smollm2", f"model.name_or_path={folder}", "data=shakespeare", "data.seq_len=64",
                   "trainer.batch_size=1", "trainer.max_steps=1", "trainer.eval_every=0",
                   "trainer.ckpt_every=0", "trainer.progress=false", "logger=none",
                   "scheduler.warmup_steps=0", "optim.lr=1e-3", "compression=lora"])
    job = build(cfg, tmp_path)
    q = job.model.lm.model.layers[0].self_attn.q_proj
    before_w, before_b = q.base_layer.weight.detach().clone(), q.lora_B["default"].weight.detach().clone()
    out = job.trainer.train_step()
    assert math.isfinite(out["loss"]) and out["loss"] < 6.0  # pretrained: far below ln 49152
    assert torch.equal(before_w, q.base_layer.weight) and not torch.equal(before_b, q.lora_B["default"].weight)
    # 30 layers x (q, k, v, o) at rank 8: 8 * (576+576 + 576+192 + 576+192 + 576+576) per layer
    metrics = job.pipeline.metrics()
    assert metrics["lora/trainable_params"] == 30 * 8 * (2 * 1152 + 2 * 768)
    print(f"SmolLM2 LoRA r=8 q,k,v,o: {metrics['lora/trainable_params']:,.0f} trainable "
          f"({100 * metrics['lora/trainable_fraction']:.2f}% of {count_params(job.model):,})")
