"""The step protocol: what every part of a SlimFit session implements.

Why one protocol: a SlimFit step touches several features (freezing,
activation compression, frozen convolutions, optimizer-state offload, weight
streaming, activation offload), and the order in which they act matters. As
in Lightning's ``Callback`` or torch's optimizer hooks, each feature is a
:class:`Part` that implements the moments it needs, and the session
(:class:`slimfit.session.SlimFitSession`) calls every part at every moment
without knowing its type:

========================  ===============================================  ==========
moment                    when                                              order
========================  ===============================================  ==========
``attach(ctx)``           ``session.start(optimizer)``: model on its        parts order
                          device, optimizer built
``on_step_start(step)``   the frozen set of the step is decided             parts order
``before_optimizer_step`` after backward, before ``optimizer.step()``       reverse
``after_optimizer_step``  after ``optimizer.step()``; returns statistics    parts order
``detach()``              ``session.stop()``: everything as before start    reverse
========================  ===============================================  ==========

Opening moments run in the session's part order, closing ones in reverse,
like nested context managers: the freezer applies the frozen set before the
optimizer-state offloader moves the state of the frozen units and before the
streamer evicts their weights, and activation offload, opened last, closes
first. Besides the moments, a part may hold checkpoint state
(``state_dict``), wait for copies in flight (``synchronize``), correct the
memory ledger (``memory_adjustment``: bytes it keeps in host memory), warn
about a run's length (``run_notes``) and write files (``write_files``).
Every method has a no-op default.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from slimfit.selection import Unit

__all__ = ["Context", "MemoryAdjustment", "Part", "Step"]


@dataclasses.dataclass(frozen=True)
class Context:
    """What a part may need when the session starts.

    Attributes:
        model: the module being trained, on its training device.
        optimizer: the torch optimizer (unwrapped from Lightning's).
        units: the freezing units (empty without freezing), in the order the
            frozen indices of :class:`Step` refer to.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    units: Sequence["Unit"] = ()


@dataclasses.dataclass
class Step:
    """One optimizer step as the parts see it.

    Attributes:
        index: the session's step count (0 for the first step).
        frozen: indices into :attr:`Context.units` frozen in this step.
        skipped: set before ``after_optimizer_step`` when the optimizer step
            did not run (AMP's grad scaler found inf/NaN).
        loss_finite: "every micro-batch loss was finite": a bool tensor left
            on the device (no sync), a bool, or None when no loss was noted.
    """

    index: int
    frozen: tuple[int, ...] = ()
    skipped: bool = False
    loss_finite: torch.Tensor | bool | None = None


@dataclasses.dataclass(frozen=True)
class MemoryAdjustment:
    """What a part tells the memory ledger about bytes it moved off the device.

    Attributes:
        host_state_keys: storage keys (:func:`slimfit.storage.storage_key`)
            of optimizer state held in host memory: reported apart, not in
            the device total.
        parameter_peak_extra: weight bytes on the device at the step's peak
            beyond those resident when the ledger counts (weight streaming).
        host_parameters: bytes of host copies of weights (not in the total).
    """

    host_state_keys: frozenset = frozenset()
    parameter_peak_extra: int = 0
    host_parameters: int = 0


class Part:
    """Base class of the features a :class:`slimfit.session.SlimFitSession` runs.

    A subclass overrides the moments it needs (module docstring) and
    ``from_config``, which builds it from a session's config (or returns None
    when the config leaves it off). ``name`` keys its checkpoint state.
    """

    #: key of this part's state in the session's checkpoint state
    name: ClassVar[str] = "part"

    @classmethod
    def from_config(cls, model: nn.Module, config: Any) -> "Part | None":
        """This part for ``model`` under a ``SessionConfig``, or None when off.
        Called when the session is built, so bad options fail before training."""
        return None

    def attach(self, ctx: Context) -> None:
        """Install hooks, allocate buffers (``session.start``)."""

    def on_step_start(self, step: Step) -> None:
        """The frozen set of ``step`` is decided; act before the forward."""

    def before_optimizer_step(self, step: Step) -> None:
        """Backward is done; ``optimizer.step()`` comes next."""

    def after_optimizer_step(self, step: Step) -> dict[str, float]:
        """``optimizer.step()`` ran (or was skipped); returns statistics to log."""
        return {}

    def detach(self) -> None:
        """Undo :meth:`attach` (``session.stop``)."""

    def synchronize(self) -> None:
        """Wait for copies in flight (before a checkpoint reads optimizer state)."""

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state to checkpoint (empty: nothing to save)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""

    def describe(self) -> str:
        """One or more lines for the user: what this part does to this model."""
        return ""

    def memory_adjustment(self) -> MemoryAdjustment | None:
        """Host-held bytes the memory ledger must know about (None: none)."""
        return None

    def run_notes(self, total_steps: float) -> list[str]:
        """Warnings about a run of ``total_steps`` optimizer steps."""
        return []

    def write_files(self, out: pathlib.Path) -> dict[str, pathlib.Path]:
        """Write this part's end-of-run files under ``out``; returns them by name."""
        return {}
