"""SlimFit: memory-efficient fine-tuning of transformers by per-iteration layer
freezing driven by training dynamics (arXiv 2305.18513), with compression of
the activations frozen layers still need and exact offloading.

The library is plain PyTorch, grouped by idea: :mod:`slimfit.freezing`,
:mod:`slimfit.compression`, :mod:`slimfit.offload`, :mod:`slimfit.memory`,
:mod:`slimfit.planning`; the session (:mod:`slimfit.session`) runs their parts
through one step protocol (:mod:`slimfit.parts`). Everything a user needs is
importable from here; the Lightning callbacks live in ``slimfit.callbacks``.
"""

from slimfit import _aliases
from slimfit.compression import ActivationCompressor, CompressionConfig, Treatment
from slimfit.driver import SessionDriver
from slimfit.errors import (CheckpointMismatchError, LedgerError, NonFiniteError, OptionTypeError,
                            RanksDivergedError, SelectionError, ShortBudgetWarning, SlimFitError,
                            UnsupportedSetupError)
from slimfit.freezing import LayerFreezer, SlimFitConfig, preview
from slimfit.loss import ChunkedLMLoss, chunked_cross_entropy
from slimfit.memory import MeasuredStep, MemoryReport, format_bytes, measure_step
from slimfit.offload import (ActivationOffloader, OptimizerStateOffloader, StreamConfig,
                             WeightStreamer)
from slimfit.parts import Part
from slimfit.planning import BudgetError, Plan, parse_budget, plan_for_budget
from slimfit.session import SlimFitSession
from slimfit.session_config import SessionConfig

__version__ = "0.2.0"

_aliases.install()

__all__ = [
    "ActivationCompressor", "ActivationOffloader", "BudgetError", "CheckpointMismatchError",
    "ChunkedLMLoss", "chunked_cross_entropy",
    "CompressionConfig", "LayerFreezer", "LedgerError", "MeasuredStep", "MemoryReport",
    "NonFiniteError", "OptimizerStateOffloader", "OptionTypeError", "Part", "Plan",
    "RanksDivergedError", "SelectionError", "SessionConfig", "SessionDriver", "ShortBudgetWarning", "SlimFitConfig",
    "SlimFitError", "SlimFitSession", "StreamConfig", "Treatment", "UnsupportedSetupError",
    "WeightStreamer", "format_bytes", "measure_step", "parse_budget", "plan_for_budget", "preview",
]
