"""Shared helpers of the Hugging Face model tests: a tiny random Llama in SmolLM2's
shape (GQA, SiLU GLU MLP, RMSNorm, RoPE, tied head; 2 layers, small dims) saved with a
small byte-level BPE tokenizer to a folder that ``model=hf model.name_or_path=...``
loads, and configs composed for it."""
from __future__ import annotations

import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
#: the user's tfx cache, where the converted SmolLM2 folder lives between sessions (the
#: tests' own TFX_CACHE_DIR is a fresh temporary folder)
USER_CACHE = Path(os.path.expanduser(os.environ.get("TFX_MODEL_CACHE") or os.environ.get("TFX_CACHE_DIR")
                                     or "~/.cache/tfx"))

# TINY of conftest without model=tiny: every HF training test starts from these.
HF_TINY = ["data=pydocs", "data.seq_len=32", "trainer.batch_size=4", "trainer.max_steps=4",
           "trainer.eval_every=0", "trainer.eval_batches=2", "trainer.final_eval_batches=2",
           "trainer.ckpt_every=0", "trainer.log_every=1", "trainer.progress=false", "logger=none",
           "scheduler.warmup_steps=0", "optim=adamw", "optim.lr=3e-3"]

TOKENIZER_TEXT = ("def class return import from self None True False the of and to in is "
                  "for with as an be this that value object list dict string module function")


def tiny_llama_config(vocab_size: int = 320, tie: bool = True):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                       max_position_embeddings=128, tie_word_embeddings=tie, rms_norm_eps=1e-5)


def tiny_tokenizer(vocab_size: int = 300, text: str = TOKENIZER_TEXT):
    """Byte-level BPE (256 bytes + <|endoftext|> + a few merges) as an HF fast tokenizer.
    Deterministic, so every test session reuses one data cache for it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def save_tiny_llama(folder: Path, seed: int = 0, tie: bool = True) -> Path:
    """A random tiny Llama and its tokenizer, ``save_pretrained`` into ``folder``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(tie=tie)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return Path(folder)


def save_tiny_gpt2(folder: Path, seed: int = 0) -> Path:
    """A random tiny HF GPT-2 (fused c_attn Conv1D, learned positions, biases, tied head)
    and the same small tokenizer, ``save_pretrained`` into ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=320, n_positions=128)
                    ).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return Path(folder)


def hf_overrides(folder: Path, *extra: str) -> list:
    return [*HF_TINY, "model=hf", f"model.name_or_path={folder}", *extra]


def compose(overrides, config_name: str = "train"):
    from hydra import compose as hydra_compose, initialize_config_dir

    from tfx.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    return cfg


def hf_cfg(folder: Path, *extra: str, run_dir=None):
    from omegaconf import open_dict

    cfg = compose(hf_overrides(folder, *extra))
    if run_dir is not None:
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
    return cfg
