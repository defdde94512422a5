"""One-shot compression (Wanda, SparseGPT, GPTQ) against independent references:
numpy sorts for masks, least squares for the OBS update, a naive per-column GPTQ with
explicit inverses, and the models' own forwards for the layer-by-layer driver."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tfx.compression.oneshot import (GPTQCompressor, LinearStats, SparseGPTCompressor,
                                     StatsCollector, WandaCompressor, calibration_batches,
                                     compress_sequential, compressible_modules, gptq_quantize,
                                     magnitude_mask, rtn_quantize, sparsegpt_prune, wanda_mask,
                                     weight_matrix)
from tfx.core.errors import ConfigError
from tfx.model import GPT, GPTConfig


# -- data ----------------------------------------------------------------------------
def correlated_inputs(n_tokens: int, d: int, seed: int = 0) -> torch.Tensor:
    """Tokens x features with strongly correlated features of unequal scale (like LLM
    activations), float64."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    mix += torch.eye(d, dtype=torch.float64) * 0.3
    scale = torch.exp(torch.randn(d, generator=g, dtype=torch.float64))
    return (torch.randn(n_tokens, d, generator=g, dtype=torch.float64) @ mix) * scale


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.T @ x


def out_err(w: torch.Tensor, w_new: torch.Tensor, x: torch.Tensor) -> float:
    """||W X^T - W' X^T||_F."""
    return float(torch.linalg.norm((w.double() - w_new.double()) @ x.T))


