"""FLOPs per token (one formula, tfx.flops), HFU's recompute share, peaks, MFU/HFU in
the summary and the metrics. References: a count of every matmul by hand, and
torch's own ``torch.utils.flop_counter.FlopCounterMode`` on a real forward+backward."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny
from tfx.flops import Flops, gpu_peak, measure_matmul_flops, peak_flops, recompute_flops_per_token
from tfx.log import read_jsonl
from tfx.memory.activation_ckpt import apply_activation_checkpointing
from tfx.model.gpt import GPTConfig
from tfx.train.run import train

V, T, L, D, F, H = 64, 16, 2, 32, 96, 4   # vocab, seq_len, layers, width, MLP width, heads
B = 3


def gpt(dropout=0.0, d_ff=F):
    torch.manual_seed(0)
    return GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, d_model=D, d_ff=d_ff,
                     dropout=dropout).build(V, T)


def hand_count(d=D, f=F, n_layer=L, vocab=V, t=T, pairs=None):
    """Training FLOPs per token, every matmul counted by hand (2 FLOPs per multiply-add,
    backward = 2 x forward)."""
    per_layer = {"q": d * d, "k": d * d, "v": d * d, "o": d * d, "fc": d * f, "proj": f * d}
    head = d * vocab                                   # tied to tok_emb: the lookup is free
    weights = n_layer * sum(per_layer.values()) + head
    pairs = t * (t + 1) / 2 if pairs is None else pairs  # causal: query i sees keys 0..i
    # per sequence: QK^T and AV each take d multiply-adds per (query, key) pair
    attention_fwd_per_token = n_layer * 2 * (2 * d * pairs) / t
    return 3 * (2 * weights) + 3 * attention_fwd_per_token


def measured_matmul_flops(model, batch=B):
    """FLOPs per token of aten.mm/bmm in one forward+backward, as torch counts them."""
    idx = torch.randint(0, V, (batch, T))
    with FlopCounterMode(display=False) as counter:
        model(idx).float().pow(2).mean().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    return {k: v / (batch * T) for k, v in counts.items()}


def test_gpt_flops_per_token_is_the_hand_count():
    model = gpt()
    assert model.flops_per_token(T) == hand_count()
    assert model.flops_per_token(2 * T) == hand_count(t=2 * T)
    # the matmul part equals what torch's FLOP counter sees (its CPU SDPA is not counted)
    weights = L * (4 * D * D + 2 * D * F) + D * V
    assert measured_matmul_flops(model) == {"aten.mm": 6 * weights}


def test_sparse_attention_counts_only_the_pairs_it_keeps():
    from tfx.attention.patterns import SlidingWindow
    from tfx.attention.technique import apply_sparse_attention

    window = 5
    model = apply_sparse_attention(gpt(), SlidingWindow(window=window))
    pairs = sum(min(i + 1, window) for i in range(T))  # query i sees keys max(0, i-w+1)..i
    assert model.flops_per_token(T) == pytest.approx(hand_count(pairs=pairs), rel=1e-12)
    assert model.flops_per_token(T) < gpt().flops_per_token(T)


def test_layers_argument_counts_those_blocks_without_the_head():
    model = gpt()
    one = model.flops_per_token(T, layers=[model.layers["0"]])
    assert one == (hand_count() - 6 * D * V) / L


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_full_checkpointing_recompute_is_what_torch_recomputes(dropout):
    """HFU's extra term against torch's FLOP counter: the matmuls a checkpointed
    forward+backward runs on top of the plain one. With dropout after the MLP, the
    whole forward is recomputed; without, torch's early stop skips the MLP's last
    projection. Attention (bmm on the math path that dropout selects) is recomputed
    too; torch counts its full T x T square, the formula the causal (T+1)/2T of it."""
    plain = measured_matmul_flops(gpt(dropout))
    model = apply_activation_checkpointing(gpt(dropout), "full")
    ckpt = measured_matmul_flops(model)
    recompute = recompute_flops_per_token(model, T)
    linears = L * (4 * D * D + 2 * D * F) - (0 if dropout else L * F * D)
    assert ckpt["aten.mm"] - plain["aten.mm"] == 2 * linears
    attention = recompute - 2 * linears
    assert attention == pytest.approx(L * 2 * 2 * D * (T + 1) / 2, rel=1e-12)
    if dropout:  # SDPA with dropout runs on the math path: bmm, counted by torch over T x T
        assert ckpt["aten.bmm"] - plain["aten.bmm"] == pytest.approx(attention * 2 * T / (T + 1))


def test_selective_checkpointing_recomputes_no_matmul():
    model = apply_activation_checkpointing(gpt(), "selective")
    assert measured_matmul_flops(model) == measured_matmul_flops(gpt())
    assert recompute_flops_per_token(model, T) == 0.0


def test_every_other_block_recomputes_half():
    full = recompute_flops_per_token(apply_activation_checkpointing(gpt(), "full"), T)
    half = recompute_flops_per_token(apply_activation_checkpointing(gpt(), "full", every=2), T)
    assert half == full / 2


def test_hfu_exceeds_mfu_by_the_recompute_share():
    model = apply_activation_checkpointing(gpt(), "full")
    per_token = model.flops_per_token(T)
    recompute = recompute_flops_per_token(model, T)
    flops = Flops(per_token, per_token + recompute, peak=1e12, devices=2)
    u = flops.utilization(tokens_per_sec=1000.0)
    assert u["mfu"] == per_token * 1000.0 / 2e12 and u["tflops"] == per_token * 1000.0 / 1e12
    assert u["hfu"] / u["mfu"] == pytest.approx(1 + recompute / per_token, rel=1e-12)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A function building tfx's wrapper of a tiny random HF Llama (2 layers)."""
    pytest.importorskip("transformers")
    from hf_utils import save_tiny_llama
    from tfx.model.hf import HFModel

    folder = save_tiny_llama(tmp_path_factory.mktemp("llama") / "llama")
    return lambda: HFModel(str(folder)).build(vocab_size=300, block_size=32)


