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
           "check_data_config", "eval_batches", "prepare_data", "to_data_config"]


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


SOURCES = ("shakespeare", "pydocs", "hub", "files")
TOKENIZER_KINDS = ("bpe", "bytes", "hub", "pretrained")
FILE_TYPES = ("text", "json", "parquet", "csv")


def check_data_config(cfg: DataConfig) -> None:
    """Values a :class:`DataConfig` must have, checked before any data is read (one
    line naming the key and the allowed range)."""
    def number(key: str, value, low: float, high: float = float("inf"), low_open: bool = False,
               high_open: bool = False) -> None:
        ok = value is not None and not isinstance(value, bool) and (
            (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
        if not ok:
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise ConfigError(f"data.{key}={value!r} must be in {lo}{low:g}, {high:g}{hi}")

    if cfg.source not in SOURCES:
        raise ConfigError(f"data.source={cfg.source!r} is unknown; choose one of {list(SOURCES)}")
    number("seq_len", cfg.seq_len, 1)
    number("val_fraction", cfg.val_fraction, 0, 1, low_open=True, high_open=True)
    if cfg.max_docs is not None:
        number("max_docs", cfg.max_docs, 1)
    for key in ("text_column", "train_split"):
        if not getattr(cfg, key):
            raise ConfigError(f"data.{key} must be a non-empty string")
    tok = cfg.tokenizer
    if tok.kind not in TOKENIZER_KINDS:
        raise ConfigError(f"data.tokenizer.kind={tok.kind!r} is unknown; choose one of {list(TOKENIZER_KINDS)}")
    if tok.kind == "bpe":
        number("tokenizer.vocab_size", tok.vocab_size, 258, 2 ** 32)  # 256 bytes + end-of-document
    if tok.kind in ("hub", "pretrained") and not tok.name:
        raise ConfigError(f"data.tokenizer.kind={tok.kind} needs data.tokenizer.name (e.g. gpt2)")
    if cfg.source == "hub" and not cfg.path:
        raise ConfigError("data.source=hub needs data.path, e.g. Salesforce/wikitext")
    if (cfg.source == "files" or cfg.data_files is not None) and not _files_given(cfg.data_files):
        what = ("data=files needs data.data_files" if cfg.data_files is None
                else f"data.data_files={cfg.data_files!r} must be")
        raise ConfigError(f"{what}: a path or glob, a list of them, or {{train: ..., validation: "
                          f"...}}; e.g. data.data_files=corpus.txt")
    if cfg.source == "files":
        if cfg.file_type is not None and cfg.file_type not in FILE_TYPES:
            raise ConfigError(f"data.file_type={cfg.file_type!r} is unknown; choose one of "
                              f"{list(FILE_TYPES)} or null (from the extension)")


def _files_given(data_files) -> bool:
    """A non-empty path, or a non-empty list/mapping of them."""
    if isinstance(data_files, str):
        return bool(data_files.strip())
    if isinstance(data_files, dict):
        return bool(data_files) and all(isinstance(k, str) and _files_given(v) for k, v in data_files.items())
    if isinstance(data_files, (list, tuple)):
        return bool(data_files) and all(_files_given(v) for v in data_files)
    return False


def prepare_data(cfg) -> TokenData:
    """Load, tokenize and pack the data ``cfg`` describes, reusing the on-disk cache."""
    cfg = to_data_config(cfg)
    check_data_config(cfg)  # before anything is read or written
    path, meta, tokenizer = load_or_build(cfg)
    blocks = {s: TokenBlocks(open_stream(path, s, meta), cfg.seq_len)
              for s in ("train", "validation", "test")}
    for split in ("train", "validation"):  # an empty split would report loss 0.0 (ppl 1.00)
        if len(blocks[split]) == 0:
            raise DataError(f"the {split} split has {blocks[split].n_tokens:,} tokens, fewer than one "
                            f"block of data.seq_len={cfg.seq_len} + 1; lower data.seq_len or use more data")
    return TokenData(train=blocks["train"], val=blocks["validation"], test=blocks["test"],
                     tokenizer=tokenizer, cache_path=path, dtype=meta["dtype"])