def rand_weight(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


# -- statistics ----------------------------------------------------------------------
def test_running_hessian_over_uneven_batches_equals_full_batch():
    x = correlated_inputs(23, 8).float()
    stats = LinearStats(8)
    for part in (x[:3].view(1, 3, 8), x[3:10].view(7, 8), x[10:11], x[11:].view(2, 6, 8)):
        stats.add(part)
    xd = x.double()
    assert stats.n_tokens == 23
    torch.testing.assert_close(stats.hessian, hessian_of(xd))
    torch.testing.assert_close(stats.act_norm, torch.linalg.norm(xd, dim=0))


# -- masks ---------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_wanda_mask_is_top_k_of_score_per_row(sparsity):
    w = rand_weight(16, 64).float()
    norm = torch.rand(64, generator=torch.Generator().manual_seed(2)) * 3
    mask = wanda_mask(w, norm, sparsity=sparsity).numpy()
    score = np.abs(w.numpy()) * norm.numpy()[None, :]
    keep = 64 - int(np.floor(sparsity * 64))
    ref = np.zeros_like(mask)
    for r in range(16):
        ref[r, np.argsort(-score[r], kind="stable")[:keep]] = True
    np.testing.assert_array_equal(mask, ref)


def nm_reference(score: np.ndarray, n: int, m: int) -> np.ndarray:
    ref = np.zeros(score.shape, dtype=bool)
    for r in range(score.shape[0]):
        for g in range(0, score.shape[1], m):
            ref[r, g + np.argsort(-score[r, g:g + m])[:n]] = True
    return ref


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_masks_keep_n_best_of_every_m(n, m):
    w = rand_weight(8, 32).float()
    norm = torch.rand(32, generator=torch.Generator().manual_seed(3)) + 0.1
    mask = wanda_mask(w, norm, n=n, m=m)
    assert (mask.view(8, -1, m).sum(-1) == n).all()
    np.testing.assert_array_equal(
        mask.numpy(), nm_reference(np.abs(w.numpy()) * norm.numpy()[None], n, m))
    np.testing.assert_array_equal(magnitude_mask(w, n=n, m=m).numpy(),
                                  nm_reference(np.abs(w.numpy()), n, m))


def test_magnitude_mask_per_row_and_global():
    w = rand_weight(8, 16).float()
    per_row = magnitude_mask(w, sparsity=0.25)
    assert (per_row.sum(1) == 12).all()
    glob = magnitude_mask(w, sparsity=0.25, per_row=False)
    assert int(glob.sum()) == 96
    assert float(w.abs()[glob].min()) >= float(w.abs()[~glob].max())


@pytest.mark.parametrize("call,param", [
    (lambda w, h: wanda_mask(w, torch.ones(16), sparsity=1.0), "sparsity"),
    (lambda w, h: wanda_mask(w, torch.ones(16), sparsity=-0.1), "sparsity"),
    (lambda w, h: magnitude_mask(w, n=5, m=4), "n"),
    (lambda w, h: magnitude_mask(w, n=0, m=4), "n"),
    (lambda w, h: magnitude_mask(w, n=2, m=3), "m=3"),
    (lambda w, h: sparsegpt_prune(w, h, sparsity=1.5), "sparsity"),
    (lambda w, h: sparsegpt_prune(w, h, n=3, m=2), "n"),
    (lambda w, h: rtn_quantize(w, bits=4, group_size=5), "group_size"),
    (lambda w, h: gptq_quantize(w, h, bits=1), "bits"),
    (lambda w, h: gptq_quantize(w, h, bits=9), "bits"),
    (lambda w, h: gptq_quantize(w, h, group_size=0), "group_size"),
])
def test_bad_arguments_raise_one_line_config_error(call, param):
    w, h = rand_weight(4, 16), hessian_of(correlated_inputs(64, 16))
    with pytest.raises(ConfigError) as err:
        call(w, h)
    assert param in str(err.value) and "\n" not in str(err.value)


# -- SparseGPT -----------------------------------------------------------------------
@pytest.mark.parametrize("structure", [dict(sparsity=0.5), dict(n=2, m=4)])
def test_sparsegpt_error_not_above_magnitude(structure):
    x = correlated_inputs(512, 64)
    w = rand_weight(32, 64)
    new, mask = sparsegpt_prune(w, hessian_of(x), blocksize=16, **structure)
    assert (new[~mask] == 0).all()
    assert abs(float((~mask).double().mean()) - 0.5) < 1e-9
    if "m" in structure:
        assert ((new != 0).view(32, -1, 4).sum(-1) <= 2).all()
    mag = w * magnitude_mask(w, **structure)
    assert out_err(w, new, x) < out_err(w, mag, x)


def restricted_least_squares(w: np.ndarray, x: np.ndarray, q: int) -> np.ndarray:
    """Best row with w_q = 0, columns < q unchanged and columns > q free, by lstsq:
    minimise ||x (w - w')|| = ||x[:, q] w_q + x[:, F] (w_F - w'_F)||."""
    new = w.copy()
    new[q] = 0.0
    if q + 1 < len(w):
        delta, *_ = np.linalg.lstsq(x[:, q + 1:], x[:, q] * w[q], rcond=None)
        new[q + 1:] = w[q + 1:] + delta
    return new


def test_sparsegpt_fixed_mask_equals_least_squares_refit():
    x = correlated_inputs(200, 6, seed=4)
    w = rand_weight(4, 6, seed=5)
    pruned_col = [0, 2, 5, 3]
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[torch.arange(4), torch.tensor(pruned_col)] = False
    new, keep = sparsegpt_prune(w, hessian_of(x), mask=mask, percdamp=0.0)
    assert torch.equal(keep, mask)
    for r, q in enumerate(pruned_col):
        ref = restricted_least_squares(w[r].numpy(), x.numpy(), q)
        np.testing.assert_allclose(new[r].numpy(), ref, rtol=1e-7, atol=1e-9)
    # Column 0 pruned: nothing is frozen, so this is the textbook OBS update.
    hinv = torch.linalg.inv(hessian_of(x))
    obs = w[0] - w[0, 0] / hinv[0, 0] * hinv[:, 0]
    torch.testing.assert_close(new[0], obs)


def test_sparsegpt_unstructured_mask_uses_obs_saliency():
    # With one block the mask is chosen once, from w_ij^2 / [(H_FF)^-1]_jj where F are
    # the columns j.. still to be processed (computed here with explicit inverses).
    x = correlated_inputs(256, 16, seed=17)
    w, h = rand_weight(6, 16, seed=18), hessian_of(x)
    _, keep = sparsegpt_prune(w, h, sparsity=0.5, percdamp=0.0, blocksize=16)
    d = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(16)])
    score = (w.square() / d).flatten().numpy()
    ref = np.ones(96, dtype=bool)
    ref[np.argsort(score)[:48]] = False
    np.testing.assert_array_equal(keep.flatten().numpy(), ref)


