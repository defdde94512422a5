from tfx.core.context import Facts, RunContext, StepInfo
from tfx.core.errors import CheckpointError, ConfigError, DataError, TfxError, TrainingError
from tfx.core.technique import Pipeline, Plan, Stage, Technique

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "Facts", "Pipeline", "Plan", "RunContext",
    "Stage", "StepInfo", "Technique", "TfxError", "TrainingError",
]
