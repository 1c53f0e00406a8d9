"""SlimFit: memory-efficient fine-tuning of transformers by per-iteration layer
freezing driven by training dynamics (arXiv 2305.18513).

The core is plain PyTorch; Lightning glue lives in ``slimfit.callbacks``.
"""

from slimfit.errors import (CheckpointMismatchError, SelectionError, SlimFitError,
                            UnsupportedSetupError)
from slimfit.ledger import MemoryReport, measure_step

__version__ = "0.1.0"

__all__ = ["CheckpointMismatchError", "MemoryReport", "SelectionError", "SlimFitError",
           "UnsupportedSetupError", "measure_step"]
