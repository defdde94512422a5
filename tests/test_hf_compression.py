"""Compression of Hugging Face models (Llama in SmolLM2's shape with GQA, GPT-2 with its
transposed Conv1D projections): pruning masks, N:M, structured pruning, PTQ, QAT,
low-rank and sparse storage on the block Linears found through the model anatomy, each
against an independent reference (numpy masks, zero-masked units, hand-written
quantizers, numpy's SVD); exports that save_pretrained / reload; refusals in validate;
pruning schedules in fractions of trainer.max_steps.

Tiny random models keep it fast; the trainer runs use the tiny Llama of tests/hf_utils.py.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from conftest import tiny as tiny_gpt_cfg  # noqa: E402
from hf_utils import hf_cfg, save_tiny_gpt2, save_tiny_llama, tiny_llama_config  # noqa: E402
from conftest import one_line  # noqa: E402
from tfx.compression import (LowRank, MagnitudePruning, NMPruning, PostTrainingQuant, QAT,  # noqa: E402
                             StructuredPruning, apply_lowrank, load_compressed_state, load_sparse,
                             magnitude_prune, make_permanent, nm_prune, quantize_model, save_sparse,
                             sparsity)
from tfx.compression._common import block_linears, pruned_state_dict, weight_matrix  # noqa: E402
from tfx.compression.quantize import convert_qat, prepare_qat  # noqa: E402
from tfx.compression.structured import _head_rows, select_units, shrink  # noqa: E402
from tfx.core import ConfigError, Pipeline, Plan, RunContext, StepInfo  # noqa: E402
from tfx.model import GPT, CausalLM, GPTConfig, HFModel  # noqa: E402
from tfx.model.anatomy import anatomy_of, spec_block_linears, unwrap  # noqa: E402

VOCAB = 320


pytestmark = pytest.mark.usefixtures("one_thread")


def _scaled(lm, scale=8.0):
    """Block weights ~N(0, 0.16) instead of HF's N(0, 0.02): removing a unit then moves
    the logits far more than round-off, so the exactness checks can fail."""
    with torch.no_grad():
        for _, m in block_linears(lm):
            m.weight.mul_(scale)
    return lm


def llama(seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return CausalLM(_scaled(LlamaForCausalLM(tiny_llama_config()).eval()))


def gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=128)
    return CausalLM(_scaled(GPT2LMHeadModel(cfg).eval()))


BUILDERS = {"llama": llama, "gpt2": gpt2}
X = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model, x=X):
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("hfc") / "tiny-llama")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("hfc") / "tiny-gpt2")


# -- the modules compressed -------------------------------------------------------------
@pytest.mark.parametrize("family, expect", [
    ("llama", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    ("gpt2", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"])])
def test_block_linears_are_the_decoder_projections(family, expect):
    model = BUILDERS[family]()
    names = [n for n, _ in block_linears(model)]
    prefix = "lm.model.layers" if family == "llama" else "lm.transformer.h"
    assert names == [f"{prefix}.{i}.{e}" for i in range(2) for e in expect]
    assert all(f"{n}.weight" in model.state_dict() for n in names)  # the built model's keys
    assert not any("embed" in n or "wte" in n or "lm_head" in n for n in names)


# -- unstructured and N:M masks vs numpy -------------------------------------------------
@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_masks_match_numpy(family, scope):
    model = BUILDERS[family]()
    ref = copy.deepcopy(model)
    dense = {n: weight_matrix(m).detach().numpy().copy() for n, m in block_linears(model)}
    head = unwrap(model).lm_head.weight.detach().clone()
    got = magnitude_prune(model, 0.6, scope)

    def threshold(arrays):  # the k-th smallest |w|: exactly k weights are <= it
        flat = np.sort(np.concatenate([np.abs(a).ravel() for a in arrays]))
        return flat[round(0.6 * flat.size) - 1]

    thr = threshold(dense.values())
    with torch.no_grad():
        for name, mod in block_linears(model):
            t = thr if scope == "global" else threshold([dense[name]])
            expect = np.abs(dense[name]) > t
            mask = weight_matrix(mod, mod.weight_mask).numpy().astype(bool)
            assert (mask == expect).all(), name
            ref.get_submodule(name).weight.copy_(weight_matrix(mod, torch.from_numpy(dense[name] * expect)))
    assert got == pytest.approx(0.6, abs=1e-3)
    torch.testing.assert_close(logits(model), logits(ref), atol=1e-5, rtol=1e-5)
    assert torch.equal(unwrap(model).lm_head.weight, head)  # the (tied) head is left alone


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_nm_masks_match_numpy(family):
    model = BUILDERS[family]()
    dense = {n: weight_matrix(m).detach().numpy().copy() for n, m in block_linears(model)}
    assert nm_prune(model, 2, 4) == pytest.approx(0.5)
    for name, mod in block_linears(model):
        w = dense[name]  # (out, in): groups of 4 consecutive inputs of every output row
        groups = np.abs(w).reshape(w.shape[0], -1, 4)
        order = np.argsort(-groups, axis=-1)[..., :2]
        expect = np.zeros_like(groups, dtype=bool)
        np.put_along_axis(expect, order, True, axis=-1)
        mask = weight_matrix(mod, mod.weight_mask).numpy().astype(bool)
        assert (mask == expect.reshape(w.shape)).all(), name
        assert (weight_matrix(mod).detach().numpy() == w * expect.reshape(w.shape)).all()


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_sparse_storage_round_trip_and_permanent_masks(family, tmp_path):
    model = BUILDERS[family]()
    magnitude_prune(model, 0.7)
    info = save_sparse(model, tmp_path / "m.tfxs")
    loaded = load_sparse(tmp_path / "m.tfxs")
    ref = pruned_state_dict(model.state_dict())
    assert loaded.keys() == ref.keys() and all(torch.equal(loaded[k], ref[k]) for k in ref)
    # the exact size: per pruned weight a bitmask and the non-zeros, the rest dense, the
    # tied head stored once (as in tests/test_compression.py)
    pruned = {f"{n}.weight" for n, _ in block_linears(model)}
    seen, expect = set(), info["header_bytes"]
    for k, t in ref.items():
        if t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        bitmask = (t.numel() + 7) // 8 + 4 * int((t != 0).sum())
        expect += min(bitmask, 4 * t.numel()) if k in pruned or (t.dim() >= 2 and bitmask < 4 * t.numel()) \
            else 4 * t.numel()
    assert info["bytes"] == expect
    fresh = load_compressed_state(BUILDERS[family](seed=5), loaded)
    assert fresh.lm.lm_head.weight is unwrap(fresh).get_input_embeddings().weight  # still tied
    torch.testing.assert_close(logits(fresh), logits(model))
    make_permanent(model)
    assert model.lm.state_dict().keys() == BUILDERS[family]().lm.state_dict().keys()
    assert sparsity(model) == pytest.approx(0.7, abs=1e-3)


# -- structured pruning -----------------------------------------------------------------
def _masked(model, keep):
    """The same network with the removed query heads, KV heads and neurons zeroed in
    place (weights and biases of the rows they own, the columns that read them),
    written against the HF module names, not through the anatomy."""
    lm = unwrap(model)
    with torch.no_grad():
        if lm.config.model_type == "llama":
            hd, g = lm.config.head_dim, lm.config.num_attention_heads // lm.config.num_key_value_heads
            for i, layer in enumerate(lm.model.layers):
                heads = keep[str(i)]["heads"]
                q_off = torch.ones(layer.self_attn.q_proj.out_features, dtype=torch.bool)
                q_off[_head_rows(heads, hd)] = False
                kv_off = torch.ones(layer.self_attn.k_proj.out_features, dtype=torch.bool)
                kv_off[_head_rows(torch.unique(heads // g), hd)] = False
                layer.self_attn.q_proj.weight[q_off] = 0
                layer.self_attn.k_proj.weight[kv_off] = 0
                layer.self_attn.v_proj.weight[kv_off] = 0
                layer.self_attn.o_proj.weight[:, q_off] = 0
                n_off = torch.ones(layer.mlp.up_proj.out_features, dtype=torch.bool)
                n_off[keep[str(i)]["neurons"]] = False
                layer.mlp.up_proj.weight[n_off] = 0
                layer.mlp.gate_proj.weight[n_off] = 0
                layer.mlp.down_proj.weight[:, n_off] = 0
        else:  # GPT-2: Conv1D weights are (in, out); c_attn's output is [q | k | v]
            d, hd = lm.config.n_embd, lm.config.n_embd // lm.config.n_head
            for i, block in enumerate(lm.transformer.h):
                off = torch.ones(d, dtype=torch.bool)
                off[_head_rows(keep[str(i)]["heads"], hd)] = False
                qkv_off = off.repeat(3)
                block.attn.c_attn.weight[:, qkv_off] = 0
                block.attn.c_attn.bias[qkv_off] = 0
                block.attn.c_proj.weight[off] = 0
                n_off = torch.ones(block.mlp.c_fc.nf, dtype=torch.bool)
                n_off[keep[str(i)]["neurons"]] = False
                block.mlp.c_fc.weight[:, n_off] = 0
                block.mlp.c_fc.bias[n_off] = 0
                block.mlp.c_proj.weight[n_off] = 0
    return model


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_structured_equals_zero_masked_units(family):
    base = BUILDERS[family]()
    keep = select_units(base, head_ratio=0.5, neuron_ratio=0.5)
    small = shrink(copy.deepcopy(base), keep)
    masked = _masked(copy.deepcopy(base), keep)
    out = logits(small)
    torch.testing.assert_close(out, logits(masked), atol=1e-5, rtol=1e-5)
    assert (out - logits(base)).abs().max() > 1e-2  # units really were removed
    anat, layer = anatomy_of(small), unwrap(small).get_submodule(anatomy_of(small).layer_prefix(0))
    a = anat.attention(layer)
    if family == "llama":  # GQA 6/2: one KV group and its 3 query heads stay
        assert (a.n_heads, a.n_kv_heads, a.kv_groups) == (3, 1, 3)
        assert keep["0"]["heads"].tolist() in ([0, 1, 2], [3, 4, 5])
        cfg = unwrap(small).config
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (3, 1, 64)
        assert small.architecture_change() is None  # an ordinary Llama again
    else:
        assert a.n_heads == 1 and layer.attn.split_size == 16
        assert "n_embd / n_head" in anat.sync_config(unwrap(small))
        assert small.architecture_change() is not None


def test_structured_llama_saves_pretrained_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = llama()
    tech = StructuredPruning(head_ratio=0.5, neuron_ratio=0.25)
    Pipeline([tech]).apply_to_model(model, RunContext())
    assert tech.shapes["0"] == {"heads": 3, "d_ff": 96}
    back = AutoModelForCausalLM.from_pretrained(model.export_pretrained(tmp_path / "hf"))
    assert (back.config.num_attention_heads, back.config.num_key_value_heads,
            back.config.intermediate_size) == (3, 1, 96)
    torch.testing.assert_close(logits(CausalLM(back)), logits(model))
    # the tfx loader rebuilds the shapes from the state dict alone
    torch.testing.assert_close(logits(load_compressed_state(llama(seed=3), model.state_dict())), logits(model))


def test_gpt2_without_removed_heads_keeps_an_hf_config(tmp_path):
    """Only MLP neurons removed: GPT-2's config follows (n_inner) and save_pretrained
    round-trips; the same neurons are removed in every layer."""
    from transformers import AutoModelForCausalLM

    model = gpt2()
    keep = select_units(model, head_ratio=0.0, neuron_ratio=0.25)
    shrink(model, keep)
    assert unwrap(model).config.n_inner == 96 and model.architecture_change() is None
    back = AutoModelForCausalLM.from_pretrained(model.export_pretrained(tmp_path / "hf"))
    torch.testing.assert_close(logits(CausalLM(back)), logits(model))


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_heterogeneous_structure_reloads_through_the_tfx_loader(family):
    """Layers of different sizes fit no HF config: architecture_change says so, and
    load_compressed_state rebuilds them from the state dict."""
    model = BUILDERS[family]()
    keep = select_units(model, head_ratio=0.5, neuron_ratio=0.5)
    keep["1"] = select_units(model, 0.0, 0.25)["1"]  # layer 1 keeps all heads, 3/4 of its neurons
    shrink(model, keep)
    assert anatomy_of(model).sync_config(unwrap(model)) is not None
    assert model.architecture_change() is not None
    fresh = load_compressed_state(BUILDERS[family](seed=4), model.state_dict())
    torch.testing.assert_close(logits(fresh), logits(model))


# -- low-rank vs Eckart-Young --------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_lowrank_is_the_truncated_svd(family):
    model = BUILDERS[family]()
    ref = copy.deepcopy(model)
    dense = {n: weight_matrix(m).detach().double().numpy() for n, m in block_linears(model)}
    ranks = apply_lowrank(model, rank_ratio=0.5)
    assert ranks.keys() == dense.keys()
    with torch.no_grad():
        for name, w in dense.items():
            r = ranks[name]
            assert r == math.ceil(0.5 * min(w.shape))
            seq = model.get_submodule(name)
            prod = (seq[1].weight @ seq[0].weight).double().numpy()
            u, s, vh = np.linalg.svd(w, full_matrices=False)
            best = (u[:, :r] * s[:r]) @ vh[:r]  # Eckart-Young: the best rank-r approximation
            np.testing.assert_allclose(prod, best, atol=1e-5)
            assert np.linalg.norm(w - prod) == pytest.approx(np.sqrt((s[r:] ** 2).sum()), rel=1e-4)
            ref.get_submodule(name).weight.copy_(weight_matrix(ref.get_submodule(name), torch.from_numpy(best)))
    torch.testing.assert_close(logits(model), logits(ref), atol=1e-4, rtol=1e-4)
    assert model.architecture_change() is not None  # saved in tfx's format
    fresh = load_compressed_state(BUILDERS[family](seed=6), model.state_dict())
    torch.testing.assert_close(logits(fresh), logits(model))
    full = BUILDERS[family]()
    expect = logits(full)
    apply_lowrank(full, rank_ratio=1.0)
    torch.testing.assert_close(logits(full), expect, atol=1e-4, rtol=1e-4)


# -- quantization vs hand-written quantizers --------------------------------------------------
def _int8_rows(w, scale):
    """Symmetric int8 per output row: q = clamp(round(w / s), -128, 127), w ~ q s."""
    return torch.clamp(torch.round(w / scale), -128, 127) * scale


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_ptq_int8_weight_only_matches_hand_dequantized_weights(family):
    model = BUILDERS[family]()
    ref = copy.deepcopy(model)
    dense = {n: weight_matrix(m).detach().clone() for n, m in block_linears(model)}
    q = quantize_model(copy.deepcopy(model), "int8_weight_only")
    targets = dict(block_linears(q))
    assert targets.keys() == dense.keys()
    with torch.no_grad():
        for name, w in dense.items():
            qw = targets[name].weight
            assert isinstance(targets[name], nn.Linear) and type(qw) is not torch.Tensor, name
            # torchao's scale: max |w| of the row / 127.5 (the int8 range's half-width)
            torch.testing.assert_close(qw.scale.reshape(-1), w.abs().amax(1) / 127.5, rtol=1e-6, atol=0)
            deq, got = _int8_rows(w, qw.scale.reshape(-1, 1)), qw.dequantize()
            # a row's largest |w| sits at +-127.5 steps: torchao and torch.round may round
            # it to different sides of the tie; everywhere else the grids agree exactly
            tie = w.abs() == w.abs().amax(1, keepdim=True)
            assert torch.equal(got[~tie], deq[~tie]), name
            assert ((got - deq)[tie].abs() <= qw.scale.expand_as(w)[tie] * 1.001).all(), name
            ref.get_submodule(name).weight.copy_(weight_matrix(ref.get_submodule(name), got))
    torch.testing.assert_close(logits(q), logits(ref), atol=1e-4, rtol=1e-4)
    assert type(unwrap(q).lm_head.weight) in (torch.Tensor, nn.Parameter)  # the head stays float


def _fake_quant_act(x):
    """torchao's int8 per-token asymmetric fake quantizer, written out (range includes 0)."""
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 255
    zero = torch.round(-128 - lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, -128, 127) - zero) * scale


