"""Sparse attention (issue 5): the blocked kernel equals SDPA with the same mask, and skips work."""
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import pattern_allows
from tfx.attention import (BlockedSparseKernel, BlockSparseAttention, FixedBlockSparse, GlobalLocal,
                           GlobalLocalAttention, SlidingWindow, SlidingWindowAttention,
                           apply_sparse_attention, make_kernel)
from tfx.core import ConfigError, Plan, RunContext
from tfx.model import GPT, DenseCausalAttention, GPTConfig

CONF = Path(__file__).resolve().parents[1] / "conf" / "attention"
TILE = 16
PATTERNS = {
    "sliding_window": SlidingWindow(window=24),
    "block_sparse": FixedBlockSparse(block=16, stride=8),
    "block_sparse_unaligned": FixedBlockSparse(block=12, stride=5),
    "global_local": GlobalLocal(window=20, n_global=4),
}


def qkv(T, B=2, H=2, D=8, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(T)
    return [torch.randn(B, H, T, D, generator=g, dtype=dtype).to(device).requires_grad_() for _ in range(3)]


def out_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out.to(out.device)))


@pytest.mark.parametrize("name", PATTERNS)
def test_mask_matches_definition(name):
    pattern, T = PATTERNS[name], 40
    expected = torch.tensor([[pattern_allows(pattern, i, j) for j in range(T)] for i in range(T)])
    assert torch.equal(pattern.mask(T), expected)
    assert pattern.mask(T).diagonal().all()  # no empty rows


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("T", [40, 97])
def test_tile_mask_and_columns_cover_the_mask(name, T):
    pattern = PATTERNS[name]
    n = math.ceil(T / TILE)
    padded = F.pad(pattern.mask(T), (0, n * TILE - T, 0, n * TILE - T))
    needed = padded.view(n, TILE, n, TILE).any(3).any(1)
    covered = pattern.tile_mask(n, TILE).clone()
    covered[:, pattern.columns(T) // TILE] = True
    assert not (needed & ~covered).any()


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("T", [1, 5, 16, 37, 100, 161])
def test_blocked_equals_masked_sdpa(name, T):
    """Output and gradients w.r.t. q, k, v, float64, T below / at / off multiples of the tile."""
    pattern = PATTERNS[name]
    q, k, v = qkv(T)
    ref = out_and_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=pattern.mask(T)),
                        q, k, v)
    got = out_and_grads(BlockedSparseKernel(pattern, tile=TILE), q, k, v)
    for r, g, what in zip(ref, got, ("out", "dq", "dk", "dv")):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=f"{name} T={T}: {what} differs")


@pytest.mark.parametrize("name", PATTERNS)
def test_dense_mask_kernel_is_the_reference(name):
    pattern, T = PATTERNS[name], 50
    q, k, v = qkv(T)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=pattern.mask(T))
    torch.testing.assert_close(make_kernel(pattern, "dense_mask")(q, k, v), ref)


@pytest.mark.parametrize("pattern,first", [(SlidingWindow(24), 24), (FixedBlockSparse(16, 8), 16),
                                           (GlobalLocal(20, 4), 20)])
def test_first_tokens(pattern, first):
    """Token 0 sees only itself; the first tokens, still inside the window/block, see everything."""
    q, k, v = qkv(70)
    out = BlockedSparseKernel(pattern, tile=TILE)(q, k, v)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])
    dense = DenseCausalAttention()(q, k, v)
    torch.testing.assert_close(out[:, :, :first], dense[:, :, :first])
    assert not torch.allclose(out[:, :, first:], dense[:, :, first:])


@pytest.mark.parametrize("T", [1, 10, 64, 75])
def test_window_at_least_T_is_dense_causal(T):
    q, k, v = qkv(T)
    ref = out_and_grads(DenseCausalAttention(), q, k, v)
    got = out_and_grads(BlockedSparseKernel(SlidingWindow(window=T), tile=TILE), q, k, v)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r)


def test_float32_tight():
    pattern, T = GlobalLocal(window=64, n_global=8), 300
    q, k, v = qkv(T, dtype=torch.float32)
    ref = out_and_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=pattern.mask(T)),
                        q, k, v)
    got = out_and_grads(make_kernel(pattern, "blocked", tile=32), q, k, v)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


# -- work is really skipped ---------------------------------------------------------

def test_keys_scored_per_query_do_not_grow_with_T():
    """Sliding window W with tile t scores (ceil((W-1)/t) + 1) * t keys per query, whatever T."""
    kernel = BlockedSparseKernel(SlidingWindow(window=32), tile=TILE)
    for T in (256, 1024, 4096):
        layout = kernel.layout(T)
        assert layout.keys_per_query == (math.ceil(31 / TILE) + 1) * TILE == 48
        assert layout.scored_pairs == T * 48  # linear in T; dense causal would be T(T+1)/2
    # Fixed pattern: local tile + one summary column per stride group (O(T / stride)).
    layout = BlockedSparseKernel(FixedBlockSparse(block=16, stride=64), tile=TILE).layout(4096)
    assert layout.keys_per_query == TILE + 4096 // 64


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), func
        return out


