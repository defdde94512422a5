from tfx.model.attention import AttentionKernel, DenseCausalAttention
from tfx.model.gpt import GPT, Block, CausalSelfAttention, GPTConfig, MLP
from tfx.model.hf import CausalLM, HFModel, export_hf
from tfx.model.size import count_params, state_dict_bytes

__all__ = ["AttentionKernel", "Block", "CausalLM", "CausalSelfAttention", "DenseCausalAttention", "GPT",
           "GPTConfig", "HFModel", "MLP", "count_params", "export_hf", "state_dict_bytes"]
