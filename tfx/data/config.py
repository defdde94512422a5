"""Typed data configs; they double as the Hydra schema of the ``data`` group, so a
misspelled key or a wrong type fails when the config is composed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class TokenizerConfig:
    kind: str = "bpe"              # bpe (trained on the train split) | bytes | hub | pretrained
    vocab_size: int = 4096         # bpe only
    # hub: a tokenizers hub name, e.g. "gpt2"; pretrained: an HF model (folder, .gguf, hub id,
    # smollm2-135m-instruct-gguf). With model=hf the build order sets kind=pretrained and
    # name=model.name_or_path itself: the model's own tokenizer drives the data.
    name: Optional[str] = None


@dataclass
class DataConfig:
    source: str = "shakespeare"    # shakespeare | pydocs | hub | files
    path: Optional[str] = None     # hub dataset path, e.g. "Salesforce/wikitext"
    name: Optional[str] = None     # hub dataset config, e.g. "wikitext-103-raw-v1"
    data_files: Any = None         # files: a path/glob, a list, or {split: path}
    file_type: Optional[str] = None  # files: text | json | parquet (default: from extension)
    text_column: str = "text"
    train_split: str = "train"
    val_split: Optional[str] = "validation"
    test_split: Optional[str] = "test"
    val_fraction: float = 0.05     # held-out share when a source has no validation split
    max_docs: Optional[int] = None  # cap documents per split (quick experiments on big sets)
    seq_len: int = 256
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    cache_dir: str = "${oc.env:TFX_CACHE_DIR,'~/.cache/tfx'}"  # ~ quoted for OmegaConf
