"""Sparse attention on Hugging Face models through transformers' attention interface.

The reference is independent of tfx's kernels: the pattern's boolean mask written out
from its definition (Python loops), given as a 4-D mask to the same model running
transformers' own SDPA attention (which repeats the KV heads itself under GQA). The
tiny Llama has GQA (6 query heads, 2 KV heads); GPT-2 has a fused qkv and its own
scaling (including ``scale_attn_by_inverse_layer_idx``)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from conftest import GradRecorder, one_line, pattern_allows  # noqa: E402
from hf_utils import hf_cfg, save_tiny_llama, tiny_llama_config  # noqa: E402
from tfx.attention import (BlockSparseAttention, FixedBlockSparse, GlobalLocal, GlobalLocalAttention,  # noqa: E402
                           SlidingWindow, SlidingWindowAttention, apply_sparse_attention, make_kernel)
from tfx.core import ConfigError, Plan, RunContext  # noqa: E402

TILE = 8
PATTERNS = {"sliding_window": SlidingWindow(window=7),
            "block_sparse": FixedBlockSparse(block=8, stride=5),
            "global_local": GlobalLocal(window=6, n_global=3)}
TECHNIQUES = {"sliding_window": SlidingWindowAttention(window=7, tile=TILE),
              "block_sparse": BlockSparseAttention(block=8, stride=5, tile=TILE),
              "global_local": GlobalLocalAttention(window=6, n_global=3, tile=TILE)}


def definition_mask(pattern, T: int) -> torch.Tensor:
    """(T, T) bool, True = attend, from each pattern's definition (not its mask_mod)."""
    return torch.tensor([[pattern_allows(pattern, i, j) for j in range(T)] for i in range(T)])


def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def tiny_gpt2(**kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=320, n_positions=128,
                                      **kw)).eval()


