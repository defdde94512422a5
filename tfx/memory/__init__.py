from tfx.memory.activation_ckpt import ActivationCheckpointing, apply_activation_checkpointing

__all__ = ["ActivationCheckpointing", "apply_activation_checkpointing"]
