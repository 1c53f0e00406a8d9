"""``SlimFitSession``: one model + optimizer trained the SlimFit way; the step
written once, over parts that all speak one protocol (:mod:`slimfit.parts`).

Why one object: a SlimFit step touches up to six parts (the freezer, the
activation compressor, frozen convolutions, the optimizer-state offloader, the
weight streamer and the activation offloader) in an order that matters. The
session builds the parts its :class:`SessionConfig` turns on (:data:`PARTS`,
in step order) and calls each at each moment of the step without knowing its
type; the Lightning callback, the Hugging Face Trainer callback, the budget
planner's calibration, the benchmarks, the GPU check and the tests all drive
this object, so none of them can get the order wrong or drop an option.

One optimizer step::

    session = SlimFitSession(model, SessionConfig(freezing=SlimFitConfig(freeze_rate=0.9)))
    session.start(optimizer)               # every part attaches (hooks, buffers)
    session.begin_step()                   # decide + apply the frozen set (or begin_step(frozen))
    loss = compute_loss(); session.record_loss(loss); loss.backward()
    session.before_optimizer_step()        # parts close their step (reverse order)
    optimizer.step(); optimizer.zero_grad(set_to_none=True)
    stats = session.end_step()             # scores of the trained units, statistics
    ...
    session.stop()                         # every weight trainable and resident again

or ``session.step(loss_fn)`` for all of it (``measure=True``: under the ledger).
The freezer is the one part the session asks for something: the frozen set of
the coming step (:meth:`SlimFitSession.decide`); every other part reads it
from the :class:`slimfit.parts.Step` it is handed.
"""

from __future__ import annotations

import pathlib
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import nn

from slimfit.compression.compressor import ActivationCompressor
from slimfit.compression.frozen_conv import FrozenConvRouter
from slimfit.distributed import agree, check_same_frozen, check_same_units, world_size
from slimfit.errors import CheckpointMismatchError, SlimFitError
from slimfit.freezing.freezer import LayerFreezer
from slimfit.loss.head import ChunkedLMLoss
from slimfit.offload.activations import ActivationOffloader
from slimfit.offload.optimizer_state import OptimizerStateOffloader
from slimfit.offload.streaming import WeightStreamer
from slimfit.parts import Context, MemoryAdjustment, Part, Step
from slimfit.session_config import SessionConfig

__all__ = ["PARTS", "SlimFitSession"]

#: The parts a session may run, in step order (opening moments in this order,
#: closing moments in reverse: ``slimfit.parts``). Each builds itself from a
#: :class:`SessionConfig` (``Part.from_config``) or stays off. A new part is a
#: new module with a ``Part`` subclass and one entry here.
PARTS: tuple[type[Part], ...] = (LayerFreezer, ActivationCompressor, ChunkedLMLoss,
                                 FrozenConvRouter, OptimizerStateOffloader, WeightStreamer,
                                 ActivationOffloader)

#: checkpoint format of :meth:`SlimFitSession.state_dict` (1: the freezer's state alone)
STATE_VERSION = 2


#: model -> the session started on it (SlimFitSession.of)
_RUNNING: "weakref.WeakKeyDictionary[nn.Module, SlimFitSession]" = weakref.WeakKeyDictionary()


