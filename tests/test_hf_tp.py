"""Tensor parallel on Hugging Face Llama-like models (2 gloo processes on CPU).

The reference is the same model unsharded in this process: TP=2 logits, every
gradient and the weights after one AdamW step must equal it to float32 round-off,
with and without sequence/loss parallel, with GQA (6 query heads, 2 KV heads) and a
tied head, and with tfx's sparse attention running on each rank's local heads. The
refusals (HF GPT-2, GQA that the degree does not divide, plan styles tfx does not map,
pipeline parallel) are one line, in ``validate``."""
from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from hf_utils import tiny_llama_config  # noqa: E402
from conftest import one_line  # noqa: E402
from tfx.core import ConfigError, Plan  # noqa: E402

#: (sequence_parallel, loss_parallel, sparse attention or None)
CASES = {"sp_lp": (True, True, None), "plain": (False, False, None),
         "sp_lp_sliding_window": (True, True, "sliding_window")}
WORLD = 2


def _model(attention):
    from transformers import LlamaForCausalLM

    from tfx.attention import SlidingWindow, apply_sparse_attention
    from tfx.model import CausalLM

    torch.manual_seed(0)
    model = CausalLM(LlamaForCausalLM(tiny_llama_config()))
    if attention:
        apply_sparse_attention(model, SlidingWindow(5), tile=8)
    return model


def _ids():
    return torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(1))


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _one_step(model):
    """Logits, gradients and weights after one AdamW step, all gathered to full tensors."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel

    ids = _ids()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    logits = model(ids[:, :-1])
    with loss_parallel() if isinstance(logits, DTensor) and logits.placements[0].is_shard() else torch.enable_grad():
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
    opt.step()
    weights = {n: _full(p.detach()).clone() for n, p in model.named_parameters()}
    tied = model.lm.lm_head.weight is model.lm.model.embed_tokens.weight
    return {"logits": _full(logits.detach()), "grads": grads, "weights": weights, "tied": tied}


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tfx.parallel.tp import apply_tp

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        for name, (sp, lp, attention) in CASES.items():
            model = apply_tp(_model(attention), mesh, sequence_parallel=sp, loss_parallel=lp)
            out = _one_step(model)
            if rank == 0:
                torch.save(out, os.path.join(out_dir, f"{name}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("hf_tp")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD)
    return {name: torch.load(out / f"{name}.pt") for name in CASES}


@pytest.mark.parametrize("case", CASES)
def test_tp2_equals_one_process(tp_results, case):
    got = tp_results[case]
    ref = _one_step(_model(CASES[case][2]))
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    assert got["grads"].keys() == ref["grads"].keys()
    for n in ref["grads"]:
        torch.testing.assert_close(got["grads"][n], ref["grads"][n], rtol=1e-4, atol=1e-6, msg=n)
        # AdamW's first step is lr * sign-like g / (|g| + eps): tiny gradients amplify round-off
        torch.testing.assert_close(got["weights"][n], ref["weights"][n], rtol=1e-4, atol=2e-5, msg=n)
    assert got["tied"] and ref["tied"]
    sharded = [n for n in ref["grads"] if "q_proj" in n or "down_proj" in n]
    assert sharded and any(not torch.equal(ref["weights"][n], _model(None).state_dict()[n]) for n in sharded)


# --- validate --------------------------------------------------------------------------

def _spec(family, config=None):
    return SimpleNamespace(family=family, config=config)


def _tp(**kw):
    from tfx.parallel import TensorParallel

    return TensorParallel(**kw)


def test_validate_accepts_the_tiny_llama():
    tech = _tp()
    tech.validate(Plan([tech], world_size=2, model=_spec("hf_llama", tiny_llama_config())))


def test_validate_refuses_gpt2_in_one_line():
    tech = _tp()
    with pytest.raises(ConfigError) as err:
        tech.validate(Plan([tech], world_size=2, model=_spec("hf_gpt2")))
    msg = one_line(err)
    assert "hf_gpt2" in msg and "c_attn" in msg and "parallel=fsdp" in msg


@pytest.mark.parametrize("overrides, degree, needle", [
    ({"num_attention_heads": 8, "num_key_value_heads": 2}, 4, "num_key_value_heads=2"),
    ({}, 4, "num_attention_heads=6"),
    ({"intermediate_size": 129}, 2, "intermediate_size=129"),
    ({"vocab_size": 321}, 2, "vocab_size=321"),
])
def test_validate_refuses_sizes_the_degree_does_not_divide(overrides, degree, needle):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{**tiny_llama_config().to_dict(), **overrides})
    tech = _tp(degree=degree)
    with pytest.raises(ConfigError) as err:
        tech.validate(Plan([tech], world_size=degree, model=_spec("hf_llama", cfg)))
    msg = one_line(err)
    assert needle in msg and f"degree {degree}" in msg and "parallel.degree" in msg


def test_validate_refuses_plan_styles_tfx_does_not_map():
    """Qwen3 replicates per-head q/k norms (``replicated_with_grad_allreduce``): refused."""
    from transformers import Qwen3Config

    cfg = Qwen3Config(vocab_size=320, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    tech = _tp()
    with pytest.raises(ConfigError) as err:
        tech.validate(Plan([tech], world_size=2, model=_spec("hf_llama", cfg)))
    assert "replicated_with_grad_allreduce" in one_line(err)


def test_validate_accepts_biased_projections():
    """Qwen2's q/k/v biases are sharded with their weights (column-wise)."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(vocab_size=320, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2)
    tech = _tp()
    tech.validate(Plan([tech], world_size=2, model=_spec("hf_llama", cfg)))


