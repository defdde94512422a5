"""precision=fp8: refused without an fp8 GPU; numerics checked through torchao's emulation."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY, run_cli, tiny
from tfx.core import ConfigError
from tfx.model import GPT, GPTConfig
from tfx.precision.fp8 import Float8Training, convert_to_fp8, fp8_capable
from tfx.train.run import build


@pytest.mark.skipif(fp8_capable(), reason="this machine can run fp8")
def test_fp8_is_refused_in_one_line_without_an_fp8_gpu(tmp_path, pydocs_data):
    with pytest.raises(ConfigError, match=r"precision=fp8 needs a CUDA GPU with compute capability >= 8.9"):
        build(tiny("precision=fp8"), tmp_path, data=pydocs_data)
    out = run_cli(["train.py", *TINY, "precision=fp8", f"hydra.run.dir={tmp_path / 'cli'}"])
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: precision=fp8")


def test_emulated_fp8_converts_block_linears_and_stays_close():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, d_model=32))
    ref = copy.deepcopy(model)
    n = convert_to_fp8(model, auto_filter=False, emulate=True)
    assert n == 12  # q, k, v, o, fc, proj in each of 2 blocks; never the (tied) head
    assert type(model.head) is torch.nn.Linear and model.head.weight is model.tok_emb.weight
    x = torch.randint(0, 64, (4, 32))
    y, y_ref = model(x), ref(x)
    rel = (y - y_ref).norm() / y_ref.norm()
    assert 0 < rel < 0.1, rel  # fp8 rounding is visible but small
    # torchao's small-layer filter keeps every layer of this tiny model in high precision
    assert convert_to_fp8(copy.deepcopy(ref), auto_filter=True, emulate=True) == 0


def test_emulated_fp8_trains(tmp_path, pydocs_data):
    job = build(tiny("precision=fp8", "precision.emulate=true", "precision.auto_filter=false",
                     "trainer.max_steps=4"), tmp_path, data=pydocs_data)
    losses = [job.trainer.train_step()["loss"] for _ in range(4)]
    assert losses[-1] < losses[0]
    assert job.pipeline.metrics()["fp8/converted_linears"] == 12
    with pytest.raises(ConfigError, match="precision.recipe='delayed'"):
        Float8Training(recipe="delayed")
