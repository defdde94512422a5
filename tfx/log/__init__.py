from tfx.log.metrics import MetricsWriter, peak_memory_mb, read_jsonl, reset_peak_memory
from tfx.log.wandb_logger import WandbLogger, wandb_mode

__all__ = ["MetricsWriter", "WandbLogger", "peak_memory_mb", "read_jsonl", "reset_peak_memory", "wandb_mode"]