def test_sparsegpt_lazy_blocks_do_not_change_the_result():
    x = correlated_inputs(256, 32, seed=6)
    w, h = rand_weight(8, 32, seed=7), hessian_of(x)
    mask = magnitude_mask(w, sparsity=0.5)
    a, _ = sparsegpt_prune(w, h, mask=mask, blocksize=3)
    b, _ = sparsegpt_prune(w, h, mask=mask, blocksize=128)
    torch.testing.assert_close(a, b)
    c, mc = sparsegpt_prune(w, h, n=2, m=4, blocksize=4)
    d, md = sparsegpt_prune(w, h, n=2, m=4, blocksize=128)
    assert torch.equal(mc, md)
    torch.testing.assert_close(c, d)


def test_dead_inputs_get_zero_weight():
    x = correlated_inputs(128, 16, seed=8)
    x[:, 3] = 0.0
    w = rand_weight(4, 16)
    new, _ = sparsegpt_prune(w, hessian_of(x), sparsity=0.25)
    q = gptq_quantize(w, hessian_of(x), bits=4, group_size=8)
    for result in (new, q.weight):
        assert torch.isfinite(result).all() and (result[:, 3] == 0).all()


# -- GPTQ ----------------------------------------------------------------------------
def assert_on_grid(q, bits: int, rows: int, cols: int, group_size: int):
    gs = cols if group_size == -1 else group_size
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2 ** bits - 1
    assert q.scales.shape == (rows, cols // gs) and q.zeros.shape == (rows, cols // gs)
    assert torch.equal(q.g_idx, torch.arange(cols) // gs)
    for g in range(cols // gs):
        cols_g = slice(g * gs, (g + 1) * gs)
        ref = (q.codes[:, cols_g].float() - q.zeros[:, g:g + 1].float()) * q.scales[:, g:g + 1]
        assert torch.equal(q.weight[:, cols_g], ref.to(q.weight.dtype))
    assert torch.equal(q.dequantize(), q.weight)


@pytest.mark.parametrize("bits,group_size,sym", [(4, 128, False), (3, 128, False),
                                                 (3, -1, False), (4, 64, True)])
def test_gptq_error_not_above_rtn_and_on_grid(bits, group_size, sym):
    x = correlated_inputs(1024, 256, seed=9)
    w = rand_weight(16, 256, seed=10).float()
    q = gptq_quantize(w, hessian_of(x), bits=bits, group_size=group_size, sym=sym)
    r = rtn_quantize(w, bits=bits, group_size=group_size, sym=sym)
    assert q.weight.dtype == torch.float32
    assert_on_grid(q, bits, 16, 256, group_size)
    assert_on_grid(r, bits, 16, 256, group_size)
    if sym:
        assert (q.zeros == 2 ** (bits - 1)).all()
    assert out_err(w, q.weight, x) < out_err(w, r.weight, x)


def test_gptq_act_order_static_groups():
    x = correlated_inputs(1024, 128, seed=11)
    w = rand_weight(16, 128, seed=12).float()
    q = gptq_quantize(w, hessian_of(x), bits=3, group_size=32, act_order=True)
    r = rtn_quantize(w, bits=3, group_size=32)
    assert_on_grid(q, 3, 16, 128, 32)
    # Static groups: each group's grid comes from the original weights, as RTN's does.
    assert torch.equal(q.scales, r.scales) and torch.equal(q.zeros, r.zeros)
    assert out_err(w, q.weight, x) < out_err(w, r.weight, x)


def naive_gptq_codes(w, h, scale, zero, maxq):
    """Column by column with an explicit inverse of the remaining Hessian each time."""
    w = w.clone()
    codes = torch.zeros_like(w)
    for i in range(w.shape[1]):
        hinv = torch.linalg.inv(h[i:, i:])
        c = (torch.round(w[:, i] / scale) + zero).clamp(0, maxq)
        err = w[:, i] - scale * (c - zero)
        w[:, i:] -= (err / hinv[0, 0]).unsqueeze(1) * hinv[0].unsqueeze(0)
        codes[:, i] = c
    return codes


def test_gptq_matches_naive_obs_sweep():
    x = correlated_inputs(300, 12, seed=13)
    w, h = rand_weight(3, 12, seed=14), hessian_of(x)
    q = gptq_quantize(w, h, bits=3, group_size=-1, percdamp=0.0, blocksize=5)
    ref = naive_gptq_codes(w, h, q.scales[:, 0].double(), q.zeros[:, 0].double(), 7)
    assert torch.equal(q.codes.double(), ref)


def test_gptq_act_order_matches_naive_sweep_in_permuted_order():
    x = correlated_inputs(300, 12, seed=19)
    w, h = rand_weight(3, 12, seed=20), hessian_of(x)
    q = gptq_quantize(w, h, bits=3, group_size=-1, percdamp=0.0, act_order=True)
    perm = torch.argsort(torch.diagonal(h), descending=True)
    ref = naive_gptq_codes(w[:, perm], h[perm][:, perm], q.scales[:, 0].double(),
                           q.zeros[:, 0].double(), 7)
    assert torch.equal(q.codes[:, perm].double(), ref)


def test_gptq_groups_across_lazy_blocks():
    x = correlated_inputs(512, 48, seed=15)
    w, h = rand_weight(6, 48, seed=16), hessian_of(x)
    a = gptq_quantize(w, h, bits=3, group_size=8, blocksize=3)
    b = gptq_quantize(w, h, bits=3, group_size=8, blocksize=128)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


# -- calibration windows -------------------------------------------------------------
def test_calibration_batches_draw_disjoint_windows():
    stream = torch.arange(1000)
    batches = calibration_batches(stream, n_samples=5, seq_len=64, seed=3, batch_size=2)
    assert [b.shape for b in batches] == [(2, 64), (2, 64), (1, 64)]
    rows = torch.cat(batches)
    assert (rows[:, 1:] - rows[:, :-1] == 1).all()  # contiguous slices of the stream
    assert len(set(rows.flatten().tolist())) == 5 * 64  # no overlap
    again = calibration_batches(stream.numpy(), n_samples=5, seq_len=64, seed=3, batch_size=2)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


def test_calibration_batches_from_token_blocks_of_small_ints():
    from tfx.data.blocks import TokenBlocks

    blocks = TokenBlocks(np.arange(1000, dtype=np.uint16), seq_len=64)
    (batch,) = calibration_batches(blocks, n_samples=3, seq_len=32, seed=0, batch_size=3)
    assert batch.dtype == torch.int64 and batch.shape == (3, 32)
    assert (batch[:, 1:] - batch[:, :-1] == 1).all()


def test_calibration_batches_too_few_tokens():
    with pytest.raises(ConfigError) as err:
        calibration_batches(torch.arange(100), n_samples=4, seq_len=32, seed=0)
    assert "n_samples" in str(err.value) and "\n" not in str(err.value)


# -- layer-by-layer driver -----------------------------------------------------------
def tiny_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, d_model=32))
    return model, list(model.layers.values())


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model, list(model.model.layers)


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                  n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    return model, list(model.transformer.h)


def decoder_layers(model):
    return list(model.layers.values()) if isinstance(model, GPT) else list(model.model.layers)


FAMILIES = {"tfx_gpt": tiny_gpt, "hf_llama": tiny_llama, "hf_gpt2": tiny_gpt2}


def calib():
    return calibration_batches(torch.randint(64, (2000,), generator=torch.Generator()
                                             .manual_seed(1)), 4, 16, seed=0, batch_size=2)


def logits(model, batch):
    return model(batch) if isinstance(model, GPT) else model(batch, use_cache=False).logits


def layer_outputs(model, layers, batches):
    """Each layer's output on each batch in the model's own forward."""
    outs = {i: [] for i in range(len(layers))}
    hooks = [layer.register_forward_hook(
        lambda mod, a, o, i=i: outs[i].append((o[0] if isinstance(o, tuple) else o).detach()))
        for i, layer in enumerate(layers)]
    with torch.no_grad():
        for b in batches:
            logits(model, b)
    for h in hooks:
        h.remove()
    return outs


def own_stats(model, layers, batches):
    modules = [m for i, layer in enumerate(layers)
               for m in compressible_modules(layer, f"{i}.")]
    with StatsCollector(modules) as coll, torch.no_grad():
        for b in batches:
            logits(model, b)
    return coll.stats


class Recorder:
    """No-op compressor that keeps a copy of the statistics it is given."""
    needs_hessian = True

    def __init__(self, inner=None):
        self.inner, self.stats = inner, {}

    def __call__(self, name, module, stats):
        self.stats[name] = (stats.hessian.clone(), stats.act_sq_norm.clone())
        return self.inner(name, module, stats) if self.inner else None


@pytest.mark.parametrize("family", FAMILIES)
def test_noop_driver_reproduces_the_models_own_layer_inputs_and_outputs(family):
    model, layers = FAMILIES[family]()
    batches = calib()
    ref_out = layer_outputs(model, layers, batches)
    ref_stats = own_stats(model, layers, batches)
    seen = {i: [] for i in range(len(layers))}
    hooks = [layer.register_forward_hook(
        lambda mod, a, o, i=i: seen[i].append(o[0] if isinstance(o, tuple) else o))
        for i, layer in enumerate(layers)]
    rec = Recorder()
    report = compress_sequential(model, layers, batches, rec, progress=False)
    for h in hooks:
        h.remove()
    for i in range(len(layers)):
        assert len(seen[i]) >= len(batches)
        for k, out in enumerate(seen[i]):  # every layer call of the driver, batch order
            torch.testing.assert_close(out, ref_out[i][k % len(batches)])
        assert report[i]["rel_err"] == 0.0 and report[i]["sparsity"] == 0.0
    names = list(rec.stats)
    assert len(names) == len(ref_stats)
    for name, (ref_name, ref) in zip(names, ref_stats.items()):
        assert name.endswith(ref_name.split(".", 1)[1])
        torch.testing.assert_close(rec.stats[name][0], ref.hessian)
        torch.testing.assert_close(rec.stats[name][1], ref.act_sq_norm)


@pytest.mark.parametrize("family", FAMILIES)
def test_wanda_half_sparsity_in_every_linear_and_model_runs(family):
    model, layers = FAMILIES[family]()
    batches = calib()
    wanda = WandaCompressor(sparsity=0.5)
    report = compress_sequential(model, layers, batches, wanda, progress=False)
    linears = [(n, m) for layer in layers for n, m in compressible_modules(layer)]
    assert len(wanda.masks) == len(linears) > 0
    for _, module in linears:
        w = weight_matrix(module)
        assert ((w == 0).sum(1) == w.shape[1] // 2).all()  # 50% of every output row
    for info in report.values():
        assert info["sparsity"] == 0.5 and 0 < info["rel_err"] < 1
        assert all(li["sparsity"] == 0.5 for li in info["linears"].values())
    with torch.no_grad():
        assert torch.isfinite(logits(model, batches[0])).all()


@pytest.mark.parametrize("family", ["tfx_gpt", "hf_llama"])
def test_second_layer_stats_come_from_the_compressed_first_layer(family):
    model, layers = FAMILIES[family]()
    dense = copy.deepcopy(model)
    batches = calib()
    rec = Recorder(WandaCompressor(sparsity=0.5))
    compress_sequential(model, layers, batches, rec, progress=False)
    # Manual two-pass reference: a dense model with only layer 0 compressed.
    half = copy.deepcopy(dense)
    decoder_layers(half)[0].load_state_dict(layers[0].state_dict())
    ref = own_stats(half, decoder_layers(half)[1:], batches)
    dense_ref = own_stats(dense, decoder_layers(dense)[1:], batches)
    layer1 = [n for n in rec.stats if ".1." in n]
    assert len(layer1) == len(ref)
    for name, r, d in zip(layer1, ref.values(), dense_ref.values()):
        torch.testing.assert_close(rec.stats[name][0], r.hessian)
        assert not torch.allclose(rec.stats[name][0], d.hessian, rtol=1e-3, atol=0)


def test_sparsegpt_and_gptq_through_the_driver():
    model, layers = tiny_gpt()
    batches = calib()
    sgpt = SparseGPTCompressor(n=2, m=4)
    compress_sequential(model, layers, batches, sgpt, progress=False)
    for layer in layers:
        for _, m in compressible_modules(layer):
            w = weight_matrix(m)
            assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all()
    model, layers = tiny_gpt()
    gptq = GPTQCompressor(bits=4, group_size=16)
    report = compress_sequential(model, layers, batches, gptq, progress=False)
    qualified = dict(model.named_modules())
    assert set(gptq.results) == {n for n, m in qualified.items()
                                 if isinstance(m, nn.Linear) and n.startswith("layers.")}
    for name, result in gptq.results.items():
        assert torch.equal(qualified[name].weight, result.weight)
    assert all(0 < info["rel_err"] < 0.5 for info in report.values())
