"""Tokenize each split once into a flat token stream on disk and memory-map it.

Cache layout (one directory per data+tokenizer config)::

    <cache_dir>/tokens/<source>-<key>/
        tokenizer.json   meta.json   train.bin   validation.bin   test.bin

The key hashes the data config; a ``pretrained`` tokenizer (a model's own) enters
it by its content hash (:func:`tfx.data.tokenizer.tokenizer_cache_id`), not its name.
A ``.bin`` is the raw array of token ids, documents joined by the end-of-document
id, in the smallest unsigned dtype that holds the vocabulary. The directory is
built under a temporary name and renamed, so a killed run never leaves half a cache.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np

from tfx.data.config import DataConfig
from tfx.data.sources import SPLITS, load_source
from tfx.data.tokenizer import Tokenizer, build_tokenizer, load_tokenizer, tokenizer_cache_id

# Bump when the bytes on disk or the source splits change meaning.
FORMAT_VERSION = 1
# Fields that do not change the token streams (seq_len only changes the view).
_KEY_IGNORES = ("cache_dir", "seq_len")


def cache_key(cfg: DataConfig) -> str:
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _KEY_IGNORES}
    if cfg.source == "files":  # same paths, edited files: must not reuse stale tokens
        fields["files_stamp"] = _files_stamp(cfg.data_files)
    if cfg.tokenizer.kind == "pretrained":
        # a model's tokenizer is keyed by its content, not by how it was named: the preset,
        # its folder or a copy share one cache; an edited tokenizer gets a new one
        fields["tokenizer"] = {"kind": "pretrained", "id": tokenizer_cache_id(cfg.tokenizer)}
    blob = json.dumps({"format": FORMAT_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _files_stamp(data_files) -> list:
    """(path, size, mtime) of every local file ``data_files`` matches."""
    if isinstance(data_files, str):
        paths = sorted(glob.glob(os.path.expanduser(data_files)))
        return [(p, os.path.getsize(p), os.path.getmtime(p)) for p in paths]
    values = data_files.values() if isinstance(data_files, dict) else data_files
    return [_files_stamp(v) for v in values]


def cache_path(cfg: DataConfig) -> Path:
    root = Path(os.path.expanduser(cfg.cache_dir)) / "tokens"
    return root / f"{cfg.source}-{cache_key(cfg)}"


def token_dtype(vocab_size: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")


def load_or_build(cfg: DataConfig) -> tuple[Path, dict, Tokenizer]:
    """Return the cache directory, its meta and the tokenizer, building them if absent."""
    path = cache_path(cfg)
    if (path / "meta.json").exists():
        print(f"data: using cached tokens {path}")
    else:
        build(cfg, path, key=path.name.rsplit("-", 1)[1])
    meta = json.loads((path / "meta.json").read_text())
    return path, meta, load_tokenizer(path / "tokenizer.json")


def build(cfg: DataConfig, path: Path, key: str | None = None) -> None:
    dd = load_source(cfg)
    tokenizer = _make_tokenizer(cfg, dd["train"])
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer.save(tmp / "tokenizer.json")
    counts = {s: write_stream(dd[s], tokenizer, dtype, tmp / f"{s}.bin") for s in SPLITS}
    meta = {"format": FORMAT_VERSION, "key": key or cache_key(cfg), "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "n_tokens": counts, "n_docs": {s: len(dd[s]) for s in SPLITS},
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _KEY_IGNORES}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished the same cache first; theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"data: wrote {path} ({', '.join(f'{s} {n:,}' for s, n in counts.items())} tokens)")


def _make_tokenizer(cfg: DataConfig, train: datasets.Dataset) -> Tokenizer:
    tcfg = cfg.tokenizer
    if tcfg.kind == "bpe":
        print(f"data: training BPE tokenizer (vocab {tcfg.vocab_size}) on "
              f"{len(train):,} documents ...")
    texts = (b["text"] for b in train.iter(batch_size=1000))
    return build_tokenizer(tcfg, texts)


def write_stream(ds: datasets.Dataset, tokenizer: Tokenizer, dtype: np.dtype, out: Path) -> int:
    """Tokenize with ``datasets.map`` (batched, with a progress bar) and append each
    document plus the end-of-document id to ``out``; returns the token count."""
    eos = tokenizer.eos_id

    def encode(batch):
        return {"ids": [ids + [eos] for ids in tokenizer.encode_batch(batch["text"])]}

    ids = ds.map(encode, batched=True, remove_columns=ds.column_names,
                 desc=f"data: tokenize {out.stem}", load_from_cache_file=False)
    n = 0
    with open(out, "wb") as f:
        for batch in ids.iter(batch_size=1000):
            arr = np.concatenate([np.asarray(doc, dtype=dtype) for doc in batch["ids"]])
            arr.tofile(f)
            n += arr.size
    return n


def open_stream(path: Path, split: str, meta: dict) -> np.memmap:
    return np.memmap(path / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r",
                     shape=(meta["n_tokens"][split],))
