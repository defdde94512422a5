"""tfx: switch Transformer efficiency techniques on and off, train, and compare them.

The package is usable without Hydra: every technique is a plain function plus a
thin :class:`tfx.core.Technique` subclass that plugs it into the training pipeline.
"""

__version__ = "0.1.0"

import logging as _logging

# Known, harmless noise of dependencies, once per process: torchao logs a warning for
# each CUDA-only extension it cannot load on a CPU build, and torch's pytree warns about
# torchao's Enum registration. Errors from both still show.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
