"""Tokenizers behind one small interface: ``encode``, ``encode_batch``, ``decode``,
``vocab_size``, ``eos_id``, ``save``/``load``. Every kind has an end-of-document id
that packing puts after each document.

Kinds: ``bpe`` (trained on the train split), ``bytes``, ``hub`` (a ``tokenizers``
hub name) and ``pretrained`` (the tokenizer of a Hugging Face model: a local model
folder, a hub id, or the offline preset ``smollm2-135m-instruct-gguf``; resolved by
:mod:`tfx.model.hf` exactly as the model itself is, so data and model agree)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tfx.core.errors import ConfigError, DataError
from tfx.data.config import TokenizerConfig
from tfx.model.hf import load_tokenizer as load_hf_tokenizer
from tfx.model.hf import tokenizer_id

EOS_TOKEN = "<|endoftext|>"
_HUB_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the id that ends a document (bpe and hub kinds)."""

    def __init__(self, tok: HFTokenizer, eos_token: str):
        eos_id = tok.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(f"tokenizer has no end-of-document token {eos_token!r}")
        self.tok, self.eos_token, self.eos_id = tok, eos_token, eos_id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    @property
    def id(self) -> str:
        """Content hash of the tokenizer (see ``tfx.model.hf.tokenizer_id``): equal
        for equal tokenizers wherever they were loaded from."""
        return tokenizer_id(self.tok)

    def save(self, path: str | Path) -> None:
        # eos lives in the JSON so load() needs nothing else
        state = json.loads(self.tok.to_str())
        state["tfx_eos_token"] = self.eos_token
        Path(path).write_text(json.dumps(state))


class ByteTokenizer:
    """UTF-8 bytes as ids. Written by hand because the library's byte-level model
    remaps bytes to printable characters, which only obscures ids 0..255. Byte 0
    (NUL, absent from real text) doubles as end-of-document so the vocabulary
    stays at 256 and the packed stream fits in uint8."""

    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"tfx_kind": "bytes"}))


Tokenizer = TextTokenizer | ByteTokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Inverse of ``save`` for either kind."""
    state = json.loads(Path(path).read_text())
    if state.get("tfx_kind") == "bytes":
        return ByteTokenizer()
    eos = state.pop("tfx_eos_token", EOS_TOKEN)
    return TextTokenizer(HFTokenizer.from_str(json.dumps(state)), eos)


def build_tokenizer(cfg: TokenizerConfig, train_texts: Iterable[str]) -> Tokenizer:
    """Make the tokenizer ``cfg`` asks for; ``train_texts`` is only read for bpe."""
    if cfg.kind == "bytes":
        return ByteTokenizer()
    if cfg.kind == "bpe":
        return train_bpe(train_texts, cfg.vocab_size)
    if cfg.kind == "hub":
        return hub_tokenizer(cfg.name)
    if cfg.kind == "pretrained":
        return pretrained_tokenizer(cfg.name)
    raise DataError(f"data.tokenizer.kind={cfg.kind!r} is unknown; choose bpe, bytes, hub "
                    f"or pretrained")


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """GPT-2 style byte-level BPE: any string encodes (no unknown token), and the
    256-byte base alphabet is always in the vocabulary."""
    if vocab_size <= 257:
        raise DataError(f"data.tokenizer.vocab_size={vocab_size} must exceed 257 "
                        f"(256 bytes + end-of-document); use kind=bytes for bytes")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok, EOS_TOKEN)


def hub_tokenizer(name: str | None) -> TextTokenizer:
    if not name:
        raise DataError("data.tokenizer.kind=hub needs data.tokenizer.name, e.g. gpt2")
    try:
        tok = HFTokenizer.from_pretrained(name)
    except Exception as err:  # noqa: BLE001 - offline, unknown name: same fix
        raise DataError(f"could not load hub tokenizer {name!r} ({type(err).__name__}); "
                        f"offline, use data.tokenizer.kind=bpe or bytes") from err
    eos = next((t for t in _HUB_EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
    if eos is None:
        raise DataError(f"hub tokenizer {name!r} has none of the end-of-document tokens "
                        f"{list(_HUB_EOS_CANDIDATES)}")
    return TextTokenizer(tok, eos)



def pretrained_tokenizer(name: str | None) -> TextTokenizer:
    """The tokenizer of the Hugging Face model ``name`` (folder, hub id or the preset
    ``smollm2-135m-instruct-gguf``), as its ``tokenizers`` backend. Special tokens
    are never added (packing adds the end-of-document id itself). The end of a
    document is the first of the usual separators the vocabulary has (SmolLM2:
    ``<|endoftext|>``, its pretraining separator, not the chat ``<|im_end|>``), else
    the model's own eos token."""
    if not name:
        raise DataError("data.tokenizer.kind=pretrained needs data.tokenizer.name: a model "
                        "folder, a hub id, or smollm2-135m-instruct-gguf")
    try:
        hf = load_hf_tokenizer(name)
    except ConfigError as err:  # the data layer reports data errors
        raise DataError(f"data.tokenizer.name: {err}") from err
    backend = hf.backend_tokenizer
    candidates = (*_HUB_EOS_CANDIDATES, hf.eos_token)
    eos = next((t for t in candidates if t and backend.token_to_id(t) is not None), None)
    if eos is None:
        raise DataError(f"tokenizer of {name!r} has no end-of-document token "
                        f"(tried {list(_HUB_EOS_CANDIDATES)} and its eos)")
    return TextTokenizer(backend, eos)


def tokenizer_cache_id(cfg: TokenizerConfig) -> str | None:
    """What a data cache key should hold for a tokenizer that is loaded, not trained:
    its content hash, so the same tokenizer reached through another path (preset,
    folder, hub) reuses the cache and an edited folder does not. ``None`` for kinds
    fully described by their config (bpe, bytes)."""
    if cfg.kind == "pretrained":
        return pretrained_tokenizer(cfg.name).id
    if cfg.kind == "hub":
        return hub_tokenizer(cfg.name).id
    return None
