from tfx.model.attention import AttentionKernel, DenseCausalAttention
from tfx.model.gpt import GPT, Block, CausalSelfAttention, GPTConfig, MLP
from tfx.model.size import count_params, state_dict_bytes

__all__ = ["AttentionKernel", "Block", "CausalSelfAttention", "DenseCausalAttention", "GPT",
           "GPTConfig", "MLP", "count_params", "state_dict_bytes"]
