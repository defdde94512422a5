from tfx.model.attention import AttentionKernel, DenseCausalAttention
from tfx.model.gpt import GPT, Block, CausalSelfAttention, GPTConfig, MLP

__all__ = ["AttentionKernel", "Block", "CausalSelfAttention", "DenseCausalAttention", "GPT",
           "GPTConfig", "MLP"]
