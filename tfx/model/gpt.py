"""A GPT-style decoder: pre-LayerNorm blocks, learned positions, tied embeddings.

Kept as a plain ``nn.Module`` whose layout the parallel techniques rely on:

* separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and ``fc``/``proj`` linears so
  tensor parallel can shard them column-/row-wise;
* blocks in an ``nn.ModuleDict`` keyed by layer index, so a pipeline stage can delete
  the layers it does not own and keep fully-qualified names (checkpoints then load
  into any layout);
* ``tok_emb``, ``pos_emb``, ``norm`` and ``head`` may be set to ``None`` on pipeline
  stages that do not own them: ``forward`` then takes/returns hidden states.
* heads are computed as ``-1`` in reshapes, so sharded (local) heads work too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tfx.model.attention import AttentionKernel, DenseCausalAttention
from tfx.model.size import weight_flops


@dataclass
class GPTConfig:
    """tfx's GPT; also the ``model`` group's spec (``conf/model/{tiny,small,...}.yaml``):
    :meth:`build` fills ``vocab_size``/``block_size`` left ``None`` from the data."""

    vocab_size: Optional[int] = None  # None: the tokenizer's vocabulary
    block_size: Optional[int] = None  # None: data.seq_len
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    d_ff: Optional[int] = None  # default 4 * d_model
    dropout: float = 0.0
    bias: bool = False
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_ff"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key}={value} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model

    def build(self, vocab_size: int, block_size: int) -> "GPT":
        if self.block_size is not None and self.block_size < block_size:
            raise ValueError(f"block_size={self.block_size} is shorter than data.seq_len={block_size}; "
                             f"raise model.block_size or leave it null")
        return GPT(replace(self, vocab_size=self.vocab_size or vocab_size,
                           block_size=self.block_size or block_size))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, kernel: Optional[AttentionKernel] = None) -> None:
        super().__init__()
        d = cfg.d_model
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=cfg.bias)
        self.k_proj = nn.Linear(d, d, bias=cfg.bias)
        self.v_proj = nn.Linear(d, d, bias=cfg.bias)
        self.o_proj = nn.Linear(d, d, bias=cfg.bias)
        self.kernel = kernel if kernel is not None else DenseCausalAttention(cfg.dropout)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # head_dim is fixed; the head count is whatever the (possibly pruned or
        # tensor-sharded) projections produce.
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        y = self.kernel(q, k, v)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_drop(self.o_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None or cfg.block_size is None:
            raise ValueError("GPTConfig needs vocab_size and block_size (GPTConfig.build fills them)")
        self.cfg = cfg
        self.tok_emb: Optional[nn.Embedding] = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb: Optional[nn.Embedding] = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.norm: Optional[nn.LayerNorm] = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head: Optional[nn.Linear] = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2L)."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02
                if name.endswith(("o_proj.weight", "mlp.proj.weight")):
                    std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, return_hidden: bool = False):
        """``idx`` (B, T) token ids -> logits (B, T, V).

        On a pipeline stage without embeddings ``idx`` is the hidden state (B, T, d);
        without a head the hidden state is returned. ``return_hidden`` additionally
        returns the final hidden state (used by distillation's hidden matching).
        """
        x = idx
        if self.tok_emb is not None:
            T = idx.shape[1]
            if T > self.cfg.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
            pos = torch.arange(T, device=idx.device)
            x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.layers.values():
            x = block(x)
        if self.norm is not None:
            x = self.norm(x)
        hidden = x
        if self.head is not None:
            x = self.head(x)
        return (x, hidden) if return_hidden else x

    # -- accounting ----------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        seen, n = set(), 0
        for name, p in self.named_parameters():  # named_parameters de-duplicates tied weights
            if id(p) in seen:
                continue
            seen.add(id(p))
            if non_embedding and name.startswith(("tok_emb", "pos_emb")):
                continue
            n += p.numel()
        if non_embedding and self.cfg.tie_embeddings and self.head is not None:
            n += self.head.weight.numel()  # the head matmul is real compute
        return n

    def flops_per_token(self, seq_len: Optional[int] = None, layers=None, forward_only: bool = False) -> float:
        """Training FLOPs per token, forward + backward, by the formula of :mod:`tfx.flops`:
        ``6 x`` the matmul weights (every Linear of the blocks, and the head, tied or
        not) ``+ 12 x`` attention width ``x`` (query, key) pairs per sequence ``/ T``,
        per block: ``T (T + 1) / 2`` pairs for causal attention, times the density of a
        sparse kernel's pattern (``kernel.spec.density``). ``layers``: only these blocks
        and no head. A frozen weight (LoRA's base layers) counts 4, not 6: no weight
        gradient. ``forward_only``: the forward alone (2 per weight, a third of the
        attention), what activation checkpointing runs again."""
        T = seq_len or self.cfg.block_size
        blocks = self.blocks() if layers is None else list(layers)
        modules = [m for b in blocks for m in b.modules()]
        if layers is None and self.head is not None:
            modules.append(self.head)
        weights = sum(m.in_features * m.out_features * weight_flops(m, forward_only)
                      for m in modules if isinstance(m, nn.Linear))
        attention, density = 0.0, {}
        for block in blocks:
            kernel = block.attn.kernel
            # query heads x head_dim, as the output projection reads it (pruned heads, low rank)
            width = next(m.in_features for m in block.attn.o_proj.modules() if isinstance(m, nn.Linear))
            if id(kernel) not in density:
                spec = getattr(kernel, "spec", None)
                density[id(kernel)] = spec.density(T) if spec is not None else 1.0
            attention += 12.0 * width * (T + 1) / 2 * density[id(kernel)]
        return weights + (attention / 3 if forward_only else attention)

    def blocks(self):
        return list(self.layers.values())
