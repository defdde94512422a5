"""Hugging Face causal LMs: anatomy tables, local loading, tokenizer ids, one-line
errors (fast, tiny random models), and the real SmolLM2 preset (slow).

The slow tests build SmolLM2 into the user's model cache (``TFX_MODEL_CACHE``, else
``TFX_CACHE_DIR`` as it was before the test session, else ``~/.cache/tfx``) rather
than the per-session test cache, so the ~0.5 GB build happens once per machine."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import hf_utils  # noqa: E402
from conftest import one_line  # noqa: E402
from tfx.core.errors import ConfigError, DataError  # noqa: E402
from tfx.data.config import TokenizerConfig  # noqa: E402
from tfx.data.tokenizer import (build_tokenizer, load_tokenizer as load_tfx_tokenizer,  # noqa: E402
                                tokenizer_cache_id)
from tfx.model.anatomy import anatomy_of  # noqa: E402
from tfx.model.gpt import GPT, GPTConfig  # noqa: E402
from tfx.model.hf import (SMOLLM2_PRESET, ensure_smollm2, load_causal_lm,  # noqa: E402
                          load_tokenizer, tokenizer_id)

# read at import (collection), before conftest points TFX_CACHE_DIR at a temp dir
_MODEL_CACHE = (os.environ.get("TFX_MODEL_CACHE") or os.environ.get("TFX_CACHE_DIR")
                or "~/.cache/tfx")


def tiny_llama(tie: bool = True):
    """SmolLM2's shape scaled down: GQA 6/2 heads of 8, SiLU GLU MLP, tied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=64, tie_word_embeddings=tie, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                      n_positions=64)).eval()


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, d_model=32)).eval()


def tiny_tokenizer(vocab_size: int = 280, text: str = "the quick brown fox jumps over the lazy dog"):
    """A small byte-level BPE wrapped as an HF fast tokenizer (what from_pretrained returns)."""
    return hf_utils.tiny_tokenizer(vocab_size, text)


# --- anatomy ---------------------------------------------------------------------

def test_llama_anatomy_matches_modules():
    model = tiny_llama()
    anat = anatomy_of(model)
    assert anat.family == "hf_llama"
    layers = anat.decoder_layers(model)
    assert layers == list(model.model.layers) and anat.n_layers(model) == 2
    assert anat.layer_prefix(1) == "model.layers.1"
    assert model.get_submodule(anat.layer_prefix(1)) is layers[1]
    parts = anat.attention(layers[0])
    sa = layers[0].self_attn
    assert (parts.q, parts.k, parts.v, parts.o) == (sa.q_proj, sa.k_proj, sa.v_proj, sa.o_proj)
    assert (parts.n_heads, parts.n_kv_heads, parts.head_dim, parts.kv_groups) == (6, 2, 8, 3)
    assert parts.qkv is None and parts.inputs() == [sa.q_proj, sa.k_proj, sa.v_proj]
    mlp = anat.mlp(layers[0])
    assert (mlp.up, mlp.gate, mlp.down) == (layers[0].mlp.up_proj, layers[0].mlp.gate_proj,
                                            layers[0].mlp.down_proj)
    emb = anat.embeddings(model)
    assert emb.token is model.model.embed_tokens and emb.position is None
    assert anat.head(model) is model.lm_head and anat.final_norm(model) is model.model.norm
    assert anat.tied(model)
    assert not anat.tied(tiny_llama(tie=False))