def _fake_quant_weight(w, scheme, group_size):
    """(fake-quantized weight, its step per element, where |w| is its group's maximum)."""
    groups = w.reshape(w.shape[0], -1, w.shape[1] if scheme == "int8" else group_size)
    top = groups.abs().amax(-1, keepdim=True)
    scale = top / (127.5 if scheme == "int8" else 7.5)  # symmetric: per row / per group of inputs
    lo, hi = (-128, 127) if scheme == "int8" else (-8, 7)
    fq = torch.clamp(torch.round(groups / scale), lo, hi) * scale
    return (fq.reshape(w.shape), scale.expand_as(groups).reshape(w.shape),
            (groups.abs() == top).reshape(w.shape))


class _Reference(nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.w, self.b = weight, bias

    def forward(self, x):
        return F.linear(_fake_quant_act(x), self.w, self.b)


@pytest.mark.parametrize("scheme, group_size", [("int8", 32), ("int8a_int4w", 16)])
def test_qat_on_llama_matches_hand_fake_quantization(scheme, group_size):
    model = llama()
    ref = copy.deepcopy(model)
    prepare_qat(model, scheme, group_size)
    fakes = [(n, m) for n, m in block_linears(model) if type(m).__name__ == "FakeQuantizedLinear"]
    assert len(fakes) == 14 and model.state_dict().keys() == ref.state_dict().keys()
    with torch.no_grad():
        for name, mod in fakes:
            got = mod.weight_fake_quantizer(mod.weight)
            want, step, tie = _fake_quant_weight(mod.weight, scheme, group_size)
            # a group's largest |w| sits on a rounding tie (+-127.5 or +-7.5 steps), which
            # torchao may round to the other side; everywhere else the grids agree exactly
            assert torch.equal(got[~tie], want[~tie]), name
            assert ((got - want)[tie].abs() <= step[tie] * 1.001).all(), name
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, _Reference(got, mod.bias))
            x = torch.randn(3, mod.in_features)
            assert torch.equal(mod.activation_fake_quantizer(x), _fake_quant_act(x)), name
    fq = logits(model)
    torch.testing.assert_close(fq, logits(ref), atol=1e-5, rtol=1e-5)
    # converted: weights on the same grid, activations quantized by the int8 kernel
    conv = logits(convert_qat(copy.deepcopy(model), scheme, group_size))
    assert (conv - fq).abs().max() < 0.05 * fq.abs().max()


