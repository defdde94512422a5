"""Data: Hugging Face ``datasets`` sources -> ``tokenizers`` tokenizer -> packed,
memory-mapped token streams -> fixed-length blocks -> batches.

    data = prepare_data(DataConfig(source="pydocs"))
    loader = BlockLoader(data.train, batch_size=8)
    batch = next(loader)   # {"input_ids": (8, T), "labels": (8, T)}
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tfx.core.errors import ConfigError, DataError

from tfx.data.blocks import TokenBlocks
from tfx.data.config import DataConfig, TokenizerConfig
from tfx.data.loader import BlockLoader, eval_batches
from tfx.data.pack import load_or_build, open_stream
from tfx.data.tokenizer import Tokenizer

__all__ = ["DataConfig", "TokenizerConfig", "TokenData", "TokenBlocks", "BlockLoader",
           "eval_batches", "prepare_data", "to_data_config"]


@dataclass
class TokenData:
    train: TokenBlocks
    val: TokenBlocks
    test: TokenBlocks
    tokenizer: Tokenizer
    cache_path: Path
    dtype: str

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id


def to_data_config(cfg) -> DataConfig:
    """A DataConfig, DictConfig or dict -> a validated DataConfig with interpolations
    (the default ``cache_dir`` reads env TFX_CACHE_DIR) resolved."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg))
    except OmegaConfBaseException as err:  # unknown key, wrong type: one line, not a trace
        raise ConfigError(f"data config: {str(err).splitlines()[0]}") from err


def prepare_data(cfg) -> TokenData:
    """Load, tokenize and pack the data ``cfg`` describes, reusing the on-disk cache."""
    cfg = to_data_config(cfg)
    path, meta, tokenizer = load_or_build(cfg)
    if cfg.seq_len < 1:
        raise ConfigError(f"data.seq_len={cfg.seq_len} must be >= 1")
    blocks = {s: TokenBlocks(open_stream(path, s, meta), cfg.seq_len)
              for s in ("train", "validation", "test")}
    for split in ("train", "validation"):  # an empty split would report loss 0.0 (ppl 1.00)
        if len(blocks[split]) == 0:
            raise DataError(f"the {split} split has {blocks[split].n_tokens:,} tokens, fewer than one "
                            f"block of data.seq_len={cfg.seq_len} + 1; lower data.seq_len or use more data")
    return TokenData(train=blocks["train"], val=blocks["validation"], test=blocks["test"],
                     tokenizer=tokenizer, cache_path=path, dtype=meta["dtype"])