def test_gpt2_anatomy_matches_modules():
    model = tiny_gpt2()
    anat = anatomy_of(model)
    assert anat.family == "hf_gpt2"
    layers = anat.decoder_layers(model)
    assert layers == list(model.transformer.h)
    assert model.get_submodule(anat.layer_prefix(0)) is layers[0]
    parts = anat.attention(layers[1])
    assert parts.qkv is layers[1].attn.c_attn and parts.q is None and parts.k is None
    assert parts.o is layers[1].attn.c_proj and parts.inputs() == [layers[1].attn.c_attn]
    assert (parts.n_heads, parts.n_kv_heads, parts.head_dim, parts.kv_groups) == (2, 2, 16, 1)
    mlp = anat.mlp(layers[1])
    assert (mlp.up, mlp.gate, mlp.down) == (layers[1].mlp.c_fc, None, layers[1].mlp.c_proj)
    emb = anat.embeddings(model)
    assert emb.token is model.transformer.wte and emb.position is model.transformer.wpe
    assert anat.head(model) is model.lm_head and anat.tied(model)
    assert anat.final_norm(model) is model.transformer.ln_f


def test_tfx_gpt_anatomy_matches_modules():
    model = tiny_gpt()
    anat = anatomy_of(model)
    assert anat.family == "tfx_gpt"
    assert anat.decoder_layers(model) == model.blocks()
    assert model.get_submodule(anat.layer_prefix(1)) is model.layers["1"]
    parts = anat.attention(model.layers["0"])
    assert parts.q is model.layers["0"].attn.q_proj and parts.o is model.layers["0"].attn.o_proj
    assert (parts.n_heads, parts.n_kv_heads, parts.head_dim) == (2, 2, 16)
    assert anat.mlp(model.layers["0"]).up is model.layers["0"].mlp.fc
    assert anat.embeddings(model).token is model.tok_emb and anat.head(model) is model.head
    assert anat.tied(model)


def test_pipeline_stage_keeps_original_layer_names():
    model = tiny_gpt()
    del model.layers["0"]  # what a pipeline stage that owns only layer 1 does
    names = [n for n, _ in anatomy_of(model).named_decoder_layers(model)]
    assert names == ["layers.1"]


@pytest.mark.parametrize("build, per_layer", [(tiny_llama, 7), (tiny_gpt2, 4), (tiny_gpt, 6)])
def test_block_linears(build, per_layer):
    model = build()
    anat = anatomy_of(model)
    linears = anat.block_linears(model)
    assert len(linears) == 2 * per_layer
    for name, module in linears:
        assert model.get_submodule(name) is module
        assert name.startswith(anat.layer_prefix(0) + ".") or name.startswith(anat.layer_prefix(1) + ".")
    assert anat.head(model) not in [m for _, m in linears]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_gpt])
def test_logits_and_hidden(build):
    model = build()
    anat = anatomy_of(model)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        logits, hidden = anat.logits_and_hidden(model, ids)
        direct = model(ids) if isinstance(model, GPT) else model(input_ids=ids).logits
        # the hidden state is the one the head reads: after the final norm
        from_hidden = anat.head(model)(hidden)
    torch.testing.assert_close(logits, direct)
    torch.testing.assert_close(from_hidden, logits, rtol=1e-5, atol=1e-5)
    assert hidden.shape == (2, 12, anat.embeddings(model).token.weight.shape[1])


def test_anatomy_sees_through_wrappers():
    class DDPLike(nn.Module):  # DDP itself needs a process group; same attribute
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = tiny_llama()
    compiled = torch.compile(model)  # lazy: nothing compiles until called
    for wrapped in (compiled, DDPLike(model), DDPLike(compiled)):
        anat = anatomy_of(wrapped)
        assert anat.family == "hf_llama"
        assert anat.decoder_layers(wrapped) == list(model.model.layers)
        assert [n for n, _ in anat.block_linears(wrapped)] == [n for n, _ in anat.block_linears(model)]


def test_unknown_family_names_the_class():
    with pytest.raises(ConfigError) as err:
        anatomy_of(nn.Sequential(nn.Linear(2, 2)))
    assert "Sequential" in one_line(err)


# --- loading from a local folder ---------------------------------------------------