# -- refusals in validate -------------------------------------------------------------------
def test_widths_are_known_before_any_weight(llama_dir, gpt2_dir):
    shapes = spec_block_linears(HFModel(str(llama_dir)))
    assert shapes[:7] == [("model.layers.0.self_attn.q_proj", 48, 48), ("model.layers.0.self_attn.k_proj", 48, 16),
                          ("model.layers.0.self_attn.v_proj", 48, 16), ("model.layers.0.self_attn.o_proj", 48, 48),
                          ("model.layers.0.mlp.gate_proj", 48, 128), ("model.layers.0.mlp.up_proj", 48, 128),
                          ("model.layers.0.mlp.down_proj", 128, 48)]
    assert spec_block_linears(HFModel(str(gpt2_dir)))[0] == ("transformer.h.0.attn.c_attn", 32, 96)
    assert spec_block_linears(GPTConfig(n_layer=1, d_model=40, n_head=2))[-1] == ("layers.0.mlp.proj", 160, 40)


def test_bad_widths_and_schedules_refuse_in_validate(llama_dir, gpt2_dir):
    spec = HFModel(str(llama_dir))

    def refuse(tech, match, model=spec, max_steps=160):
        with pytest.raises(ConfigError, match=match) as err:
            Pipeline([tech]).validate(Plan([tech], model=model, max_steps=max_steps))
        return one_line(err)

    msg = refuse(NMPruning(n=2, m=32), r"compression\.nm\.m=32 does not divide in_features=48")
    assert "hf_llama" in msg and "divisor of 16" in msg
    refuse(NMPruning(n=2, m=32), "in_features=40", model=GPTConfig(d_model=40, n_head=2))
    refuse(QAT(scheme="int8a_int4w", group_size=32), r"compression\.qat\.group_size=32 does not divide")
    refuse(QAT(), "Conv1D", model=HFModel(str(gpt2_dir)))
    refuse(NMPruning(semi_structured=True), "Conv1D", model=HFModel(str(gpt2_dir)))
    refuse(MagnitudePruning(end_step=500), r"end_step resolves to step 500, past trainer\.max_steps=160")
    refuse(NMPruning(at_step=200), "at_step resolves to step 200")
    refuse(MagnitudePruning(), "schedule=oneshot", max_steps=0)  # nothing to spread a cubic schedule over
    with pytest.raises(ConfigError, match="end_step > start_step"):
        MagnitudePruning(start_step=0.9, end_step=0.5)
    for ok in (NMPruning(), QAT(scheme="int8a_int4w", group_size=16), QAT(), PostTrainingQuant(),
               MagnitudePruning(), MagnitudePruning(schedule="oneshot"), LowRank(), StructuredPruning()):
        ok.validate(Plan([ok], model=spec, max_steps=160))
    MagnitudePruning(schedule="oneshot").validate(Plan([], model=spec, max_steps=0))


