"""The project's exception types.

Every user-facing error derives from :class:`SlimFitError`, itself a
``ValueError``, so callers can catch our refusals specifically or as the
ordinary bad-value errors they are.
"""

from __future__ import annotations

__all__ = ["SlimFitError", "SelectionError", "CheckpointMismatchError", "UnsupportedSetupError"]


class SlimFitError(ValueError):
    """Base class of SlimFit's errors about bad input or an unsupported setup."""


class SelectionError(SlimFitError):
    """A layer pattern matched nothing, or a model has no candidate layers."""


class CheckpointMismatchError(SlimFitError):
    """A saved SlimFit state does not belong to this model or is corrupt."""


class UnsupportedSetupError(SlimFitError):
    """A trainer, strategy or optimizer configuration SlimFit cannot run correctly."""