@pytest.fixture
def llama_folder(tmp_path):
    folder = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_load_causal_lm_pretrained_gives_the_saved_weights(llama_folder):
    ref = tiny_llama().state_dict()
    model = load_causal_lm(str(llama_folder))
    assert not model.training and type(model).__name__ == "LlamaForCausalLM"
    got = model.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)
    assert model.config._attn_implementation == "sdpa"
    half = load_causal_lm(str(llama_folder), dtype="bfloat16", attn_implementation="eager")
    assert next(half.parameters()).dtype == torch.bfloat16
    assert half.config._attn_implementation == "eager"


def test_load_causal_lm_random_init_keeps_config_only(llama_folder):
    ref = tiny_llama()
    torch.manual_seed(123)
    model = load_causal_lm(str(llama_folder), pretrained=False)
    assert model.config.to_dict()["num_key_value_heads"] == 2
    assert model.config.num_hidden_layers == ref.config.num_hidden_layers
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in ref.state_dict().items()}
    w, w_ref = model.model.layers[0].self_attn.q_proj.weight, ref.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(w, w_ref)


def test_bad_dtype_is_one_line(llama_folder):
    with pytest.raises(ConfigError) as err:
        load_causal_lm(str(llama_folder), dtype="float8")
    assert "float8" in one_line(err)


# --- tokenizers -------------------------------------------------------------------

def test_tokenizer_id_depends_on_content_not_location(llama_folder, tmp_path):
    tok = load_tokenizer(str(llama_folder))
    copy = tmp_path / "elsewhere"
    tok.save_pretrained(copy)
    same = {tokenizer_id(tok), tokenizer_id(load_tokenizer(str(copy))), tokenizer_id(llama_folder),
            tokenizer_id(copy / "tokenizer.json"), tokenizer_id(tok.backend_tokenizer)}
    assert len(same) == 1 and next(iter(same)).startswith("tok-")
    other = tiny_tokenizer(vocab_size=300, text="a different corpus of words entirely")
    assert tokenizer_id(other) not in same


def test_pretrained_tokenizer_kind_wraps_the_hf_tokenizer(llama_folder, tmp_path):
    hf = load_tokenizer(str(llama_folder))
    cfg = TokenizerConfig(kind="pretrained", name=str(llama_folder))
    tok = build_tokenizer(cfg, train_texts=())
    text = "the lazy fox jumps"
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    assert tok.encode_batch([text, "dog"]) == [tok.encode(text), tok.encode("dog")]
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == hf.convert_tokens_to_ids("<|endoftext|>")
    assert tok.vocab_size == len(hf)
    tok.save(tmp_path / "tokenizer.json")
    back = load_tfx_tokenizer(tmp_path / "tokenizer.json")
    assert back.encode(text) == tok.encode(text) and back.eos_id == tok.eos_id
    assert tokenizer_cache_id(cfg) == tok.id == back.id == tokenizer_id(hf)
    assert tokenizer_cache_id(TokenizerConfig(kind="bpe")) is None


def test_pretrained_tokenizer_kind_errors_are_data_errors(tmp_path):
    with pytest.raises(DataError) as err:
        build_tokenizer(TokenizerConfig(kind="pretrained"), train_texts=())
    assert "data.tokenizer.name" in one_line(err)
    with pytest.raises(DataError) as err:
        build_tokenizer(TokenizerConfig(kind="pretrained", name=str(tmp_path / "nope")), ())
    assert "does not exist" in one_line(err)


# --- bad input: one line, nothing written ---------------------------------------------

def test_hub_id_offline_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "cache"
    for load in (load_causal_lm, load_tokenizer):
        with pytest.raises(ConfigError) as err:
            load("tfx-test/surely-not-cached-model", cache_dir=cache)
        msg = one_line(err)
        assert "tfx-test/surely-not-cached-model" in msg and "no network" in msg
        assert "local folder" in msg
    assert not cache.exists()


@pytest.mark.parametrize("path", ["/no/such/model/folder", "./missing-model-dir", "~/nope/a/b"])
def test_missing_folder_is_one_line(path, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError) as err:
        load_causal_lm(path, cache_dir=cache)
    assert path in one_line(err) and "does not exist" in str(err.value)
    assert not cache.exists()


