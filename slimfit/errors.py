"""The project's exception types.

Every user-facing error derives from :class:`SlimFitError`, itself a
``ValueError``, so callers can catch our refusals specifically or as the
ordinary bad-value errors they are.
"""

from __future__ import annotations

__all__ = ["SlimFitError", "SelectionError", "CheckpointMismatchError", "UnsupportedSetupError",
           "LedgerError", "NonFiniteError", "OptionTypeError", "RanksDivergedError",
           "ShortBudgetWarning"]


class SlimFitError(ValueError):
    """Base class of SlimFit's errors about bad input or an unsupported setup."""


class SelectionError(SlimFitError):
    """A layer pattern matched nothing, or a model has no candidate layers."""


class CheckpointMismatchError(SlimFitError):
    """A saved SlimFit state does not belong to this model or is corrupt."""


class UnsupportedSetupError(SlimFitError):
    """A trainer, strategy or optimizer configuration SlimFit cannot run correctly."""


class LedgerError(SlimFitError):
    """A ledger measurement was asked of something it cannot measure."""


class NonFiniteError(SlimFitError):
    """A training step's loss or scores were NaN/inf (``on_nonfinite="raise"``)."""


class RanksDivergedError(SlimFitError):
    """The ranks of a multi-process run froze different units in one step: their
    weights would drift apart without any other error."""


class OptionTypeError(SlimFitError, TypeError):
    """An option of the wrong type: a project error that is also a ``TypeError``."""


class ShortBudgetWarning(UserWarning):
    """A run too short for its freezing rate: each unit trains too few times
    for the accuracy the fidelity study measured (filter it by this class)."""
