"""Bits per byte: a quality number that carries across tokenizers."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from tfx.data import TokenBlocks
from tfx.data.tokenizer import ByteTokenizer
from tfx.evaluation import evaluate_lm, predicted_bytes


class Uniform(nn.Module):
    """Logits that give every token the same probability: loss = ln(V) per token."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab) + self.dummy


def test_bpb_of_a_uniform_model_on_bytes_equals_log2_vocab():
    text = "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind"
    tok = ByteTokenizer()
    ids = np.array([tok.eos_id] + tok.encode(text), dtype=np.int64)  # document starts after eos
    blocks = TokenBlocks(ids, seq_len=8)
    out = evaluate_lm(Uniform(256), blocks, batch_size=3, device=torch.device("cpu"), tokenizer=tok)
    # hand count: every predicted token is one byte and costs log2(256) = 8 bits
    n_pred = len(blocks) * 8
    assert predicted_bytes(blocks, len(blocks), tok) == n_pred == len(text.encode()[:n_pred])
    assert math.isclose(out["bits_per_token"], 8.0, rel_tol=1e-6)  # fp32 cross-entropy
    assert math.isclose(out["bpb"], 8.0, rel_tol=1e-6)  # fp32 cross-entropy


def test_bpb_counts_multi_byte_text_and_skips_separators(pydocs_data):
    tok = pydocs_data.tokenizer
    text = "naïve café — déjà vu"
    ids = np.array([tok.eos_id] + tok.encode(text) + [tok.eos_id] + tok.encode(text), dtype=np.int64)
    blocks = TokenBlocks(ids, seq_len=len(ids) - 1)  # one block predicting everything after the first eos
    assert predicted_bytes(blocks, 1, tok) == 2 * len(text.encode("utf-8"))
    vocab = tok.vocab_size
    out = evaluate_lm(Uniform(vocab), blocks, batch_size=1, device=torch.device("cpu"), tokenizer=tok)
    n_tokens = len(ids) - 1
    expected = n_tokens * math.log2(vocab) / (2 * len(text.encode("utf-8")))
    assert math.isclose(out["bpb"], expected, rel_tol=1e-6)  # fp32 cross-entropy
