"""tfx: switch Transformer efficiency techniques on and off, train, and compare them.

The package is usable without Hydra: every technique is a plain function plus a
thin :class:`tfx.core.Technique` subclass that plugs it into the training pipeline.
"""

__version__ = "0.1.0"