@pytest.mark.parametrize("impl,expect_quadratic", [("blocked", False), ("dense_mask", True)])
def test_no_T_by_T_tensor(impl, expect_quadratic):
    T, window = 2048, 32
    kernel = make_kernel(GlobalLocal(window=window, n_global=4), impl, tile=TILE)
    q, k, v = qkv(T, B=1, H=1, D=4, dtype=torch.float32)
    with LargestTensor() as seen:
        kernel(q, k, v).sum().backward()
    # The dense_mask row shows the probe would catch a T x T tensor.
    assert (seen.numel >= T * T) == expect_quadratic, (seen.numel, seen.op)


# -- technique, model, configs ------------------------------------------------------

TECHNIQUES = [SlidingWindowAttention(window=24, tile=TILE), BlockSparseAttention(block=16, stride=8, tile=TILE),
              GlobalLocalAttention(window=20, n_global=4, tile=TILE)]


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=128, n_layer=2, n_head=2, d_model=32))


@pytest.mark.parametrize("tech", TECHNIQUES, ids=lambda t: t.key)
def test_technique_gives_dense_mask_logits(tech):
    tech.validate(Plan([tech]))
    model = tiny_gpt()
    reference = apply_sparse_attention(copy.deepcopy(model), tech.pattern(), impl="dense_mask")
    keys = set(model.state_dict())
    model = tech.apply_to_model(model, RunContext())
    assert all(type(b.attn.kernel).__name__ == "AutoSparseKernel" for b in model.blocks())
    assert set(model.state_dict()) == keys  # checkpoints stay interchangeable with dense
    idx = torch.randint(0, 64, (2, 100), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(idx), reference(idx), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(idx), tiny_gpt()(idx), atol=1e-4)  # really not dense


@pytest.mark.parametrize("tech", TECHNIQUES, ids=lambda t: t.key)
def test_training_steps_lower_the_loss(tech):
    model = tech.apply_to_model(tiny_gpt(), RunContext())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 64, (4, 97), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_attention_dropout_is_kept():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=64, n_layer=1, n_head=2, d_model=32, dropout=0.5))
    apply_sparse_attention(model, SlidingWindow(8), tile=TILE)
    kernel = model.blocks()[0].attn.kernel
    assert kernel.dropout == 0.5 and kernel.blocked.dropout == 0.5
    idx = torch.randint(0, 64, (1, 40))
    assert not torch.equal(model(idx), model(idx))  # training: dropout active
    model.eval()
    torch.testing.assert_close(model(idx), model(idx))


@pytest.mark.parametrize("tech,key", [
    (SlidingWindowAttention(window=0), "window"),
    (SlidingWindowAttention(window="256"), "window"),
    (SlidingWindowAttention(tile=0), "tile"),
    (SlidingWindowAttention(impl="xformers"), "impl"),
    (BlockSparseAttention(stride=-1), "stride"),
    (BlockSparseAttention(block=2.5), "block"),
    (GlobalLocalAttention(n_global=-1), "n_global"),
    (GlobalLocalAttention(impl="flex"), "impl=flex"),
])
def test_validate_names_the_fix(tech, key):
    with pytest.raises(ConfigError, match=key):
        tech.validate(Plan([tech], device_type="cpu"))


def test_apply_needs_attention_layers():
    with pytest.raises(ConfigError, match="no attention layer"):
        apply_sparse_attention(torch.nn.Linear(2, 2), SlidingWindow(4))


def test_configs_instantiate():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    assert "_target_" not in (OmegaConf.load(CONF / "dense.yaml") or {})
    for name, cls in [("sliding_window", SlidingWindowAttention), ("block_sparse", BlockSparseAttention),
                      ("global_local", GlobalLocalAttention)]:
        tech = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
        assert type(tech) is cls and tech.key == name
        tech.validate(Plan([tech], device_type="cpu"))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("name", PATTERNS)
def test_flex_block_mask_forward_on_cpu(name):
    """Eager flex forward (CPU has no flex backward): checks mask_mod and the cached BlockMask."""
    from torch.nn.attention.flex_attention import flex_attention

    from tfx.attention.kernels import _flex_block_mask

    pattern, T = PATTERNS[name], 200
    q, k, v = (x.detach().float() for x in qkv(T))
    block_mask = _flex_block_mask(pattern, T, q.device)
    assert block_mask is _flex_block_mask(pattern, T, q.device)  # cached per (T, device)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=pattern.mask(T))
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=block_mask), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward needs CUDA")
@pytest.mark.parametrize("name", PATTERNS)
def test_flex_equals_masked_sdpa_on_cuda(name):
    pattern, T = PATTERNS[name], 300
    q, k, v = qkv(T, H=4, D=16, dtype=torch.float32, device="cuda")
    ref = out_and_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=pattern.mask(T, q.device)),
                        q, k, v)
    got = out_and_grads(make_kernel(pattern, "auto"), q, k, v)  # auto -> flex on CUDA
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=2e-3, atol=2e-3)
