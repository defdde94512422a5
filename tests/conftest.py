"""Shared fixtures: a session-wide data cache, offline W&B, composed tiny configs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tfx.core import Stage, Technique

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Tiny and fast: every training test starts from these overrides.
TINY = ["data=pydocs", "model=tiny", "data.seq_len=32", "trainer.batch_size=4",
        "trainer.max_steps=6", "trainer.eval_every=0", "trainer.eval_batches=2",
        "trainer.final_eval_batches=4", "trainer.ckpt_every=0", "trainer.log_every=1",
        "trainer.progress=false", "logger=none", "scheduler.warmup_steps=0", "optim=adamw", "optim.lr=3e-3"]


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    cache = os.environ.get("TFX_TEST_CACHE") or str(tmp_path_factory.mktemp("tfx_cache"))
    os.environ["TFX_CACHE_DIR"] = cache
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ.pop("WANDB_API_KEY", None)
    yield


def compose(overrides=(), config_name: str = "train"):
    """Compose a config from conf/ exactly as train.py would (no run dir)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from tfx.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def tiny(*overrides):
    return compose(TINY + list(overrides))


@pytest.fixture(scope="session")
def pydocs_data(_isolated_env):
    from tfx.data import prepare_data

    return prepare_data(tiny().data)


def run_cli(args, cwd=ROOT, timeout=300, env=None):
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


class GradRecorder(Technique):
    """Test probe: copies the gradients right before each optimizer step."""

    stage = Stage.COMM
    name = "grad_recorder"

    def __init__(self):
        self.grads = []

    def before_optimizer_step(self, model, optimizer, info, ctx):
        self.grads.append({clean(n): p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.grad is not None})


def clean(name):
    """Parameter name without wrapper prefixes (checkpointing, compile)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def one_line(err) -> str:
    """The message of a ``pytest.raises`` result, asserted to be one non-empty line."""
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A tiny random Llama in SmolLM2's shape, saved as an HF folder (tests/hf_utils.py)."""
    pytest.importorskip("transformers")
    from hf_utils import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="session")
def hf_data(llama_dir, _isolated_env):
    """The pydocs data tokenized with the tiny Llama's own tokenizer."""
    from hf_utils import hf_cfg

    from tfx.config import model_spec, use_model_tokenizer
    from tfx.data import prepare_data

    cfg = hf_cfg(llama_dir)
    use_model_tokenizer(cfg, model_spec(cfg))
    return prepare_data(cfg.data)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads on a shared 2-core box (use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``; module-scoped, since a
    per-test switch costs more than it saves)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pattern_allows(pattern, i: int, j: int) -> bool:
    """May query ``i`` attend to key ``j``: the sparse patterns' definitions, written
    independently of their ``mask_mod``."""
    from tfx.attention.patterns import FixedBlockSparse, SlidingWindow

    if j > i:
        return False
    if isinstance(pattern, SlidingWindow):
        return i - j < pattern.window
    if isinstance(pattern, FixedBlockSparse):
        return i // pattern.block == j // pattern.block or j % pattern.stride == pattern.stride - 1
    return i - j < pattern.window or j < pattern.n_global or i < pattern.n_global