@pytest.mark.parametrize("family", ["hf_llama", "hf_gpt2"])
def test_pipeline_parallel_refuses_hf_models_in_one_line(family):
    from tfx.parallel import PipelineParallel

    tech = PipelineParallel()
    with pytest.raises(ConfigError) as err:
        tech.validate(Plan([tech], world_size=2, model=_spec(family, tiny_llama_config())))
    msg = one_line(err)
    assert "parallel=pp" in msg and family in msg and "parallel=fsdp" in msg
    assert ("parallel=tp" in msg) == (family == "hf_llama")


# --- through the trainer: train.py's own launcher, checkpoints, reload ---------------------

# SGD as in test_hf_train.py's data-parallel tests: AdamW turns round-off in rarely seen
# embedding rows into visible update differences; SGD keeps weights at round-off.
_STEPS = ("trainer.max_steps=3", "resume=never", "optim=sgd", "optim.lr=0.1",
          "attention=sliding_window", "attention.window=8", "attention.tile=8")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from hf_utils import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("hf_tp_model") / "tiny-llama")


@pytest.fixture(scope="module")
def single_run(llama_dir, tmp_path_factory):
    from hf_utils import hf_cfg

    from tfx.train.run import train

    run_dir = tmp_path_factory.mktemp("hf_tp_single")
    train(hf_cfg(llama_dir, *_STEPS, run_dir=run_dir), run_dir)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("mode, nproc, batch", [("tp", 2, 4), ("fsdp_tp", 4, 2)])
def test_training_matches_one_process(mode, nproc, batch, llama_dir, single_run, tmp_path):
    """parallel=tp (2 ranks, each the whole batch) and parallel=fsdp_tp (2 x 2 ranks) with
    sliding-window attention: per-step loss, gradient norm and final weights (read back
    from the sharded checkpoint) equal one process. About 60 s (tp) and 120 s (fsdp_tp)
    on a loaded 2-core box."""
    from hf_utils import hf_cfg
    from parallel_utils import assert_same_training

    from tfx.launch import launch

    cfg = hf_cfg(llama_dir, *_STEPS, f"parallel={mode}", f"trainer.batch_size={batch}", run_dir=tmp_path)
    summary = launch(cfg, tmp_path, nproc=nproc)
    assert summary["world_size"] == nproc and summary["dp_size"] == nproc // 2
    assert "sharded" in summary["hf_model_skipped"]
    assert_same_training(tmp_path, single_run, atol=1e-6, rtol=1e-5)


def test_sequence_parallel_refuses_an_unexpected_calling_convention():
    """Sequence parallel gathers the attention input by keyword and the MLP input by
    position (LlamaDecoderLayer's calls); another convention fails loudly, not silently."""
    from transformers import LlamaForCausalLM

    from tfx.parallel.tp import _require_call

    layer = LlamaForCausalLM(tiny_llama_config()).model.layers[0]
    _require_call(layer.mlp, keyword=False)
    x = torch.randn(1, 4, 48)
    layer.mlp(x)  # as LlamaDecoderLayer calls it
    with pytest.raises(ConfigError) as err:
        layer.mlp(hidden_states=x)
    assert "parallel.sequence_parallel=false" in one_line(err)