def test_missing_gguf_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_causal_lm(str(tmp_path / "absent.gguf"))
    assert "absent.gguf" in one_line(err)


def test_gguf_without_gguf_package_is_one_line(monkeypatch, tmp_path):
    gguf = tmp_path / "model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF not really")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    before = sorted(tmp_path.iterdir())
    for call in (lambda: load_causal_lm(str(gguf)), lambda: load_tokenizer(str(gguf)),
                 lambda: load_causal_lm(str(tmp_path), gguf_file=gguf.name)):
        with pytest.raises(ConfigError) as err:
            call()
        assert "pip install gguf" in one_line(err)
    assert sorted(tmp_path.iterdir()) == before


# --- the real model (slow: downloads ~93 MB once and builds a 0.5 GB folder) ---------

HELD_OUT = """\
She should have died hereafter;
There would have been a time for such a word.
To-morrow, and to-morrow, and to-morrow,
Creeps in this petty pace from day to day,
To the last syllable of recorded time;
And all our yesterdays have lighted fools
The way to dusty death. Out, out, brief candle!
Life's but a walking shadow, a poor player,
That struts and frets his hour upon the stage,
And then is heard no more. It is a tale
Told by an idiot, full of sound and fury,
Signifying nothing.

Once more unto the breach, dear friends, once more;
Or close the wall up with our English dead.
In peace there's nothing so becomes a man
As modest stillness and humility:
But when the blast of war blows in our ears,
Then imitate the action of the tiger;
Stiffen the sinews, summon up the blood,
Disguise fair nature with hard-favour'd rage;
Then lend the eye a terrible aspect;
Let it pry through the portage of the head
Like the brass cannon; let the brow o'erwhelm it
As fearfully as doth a galled rock
O'erhang and jutty his confounded base,
Swill'd with the wild and wasteful ocean.
"""


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return math.exp(nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item())


@pytest.fixture(scope="module")
def smollm2_folder():
    return ensure_smollm2(Path(os.path.expanduser(_MODEL_CACHE)))


@pytest.mark.slow
def test_smollm2_folder_and_anatomy(smollm2_folder):
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (smollm2_folder / name).is_file()
    assert ensure_smollm2(smollm2_folder.parents[1]) == smollm2_folder  # second call: cached
    model = load_causal_lm(SMOLLM2_PRESET, cache_dir=smollm2_folder.parents[1])
    anat = anatomy_of(model)
    assert anat.family == "hf_llama" and anat.n_layers(model) == 30 and anat.tied(model)
    parts = anat.attention(anat.decoder_layers(model)[0])
    assert (parts.n_heads, parts.n_kv_heads, parts.head_dim) == (9, 3, 64)
    assert model.config.vocab_size == 49152 and len(anat.block_linears(model)) == 30 * 7


@pytest.mark.slow
def test_smollm2_perplexity_far_below_random(smollm2_folder):
    tok = build_tokenizer(TokenizerConfig(kind="pretrained", name=str(smollm2_folder)), ())
    hf = load_tokenizer(str(smollm2_folder))
    assert tok.encode(HELD_OUT) == hf.encode(HELD_OUT, add_special_tokens=False)
    assert tok.eos_id == hf.convert_tokens_to_ids("<|endoftext|>") and tok.vocab_size == 49152
    ids = torch.tensor([tok.encode(HELD_OUT)])
    assert 250 <= ids.shape[1] <= 512
    ppl = perplexity(load_causal_lm(str(smollm2_folder)), ids)
    torch.manual_seed(0)
    ppl_random = perplexity(load_causal_lm(str(smollm2_folder), pretrained=False), ids)
    print(f"SmolLM2 ppl {ppl:.1f}, random init {ppl_random:.0f} on {ids.shape[1]} tokens")
    assert ppl < 60 and ppl_random > 1000