class SlimFitSession:
    """Runs SlimFit's step protocol on one model and its optimizer.

    Args:
        model: the module being trained (its trainable parameters now define
            the freezing candidates).
        config: a :class:`SessionConfig`.

    Attributes:
        parts: the parts this config turns on, in step order.

    Raises:
        SlimFitError: bad options, a pattern that matches nothing, a model with
            no candidate, a compiled model with compression or streaming.
    """

    def __init__(self, model: nn.Module, config: SessionConfig | None = None):
        self.model = model
        self.config = config if config is not None else SessionConfig()
        if not isinstance(self.config, SessionConfig):
            raise SlimFitError(f"config must be a SessionConfig, got {self.config!r}.")
        # built now, so that selection errors surface before any training
        self.parts: list[Part] = [p for cls in PARTS
                                  if (p := cls.from_config(model, self.config)) is not None]
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps = 0  # optimizer steps begun since the session was built
        self._step: Step | None = None

    @classmethod
    def of(cls, model: nn.Module) -> "SlimFitSession | None":
        """The session started on ``model`` (None if there is none): the handle
        other tools (the memory monitor, loggers) reach a running session by."""
        return _RUNNING.get(model)

    def part(self, cls: type[Part]) -> Part | None:
        """The running part of type ``cls`` (None if the config leaves it off)."""
        return next((p for p in self.parts if isinstance(p, cls)), None)

    @property
    def freezer(self) -> LayerFreezer | None:
        """The freezing part, which decides each step's frozen set."""
        return self.part(LayerFreezer)

    @property
    def compressor(self) -> ActivationCompressor | None:
        return self.part(ActivationCompressor)

    @property
    def streamer(self) -> WeightStreamer | None:
        return self.part(WeightStreamer)

    # -- life cycle ------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self.optimizer is not None

    @property
    def units(self) -> Sequence[Any]:
        """The freezer's units (empty without freezing)."""
        return self.freezer.units if self.freezer is not None else ()

    def start(self, optimizer: torch.optim.Optimizer) -> "SlimFitSession":
        """Attach every part for ``optimizer`` (call once the model is on its
        training device). Idempotent."""
        if self.started:
            return self
        opt = getattr(optimizer, "optimizer", optimizer)  # Lightning's LightningOptimizer
        if not isinstance(opt, torch.optim.Optimizer):
            raise SlimFitError(f"start() needs a torch.optim.Optimizer, got {optimizer!r}.")
        self.optimizer = opt
        if self.freezer is not None:  # tensors replaced since (FSDP2): found again by name
            self.freezer.resolve(self.model)
            check_same_units([u.name for u in self.freezer.units])
        ctx = Context(self.model, opt, tuple(self.units))
        for p in self.parts:
            p.attach(ctx)
        _RUNNING[self.model] = self
        return self

    def stop(self) -> None:
        """Undo :meth:`start`: every weight resident and trainable, every hook
        removed, offloaded optimizer state back on the device. Idempotent."""
        if not self.started:
            return
        for p in reversed(self.parts):
            p.detach()
        if _RUNNING.get(self.model) is self:
            del _RUNNING[self.model]
        self._step = None
        self.optimizer = None

    # -- one optimizer step --------------------------------------------------------------
    def decide(self) -> list[int]:
        """The frozen unit indices for the coming step: the freezer's choice on
        rank 0, the same on every rank of a multi-process run
        (:func:`slimfit.distributed.agree`)."""
        return agree(self.freezer.decide() if self.freezer is not None else [])

    def begin_step(self, frozen: Sequence[int] | None = None) -> list[int]:
        """Open a step: ``frozen`` (default: :meth:`decide`) goes to every part
        (the freezer applies it, the offloaders follow it)."""
        if not self.started:
            raise SlimFitError("begin_step() before start(optimizer): the session is not running.")
        frozen = self.decide() if frozen is None else [int(i) for i in frozen]
        self._step = Step(index=self.steps, frozen=tuple(frozen))
        self.steps += 1
        for p in self.parts:
            p.on_step_start(self._step)
        if self.freezer is not None and world_size() > 1:
            check_same_frozen(self._step.index, self.freezer.frozen_names())
        return frozen

    def record_loss(self, loss: torch.Tensor) -> None:
        """Note a micro-batch loss; a non-finite one makes the step's scores unrecorded
        (``SlimFitConfig.on_nonfinite``). No device->host sync here."""
        if torch.is_tensor(loss) and self._step is not None:
            ok = torch.isfinite(loss.detach()).all()
            prev = self._step.loss_finite
            self._step.loss_finite = ok if prev is None else prev & ok

    def before_optimizer_step(self) -> None:
        """After backward, before ``optimizer.step()``: every part closes its step."""
        step = self._open()
        for p in reversed(self.parts):
            p.before_optimizer_step(step)

    def end_step(self, skipped: bool = False) -> dict[str, float]:
        """After ``optimizer.step()``: score the trained units; returns statistics
        to log (``skipped``: the grad scaler skipped the step)."""
        step = self._open()
        step.skipped = bool(skipped)
        stats: dict[str, float] = {}
        for p in self.parts:
            stats.update(p.after_optimizer_step(step))
        self._step = None
        return stats

    def _open(self) -> Step:
        if self._step is None:
            raise SlimFitError("no step is open: call begin_step() first.")
        return self._step

    def step(self, loss_fn: Callable[[], torch.Tensor], measure: bool = False,
             frozen: Sequence[int] | None = None):
        """One whole optimizer step: ``loss_fn()`` does the forward and returns
        the loss. With ``measure``, the step runs under the memory ledger and its
        :class:`slimfit.memory.report.MemoryReport` is returned (else ``None``)."""
        from slimfit.memory.ledger import measure_step  # the ledger imports parts, not vice versa

        self.begin_step(frozen)

        def forward_backward():
            loss = loss_fn()
            self.record_loss(loss)
            loss.backward()
            self.before_optimizer_step()

        report = None
        if measure:
            report = measure_step(self.model, self.optimizer, forward_backward, parts=self.parts)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            forward_backward()
            self.optimizer.step()
        self.end_step()
        return report

    def run_initial_pass(self, loss_fn: Callable[[], torch.Tensor]) -> int:
        """Train until every unit has been trained once (every tensor then has
        optimizer state, as in a long run); returns the steps taken (1 without
        freezing)."""
        n = 0
        while n == 0 or (self.freezer is not None and not self.freezer.scheduler.initial_pass_done):
            self.step(loss_fn)
            n += 1
        return n

    # -- reporting and checkpoints ---------------------------------------------------------
    def run_notes(self, total_steps: float) -> list[str]:
        """Every part's warnings about a run of ``total_steps`` optimizer steps
        (the freezer's: too few updates per unit for the accuracy the fidelity
        study measured; :func:`slimfit.evidence.short_budget_note`)."""
        return [n for p in self.parts for n in p.run_notes(total_steps)]

    def memory_adjustments(self) -> list[MemoryAdjustment]:
        """What the parts keep in host memory, for the ledger."""
        return [a for p in self.parts if (a := p.memory_adjustment()) is not None]

    def describe(self) -> str:
        lines = [f"SlimFit session: {self.config.label()}"]
        lines += ["  " + d.replace("\n", "\n  ") for p in self.parts if (d := p.describe())]
        return "\n".join(lines)

    def write_files(self, out: str | pathlib.Path) -> dict[str, pathlib.Path]:
        """Every part's end-of-run files (the freezing heatmap and summary) under ``out``."""
        files: dict[str, pathlib.Path] = {}
        for p in self.parts:
            files.update(p.write_files(pathlib.Path(out)))
        return files

    def synchronize(self) -> None:
        """Wait for host copies in flight (before a checkpoint reads optimizer state)."""
        for p in self.parts:
            p.synchronize()

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state of the parts that keep any (the freezer's scores,
        ages, RNG and history), keyed by part name."""
        states = {p.name: s for p in self.parts if (s := p.state_dict())}
        return {"version": STATE_VERSION, "parts": states} if states else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (or a version-1 checkpoint: the
        freezer's state alone).

        Raises:
            CheckpointMismatchError: corrupt state, or a state for another
                model or other options.
        """
        if not state:
            return
        if not isinstance(state, dict):
            raise CheckpointMismatchError(f"not a SlimFit state: a {type(state).__name__}, not a "
                                          "dict; the checkpoint is corrupt or from another tool.")
        if "version" not in state and "scheduler" in state:  # version 1 (before slimfit.parts)
            state = {"version": STATE_VERSION, "parts": {LayerFreezer.name: state}}
        if state.get("version") != STATE_VERSION or not isinstance(state.get("parts"), dict):
            raise CheckpointMismatchError(
                f"not a SlimFit session state (keys {sorted(state)[:6]}, version "
                f"{state.get('version')!r}; expected version {STATE_VERSION} with 'parts'); the "
                "checkpoint is corrupt or was written by another callback.")
        by_name = {p.name: p for p in self.parts}
        unknown = sorted(set(state["parts"]) - set(by_name))
        if unknown:
            raise CheckpointMismatchError(
                f"the checkpoint holds SlimFit state of {unknown} but this session runs "
                f"{sorted(by_name)} ({self.config.label()}); resume with the same SlimFit "
                "options (freezing on), or start without the checkpoint's callback state.")
        for name, s in state["parts"].items():
            by_name[name].load_state_dict(s)