def test_validate_refuses_before_data_preparation(llama_dir, tmp_path, monkeypatch):
    import tfx.train.build as build_mod

    def no_data(*a, **k):
        raise AssertionError("data was prepared before validate refused")

    monkeypatch.setattr(build_mod, "_prepare_data", no_data)
    cfg = hf_cfg(llama_dir, "compression=nm", "compression.nm.m=32")
    with pytest.raises(ConfigError, match="compression.nm.m=32"):
        build_mod.build(cfg, tmp_path)


# -- schedules in fractions of trainer.max_steps ------------------------------------------------
def _tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, d_model=32))


def _masks_per_step(tech, max_steps):
    """Train a tiny GPT with ``tech``; the masks after every optimizer step."""
    ctx = RunContext(max_steps=max_steps)
    model = Pipeline([tech]).apply_to_model(_tiny_gpt(), ctx)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    out = []
    for step in range(max_steps):
        x = torch.randint(0, 64, (4, 16), generator=g)
        F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
        opt.step()
        opt.zero_grad()
        tech.after_optimizer_step(model, StepInfo(step=step + 1), ctx)
        out.append([m.weight_mask.clone() for _, m in block_linears(model)])
    return out


def test_fraction_schedule_equals_absolute_steps():
    frac = MagnitudePruning(sparsity=0.8, start_step=0.1, end_step=0.75, frequency=0.1)
    steps = MagnitudePruning(sparsity=0.8, start_step=2, end_step=15, frequency=2)
    assert frac.schedule_steps(20) == steps.schedule_steps(20) == (2, 15, 2)
    assert [frac.target_at(s, 20) for s in range(21)] == [steps.target_at(s, 20) for s in range(21)]
    for a, b in zip(_masks_per_step(frac, 20), _masks_per_step(steps, 20)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_default_prune_preset_reaches_its_target(tmp_path, pydocs_data):
    """compression=prune with only sparsity set: fractions of the run by default, so the
    target is reached whatever trainer.max_steps is (at 0.8 of it; 128 of the default 160)."""
    from conftest import compose
    from hydra.utils import instantiate

    from tfx.ckpt import load_run
    from tfx.train.run import train

    preset = instantiate(compose(["compression=prune", "compression.prune.sparsity=0.8"]).compression.prune)
    assert preset.schedule_steps(160) == (0, 128, 8) and preset.target_at(128, 160) == pytest.approx(0.8)
    cfg = tiny_gpt_cfg("compression=prune", "compression.prune.sparsity=0.8", "trainer.max_steps=10")
    summary = train(cfg, tmp_path, data=pydocs_data)
    assert summary["prune/sparsity"] == pytest.approx(0.8, abs=1e-3)
    model, _ = load_run(tmp_path)  # measured on the saved weights, masks folded
    assert sparsity(make_permanent(model)) == pytest.approx(0.8, abs=1e-3)


# -- through the trainer on the tiny Llama: exports ---------------------------------------------
@pytest.fixture(scope="module")
def llama_data(llama_dir):
    from tfx.config import model_spec, use_model_tokenizer
    from tfx.data import prepare_data

    cfg = hf_cfg(llama_dir)
    use_model_tokenizer(cfg, model_spec(cfg))
    return prepare_data(cfg.data)


@pytest.mark.parametrize("option, extra", [
    ("prune", ["compression.prune.sparsity=0.6"]),
    ("nm", []),
    ("structured", ["compression.structured.head_ratio=0.5"]),
    ("lowrank", ["compression.lowrank.rank_ratio=0.5"]),
    ("ptq", ["compression.ptq.scheme=int8_weight_only"]),
    ("qat", ["compression.qat.scheme=int8a_int4w", "compression.qat.group_size=16"]),
])
def test_trained_hf_model_exports_and_reloads(option, extra, llama_dir, llama_data, tmp_path):
    """What keeps the architecture (masks folded; structured with its config updated;
    PTQ/QAT's float weights) is saved with save_pretrained and reloads with
    AutoModelForCausalLM; low-rank fits no Llama config and reloads through tfx's
    loaders. Same logits; each technique's own artefact is written."""
    from transformers import AutoModelForCausalLM

    from tfx.ckpt import load_run
    from tfx.train.run import train

    summary = train(hf_cfg(llama_dir, f"compression={option}", *extra), tmp_path, data=llama_data)
    model, _ = load_run(tmp_path)
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    if option == "lowrank":
        assert "hf_model" not in summary and "differ" in summary["hf_model_skipped"]
        assert summary["lowrank/param_ratio"] < 1
        fresh = load_compressed_state(HFModel(str(llama_dir)).build(300, 32), model.state_dict())
        torch.testing.assert_close(logits(fresh, x), logits(model, x))
        return
    back = CausalLM(AutoModelForCausalLM.from_pretrained(summary["hf_model"]))
    if option == "qat":  # the trained float weights; the quantized model is model_qat_*.pt
        assert (tmp_path / "model_qat_int8a_int4w.pt").exists()
        sd = back.state_dict()
        assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
        return
    torch.testing.assert_close(logits(back, x), logits(make_permanent(model), x))
    w = torch.cat([weight_matrix(m).flatten() for _, m in block_linears(back)])
    if option == "prune":
        assert summary["prune/sparsity"] == pytest.approx(0.6, abs=1e-3)
        assert (w == 0).float().mean().item() == pytest.approx(0.6, abs=1e-3)
    elif option == "nm":
        assert all((weight_matrix(m).reshape(-1, 4) != 0).sum(1).max() <= 2 for _, m in block_linears(back))
    elif option == "structured":
        assert back.lm.config.num_attention_heads == 3 and back.lm.config.num_key_value_heads == 1
    else:
        assert (tmp_path / "model_int8_weight_only.pt").exists() and summary["ptq/int8_weight_only/size_ratio"] < 1
    if option in ("prune", "nm"):  # the sparse file reloads into a freshly built model
        fresh = load_compressed_state(HFModel(str(llama_dir)).build(300, 32),
                                      load_sparse(tmp_path / "model_sparse.tfxs"))
        torch.testing.assert_close(logits(fresh, x), logits(back, x))


def test_compressed_export_of_an_hf_model_reloads(tmp_path):
    from tfx.compression import CompressedExport, load_compressed

    model = llama()
    magnitude_prune(model, 0.5)
    CompressedExport(dtype="fp32", zstd_level=3).export(model, tmp_path, RunContext())
    fresh = load_compressed_state(llama(seed=7), load_compressed(tmp_path / "model.tfxz"))
    torch.testing.assert_close(logits(fresh), logits(model))


@pytest.mark.parametrize("option, extra", [
    ("prune", ["compression.prune.sparsity=0.6"]),
    ("structured", ["compression.structured.head_ratio=0.5", "compression.structured.neuron_ratio=0.5"]),
])
def test_trained_gpt2_exports_and_reloads(option, extra, gpt2_dir, llama_data, tmp_path):
    """GPT-2 (same tokenizer as the tiny Llama, so the same data): masks fold into a
    save_pretrained folder; with heads removed its config cannot follow, so the run
    says why and reloads through tfx's loaders."""
    from transformers import AutoModelForCausalLM

    from tfx.ckpt import load_run
    from tfx.train.run import train

    summary = train(hf_cfg(gpt2_dir, f"compression={option}", *extra), tmp_path, data=llama_data)
    model, _ = load_run(tmp_path)
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    if option == "prune":
        back = CausalLM(AutoModelForCausalLM.from_pretrained(summary["hf_model"]))
        torch.testing.assert_close(logits(back, x), logits(make_permanent(model), x))
        assert sparsity(back) == pytest.approx(0.6, abs=1e-3)
        return
    assert "hf_model" not in summary and "shape" in summary["hf_model_skipped"]
    assert anatomy_of(model).attention(unwrap(model).transformer.h[0]).n_heads == 1
    fresh = load_compressed_state(HFModel(str(gpt2_dir)).build(300, 32), model.state_dict())
    torch.testing.assert_close(logits(fresh, x), logits(model, x))