def test_hf_llama_flops_per_token_is_the_hand_count(llama):
    model = llama()
    d, kv, f, vocab, t = 48, 2 * 8, 128, 320, 32   # hidden, KV width (2 heads x 8), MLP, vocab
    per_layer = d * d + d * kv + d * kv + d * d + 3 * d * f   # q, k, v, o; gate, up, down
    weights = 2 * per_layer + d * vocab                        # 2 layers + the (tied) head
    width = 6 * 8                                              # query heads x head_dim
    attention = 2 * 3 * 2 * (2 * width * t * (t + 1) / 2) / t   # layers x train x (QK, AV)
    assert model.flops_per_token(t) == 6 * weights + attention


def test_gpu_peak_table():
    assert gpu_peak("NVIDIA H100 80GB HBM3", "bf16")[0] == 989.4e12
    assert gpu_peak("NVIDIA H100 80GB HBM3", "fp8")[0] == 1978.9e12
    assert gpu_peak("NVIDIA H100 PCIe", "bf16")[0] == 756.5e12
    assert gpu_peak("NVIDIA A100-SXM4-80GB", "bf16")[0] == 312e12
    assert gpu_peak("NVIDIA L40S", "bf16")[0] == 362.05e12     # not the L4's
    assert gpu_peak("NVIDIA L4", "bf16")[0] == 121e12
    assert gpu_peak("NVIDIA A100-SXM4-80GB", "fp8") is None   # no fp8 on Ampere
    assert gpu_peak("NVIDIA GeForce RTX 4090", "bf16") is None
    assert "datasheet" in gpu_peak("NVIDIA H200", "bf16")[1]


def test_cpu_peak_is_measured_or_given():
    flops, source = peak_flops(torch.device("cpu"), "fp32")
    assert flops == measure_matmul_flops(torch.float32) and 0 < flops < math.inf  # cached probe
    assert source.startswith("measured: fp32 1024x1024 GEMM")
    assert peak_flops(torch.device("cpu"), "bf16", override_tflops=2.5) == (2.5e12, "trainer.peak_tflops=2.5")


def test_summary_and_metrics_report_mfu_and_hfu(tmp_path, pydocs_data):
    summary = train(tiny("memory=activation_ckpt", "trainer.peak_tflops=0.5", "trainer.max_steps=3"),
                    tmp_path, data=pydocs_data)
    assert summary["peak_tflops"] == 0.5 and summary["peak_source"] == "trainer.peak_tflops=0.5"
    assert summary["mfu"] == pytest.approx(summary["flops_per_token"] * summary["tokens_per_sec"] / 0.5e12)
    ratio = summary["hfu_flops_per_token"] / summary["flops_per_token"]
    assert ratio > 1 and summary["hfu"] / summary["mfu"] == pytest.approx(ratio)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/mfu" in r]
    assert len(rows) == 3 and all(r["train/hfu"] / r["train/mfu"] == pytest.approx(ratio) for r in rows)
    assert json.loads((tmp_path / "summary.json").read_text())["peak_dtype"] == "fp32"


