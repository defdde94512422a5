"""Errors that carry a one-line, user-facing message.

train.py and evaluate.py catch :class:`TfxError` and print ``str(err)`` without a
traceback, so the message must say what is wrong and what to change.
"""


class TfxError(Exception):
    """Base class for errors whose message is meant for the user."""


class ConfigError(TfxError):
    """A config value or a combination of techniques that cannot work."""


class DataError(TfxError):
    """A dataset that cannot be loaded, is empty, or lacks the text column."""


class CheckpointError(TfxError):
    """A checkpoint that is missing, incomplete, corrupt, or does not match the run."""


class TrainingError(TfxError):
    """Training cannot go on (for example, too many non-finite losses)."""