def logits_and_grads(model, ids, **kwargs):
    model.zero_grad()
    logits = model(input_ids=ids, use_cache=False, **kwargs).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def masked_reference(model, ids, pattern):
    """The model on transformers' SDPA path with the pattern as an explicit 4-D mask."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("sdpa")
    mask = definition_mask(pattern, ids.shape[1])[None, None].expand(ids.shape[0], 1, -1, -1)
    return logits_and_grads(ref, ids, attention_mask=mask)


# --- the kernels: grouped-query attention and the caller's scale -------------------------

@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("impl", ["blocked", "dense_mask"])
@pytest.mark.parametrize("T", [5, 16, 37])
def test_gqa_kernels_equal_masked_sdpa_with_repeated_kv(name, impl, T):
    """3 query heads per KV head, scale 0.3: outputs and gradients w.r.t. q, k, v equal
    SDPA on explicitly repeated K/V with the definition mask (float64)."""
    pattern, g = PATTERNS[name], 3
    gen = torch.Generator().manual_seed(T)
    q = torch.randn(2, 6, T, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, T, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(2, 6, T, 4, generator=gen, dtype=torch.float64)

    def run(fn):
        out = fn(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    mask = definition_mask(pattern, T)
    ref = run(lambda q, k, v: F.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask, scale=0.3))
    kernel = make_kernel(pattern, impl, tile=TILE)
    got = run(lambda q, k, v: kernel.attend(q, k, v, scale=0.3))
    for r, x, what in zip(ref, got, ("out", "dq", "dk", "dv")):
        torch.testing.assert_close(x, r, rtol=1e-10, atol=1e-10, msg=f"{name} {impl} T={T}: {what}")


def test_gqa_layout_scores_keys_once_per_kv_head():
    """The grouped layout stacks the query heads of a KV head on the tile's rows: the
    keys each query is scored against stay those of the ungrouped layout."""
    kernel = make_kernel(SlidingWindow(32), "blocked", tile=16)
    plain, grouped = kernel.layout(256), kernel.layout(256, groups=3)
    assert grouped.keys_per_query == plain.keys_per_query == 48
    assert grouped.mask.shape == (1, 16, 3 * 16, 48)
    assert torch.equal(grouped.mask.view(1, 16, 3, 16, 48), plain.mask[:, :, None].expand(-1, -1, 3, -1, -1))


# --- HF models: logits and gradients equal the masked reference ---------------------------

@pytest.mark.parametrize("name", TECHNIQUES)
def test_llama_equals_masked_sdpa_reference(name):
    tech, pattern = TECHNIQUES[name], PATTERNS[name]
    model = tiny_llama()
    ids = torch.randint(0, 320, (2, 29), generator=torch.Generator().manual_seed(1))
    dense_logits, _ = logits_and_grads(model, ids)
    ref_logits, ref_grads = masked_reference(model, ids, pattern)
    keys = set(model.state_dict())
    tech.apply_to_model(model, RunContext())
    assert model.config._attn_implementation == f"tfx_{name}_" + {
        "sliding_window": "window7", "block_sparse": "block8_stride5",
        "global_local": "window6_n_global3"}[name] + "_auto_tile8"
    assert set(model.state_dict()) == keys  # no parameter changed: checkpoints interchange
    logits, grads = logits_and_grads(model, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)
    assert not torch.allclose(logits, dense_logits, atol=1e-3)  # really not dense


@pytest.mark.parametrize("inverse_layer_scale", [False, True])
def test_gpt2_equals_masked_sdpa_reference(inverse_layer_scale):
    """GPT-2 goes through the same interface; its per-layer ``scaling`` is honoured."""
    pattern = PATTERNS["global_local"]
    model = tiny_gpt2(scale_attn_by_inverse_layer_idx=inverse_layer_scale)
    ids = torch.randint(0, 320, (2, 29), generator=torch.Generator().manual_seed(2))
    ref_logits, ref_grads = masked_reference(model, ids, pattern)
    apply_sparse_attention(model, pattern, tile=TILE)
    logits, grads = logits_and_grads(model, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_generate_with_kv_cache_equals_recomputing():
    """Decoding with a cache (one query, many keys) keeps the pattern: greedy generation
    equals re-running the whole prefix through the masked reference at every step."""
    pattern = PATTERNS["sliding_window"]
    model = apply_sparse_attention(tiny_llama(), pattern, tile=TILE)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("sdpa")
    prompt = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    x = prompt
    with torch.no_grad():
        for _ in range(6):
            mask = definition_mask(pattern, x.shape[1])[None, None]
            x = torch.cat([x, ref(input_ids=x, attention_mask=mask, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, x)


def test_padding_and_prepared_masks_are_refused_in_one_line():
    model = apply_sparse_attention(tiny_llama(), PATTERNS["sliding_window"], tile=TILE)
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        ones = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert torch.equal(plain, ones)  # an all-ones mask is no padding
        padded = torch.ones_like(ids)
        padded[0, :3] = 0
        with pytest.raises(ConfigError) as err:
            model(input_ids=ids, attention_mask=padded)
        assert "padding" in one_line(err) and "attention=sliding_window" in str(err.value)
        with pytest.raises(ConfigError) as err:
            model(input_ids=ids, attention_mask=torch.ones(2, 1, 12, 12, dtype=torch.bool))
        assert "prepared attention mask" in one_line(err)
        # packed sequences (position ids restarting) ask for a non-causal mask: refused too
        pos = torch.cat([torch.arange(6), torch.arange(6)])[None].expand(2, -1)
        with pytest.raises(ConfigError) as err:
            model(input_ids=ids, position_ids=pos, use_cache=False)
        assert "plain causal" in one_line(err)


# --- through the trainer, and back from a checkpoint ---------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("hf_attn") / "tiny-llama")


def test_train_and_reload_keep_the_pattern(llama_dir, tmp_path):
    """attention=sliding_window on model=hf: the first step's gradients equal those of
    impl=dense_mask (SDPA with the pattern's mask) and differ from dense ones; the
    trained run reloads (load_run, as evaluate.py does) with the same attention: its
    logits equal the masked reference on the reloaded weights."""
    from tfx.ckpt import load_run
    from tfx.train.build import build
    from tfx.train.run import train

    sw = ("attention=sliding_window", "attention.window=7", "attention.tile=8")

    def first_grads(*extra, run):
        rec = GradRecorder()
        job = build(hf_cfg(llama_dir, *extra), tmp_path / run, extra_techniques=[rec])
        job.trainer.train_step()
        return job, rec.grads[0]

    job, got = first_grads(*sw, run="blocked")
    lm = job.model.lm
    assert lm.config._attn_implementation == "tfx_sliding_window_window7_auto_tile8"
    _, masked = first_grads(*sw, "attention.impl=dense_mask", run="masked")
    _, dense = first_grads(run="dense")
    for n in masked:
        torch.testing.assert_close(got[n], masked[n], rtol=1e-5, atol=1e-6, msg=n)
    assert any(not torch.allclose(got[n], dense[n], atol=1e-5) for n in dense)

    train(hf_cfg(llama_dir, *sw, "trainer.max_steps=2", "trainer.ckpt_every=2"), tmp_path / "run")
    model, _ = load_run(tmp_path / "run")
    assert model.lm.config._attn_implementation == "tfx_sliding_window_window7_auto_tile8"
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mask = definition_mask(PATTERNS["sliding_window"], 32)[None, None].expand(2, 1, -1, -1)
        ref = copy.deepcopy(model.lm)
        ref.set_attn_implementation("sdpa")
        torch.testing.assert_close(model(ids), ref(input_ids=ids, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-5)


# --- validate -------------------------------------------------------------------------------

def test_validate_accepts_hf_llama_and_gpt2_specs():
    for family in ("hf_llama", "hf_gpt2"):
        spec = SimpleNamespace(family=family, config=SimpleNamespace())
        for tech in TECHNIQUES.values():
            tech.validate(Plan([tech], model=spec))


@pytest.mark.parametrize("config, needle", [
    (SimpleNamespace(layer_types=["sliding_attention", "full_attention"]), "layer_types"),
    (SimpleNamespace(sliding_window=4096), "sliding_window=4096"),
])
def test_validate_refuses_a_model_with_its_own_window(config, needle):
    tech = TECHNIQUES["global_local"]
    with pytest.raises(ConfigError) as err:
        tech.validate(Plan([tech], model=SimpleNamespace(family="hf_llama", config=config)))
    assert needle in one_line(err) and "attention=dense" in str(err.value)
    # a window switched off (Qwen2's use_sliding_window=false) is no clash
    tech.validate(Plan([tech], model=SimpleNamespace(
        family="hf_llama", config=SimpleNamespace(sliding_window=4096, use_sliding_window=False,
                                                  layer_types=["full_attention"]))))


def test_validate_refuses_unknown_families():
    tech = TECHNIQUES["sliding_window"]
    with pytest.raises(ConfigError) as err:
        tech.validate(Plan([tech], model=SimpleNamespace(family=None, config=None)))
    assert "attention=dense" in one_line(err)


def test_apply_refuses_a_kernel_that_is_not_tfx_sparse():
    from tfx.model import DenseCausalAttention

    with pytest.raises(ConfigError) as err:
        apply_sparse_attention(tiny_llama(), DenseCausalAttention())
    assert "DenseCausalAttention" in one_line(err)


def test_kernel_names_are_distinct_per_setting():
    from tfx.attention import hf_attention_name

    names = {hf_attention_name(make_kernel(p, impl, tile)) for p in PATTERNS.values()
             for impl in ("auto", "blocked", "dense_mask") for tile in (8, 16)}
    assert len(names) == 3 * (2 * 2 + 1)  # dense_mask has no tile
    assert not any("/" in n for n in names)  # a "/" would make transformers look for a hub kernel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward needs CUDA")
@pytest.mark.parametrize("name", PATTERNS)
def test_flex_gqa_with_scale_on_cuda(name):
    """impl=auto picks FlexAttention on CUDA: GQA (enable_gqa) and the caller's scale."""
    pattern, T, g = PATTERNS[name], 300, 3
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, T, 16, generator=gen).cuda().requires_grad_()
    k, v = (torch.randn(2, 2, T, 16, generator=gen).cuda().requires_grad_() for _ in range(2))
    grad_out = torch.randn(2, 6, T, 16, generator=gen).cuda()

    def run(fn):
        out = fn(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    mask = definition_mask(pattern, T).cuda()
    ref = run(lambda q, k, v: F.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask, scale=0.2))
    got = run(lambda q, k, v: make_kernel(pattern, "auto").attend(q, k, v, scale=0.2))
    for r, x in zip(ref, got):
        torch.testing.assert_close(x, r, rtol=2e-3, atol=2e-3)