def test_hf_llama_checkpointing_recompute_is_what_torch_recomputes(llama):
    def mm_per_token(model):
        idx = torch.randint(0, 300, (2, 32))
        with FlopCounterMode(display=False) as counter:
            model(idx).float().pow(2).mean().backward()
        return counter.get_flop_counts()["Global"][torch.ops.aten.mm] / idx.numel()

    plain = mm_per_token(llama())
    model = apply_activation_checkpointing(llama(), "full")
    extra = mm_per_token(model) - plain
    d, kv, f = 48, 16, 128
    recomputed = 2 * (2 * d * d + 2 * d * kv + 2 * d * f)  # 2 layers: q, k, v, o, gate, up; not down
    assert extra == 2 * recomputed
    attention = 2 * 2 * 2 * (6 * 8) * 33 / 2                # 2 layers x (QK, AV) forward, causal
    assert recompute_flops_per_token(model, 32) == 2 * recomputed + attention


def test_hf_sparse_attention_counts_its_density(llama):
    """On an HF model the attention FLOPs shrink by the sliding window's density, and
    the weight FLOPs stay: the count follows the pattern set by attention=..."""
    from tfx.attention import apply_sparse_attention
    from tfx.attention.patterns import SlidingWindow

    t, window = 32, 8
    dense, sparse = llama(), apply_sparse_attention(llama(), SlidingWindow(window))
    kept = sum(min(i + 1, window) for i in range(t))         # causal pairs inside the window
    width = 6 * 8
    per_pair = 2 * 3 * 2 * 2 * width / t                     # layers x train x (QK, AV) x MAC
    assert dense.flops_per_token(t) - sparse.flops_per_token(t) == pytest.approx(
        per_pair * (t * (t + 1) / 2 - kept))


def test_frozen_weights_count_four_flops_and_lora_hfu_is_consistent(llama):
    """LoRA: the frozen base weights get no weight gradient (4 FLOPs per weight, not 6);
    the adapters count 6. Checkpointing recomputes the forward: 2 per weight either way."""
    from tfx.compression import apply_lora

    t = 32
    full = llama()
    lora = llama()
    apply_lora(lora, rank=4, alpha=8, target_modules=["q_proj"])
    base = full.flops_per_token(t)
    d, r, layers = 48, 4, 2
    frozen = sum(p.numel() for n, p in lora.named_parameters()
                 if not p.requires_grad and p.dim() == 2 and "embed" not in n)  # matmul weights only
    adapters = layers * r * (d + d)                                           # q_proj: A (r x d), B (d x r)
    head = 320 * d  # tied head: the embedding weight is frozen too, its matmul counts 4
    assert lora.flops_per_token(t) == pytest.approx(base - 2 * (frozen + head) + 6 * adapters)
    assert full.flops_per_token(t, forward_only=True) == pytest.approx(base / 3)


def test_cpu_peak_remeasured_at_the_end_keeps_the_higher(monkeypatch):
    """A first probe taken under load (too low a peak, MFU over 100%) is replaced by the
    end-of-run probe when that one is higher; never lowered; table peaks untouched."""
    import tfx.flops as flops_mod

    probes = iter([3e11, 1e11])
    monkeypatch.setattr(flops_mod.measure_matmul_flops, "__wrapped__", lambda dtype: next(probes))
    low = Flops(per_token=1e6, hardware_per_token=1e6, peak=1e11,
                peak_source="measured: fp32 1024x1024 GEMM, best of 3 x 0.1 s, 2 threads")
    again = low.remeasured()
    assert again.peak == 3e11 and again.utilization(1e5)["mfu"] == pytest.approx(1e11 / 3e11)
    assert again.remeasured().peak == 3e11  # the next probe (1e11) is lower: kept
    given = Flops(per_token=1e6, hardware_per_token=1e6, peak=1e11, peak_source="trainer.peak_tflops=0.1")
    assert given.remeasured() is given
