"""``SessionDriver``: what every training-loop integration does with a session,
written once, so that an entry point (the Lightning callback, the Hugging
Face Trainer callback) is a map from its hooks to five calls.

Why a layer between the session and the callbacks: a training loop calls back
per micro-batch, while a SlimFit step is an optimizer step (gradient
accumulation keeps one frozen set across its micro-batches); a memory budget
is planned from the first real batch; a checkpoint's state may arrive before
the model exists; warnings and files belong to rank 0. None of that depends
on which loop runs, so it lives here, in plain PyTorch.

An integration calls::

    driver = SessionDriver(freeze_rate=0.9, compression=True)
    driver.setup(model)                         # once the model exists (before wrapping)
    driver.start(optimizer, total_steps)        # optimizer built, model on its device
    driver.begin(step, loss_fn)                 # each micro-batch; opens one step per optimizer step
    driver.record_loss(loss)                    # before each backward
    driver.before_optimizer_step()              # after backward, gradients unscaled
    stats = driver.end(step)                    # after the optimizer step (None: not logged now)
    driver.stop(out_dir)                        # end of training: files on rank 0
"""

from __future__ import annotations

import logging
import pathlib
import warnings
from typing import Any, Callable

import torch
from torch import nn

from slimfit.compression.config import CompressionConfig
from slimfit.distributed import agree, is_rank_zero, world_size
from slimfit.errors import ShortBudgetWarning, SlimFitError
from slimfit.freezing.config import SlimFitConfig
from slimfit.offload.stream_config import StreamConfig
from slimfit.planning.planner import Plan, optimizer_like, parse_budget, plan_for_budget
from slimfit.session import SlimFitSession
from slimfit.session_config import SessionConfig

__all__ = ["SessionDriver"]


class SessionDriver:
    """A session driven from a training loop's hooks.

    Args:
        freeze_rate: fraction r in [0, 1) of candidate units frozen each step
            (default: :class:`slimfit.SlimFitConfig`'s, 0.9).
        compression / offload_optimizer_state / offload_activations /
            stream_weights: see :class:`slimfit.SessionConfig` (``True`` = the
            defaults of compression and streaming).
        memory_budget: e.g. ``"12GiB"``: at the first step the planner measures
            calibration steps and chooses what fits (:mod:`slimfit.planning`).
        log_every_n_steps: :meth:`end` returns statistics this often.
        config / **freezing: a :class:`slimfit.SlimFitConfig`, or its fields as
            keywords (``include``, ``always_train``, ``seed`` ...).

    Raises:
        SlimFitError: invalid options.
    """

    def __init__(self, freeze_rate: float | None = None, *,
                 compression: CompressionConfig | bool | None = None,
                 offload_optimizer_state: bool = False, offload_activations: bool = False,
                 stream_weights: StreamConfig | bool | None = None,
                 memory_budget: str | int | None = None, log_every_n_steps: int = 1,
                 config: SlimFitConfig | None = None, **freezing: Any):
        if freeze_rate is not None:  # else SlimFitConfig's default
            freezing["freeze_rate"] = freeze_rate
        self.session_config = SessionConfig.from_options(
            config=config, compression=compression, offload_optimizer_state=offload_optimizer_state,
            offload_activations=offload_activations, stream_weights=stream_weights, **freezing)
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) \
                or log_every_n_steps < 1:
            raise SlimFitError(f"log_every_n_steps must be a positive int, got "
                               f"{log_every_n_steps!r}.")
        self.memory_budget = None if memory_budget is None else parse_budget(memory_budget)
        self.log_every_n_steps = log_every_n_steps
        self.session: SlimFitSession | None = None
        self.plan: Plan | None = None
        self.files: dict[str, pathlib.Path] = {}
        #: where the session's and the plan's descriptions go (rank 0 only); an
        #: integration passes its own (Lightning's rank_zero_info)
        self.info: Callable[[str], None] = logging.getLogger("slimfit").info
        self._pending: dict | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._total_steps = float("inf")
        self._open: int | None = None  # the optimizer step open now

    @property
    def open_step(self) -> int | None:
        """The optimizer step open now (None between steps)."""
        return self._open

    def setup(self, model: nn.Module) -> SlimFitSession:
        """Build the session for ``model`` (once); a state loaded before applies now."""
        if self.session is None:
            self.session = SlimFitSession(model, self.session_config)
            if is_rank_zero():
                self.info(self.session.describe())
        if self._pending is not None:
            self.session.load_state_dict(self._pending)
            self._pending = None
        return self.session

    def start(self, optimizer: torch.optim.Optimizer, total_steps: float = float("inf")) -> None:
        """Start the session (with a budget: at the first step, after planning)."""
        self._total_steps = float(total_steps)
        self._optimizer = optimizer
        if self.memory_budget is None:
            self._start(optimizer)

    def _start(self, optimizer: torch.optim.Optimizer) -> None:
        self.session.start(optimizer)
        for note in self.session.run_notes(self._total_steps):  # an open-ended run: none
            if is_rank_zero():
                warnings.warn(note, ShortBudgetWarning, stacklevel=3)

    def _replan(self, loss_fn: Callable[[], torch.Tensor]) -> None:
        old = self.session
        self.plan = agree(plan_for_budget(old.model, optimizer_like(self._optimizer), loss_fn,
                                          self.memory_budget, base=self.session_config,
                                          stream=world_size() == 1))
        if is_rank_zero():
            self.info(self.plan.describe())
        self.session = SlimFitSession(old.model, self.plan.config)
        self.session.load_state_dict(old.state_dict())  # scores, ages, history survive
        self._start(self._optimizer)

    def begin(self, step: int, loss_fn: Callable[[], torch.Tensor] | None = None) -> None:
        """A micro-batch of optimizer step ``step`` starts: the first one opens the
        step (rank 0's frozen set on every rank); with a memory budget the first
        step plans from ``loss_fn`` (the loss of this batch) before it."""
        if self._open == step:
            return  # a later micro-batch of the same optimizer step
        if self.memory_budget is not None and self.plan is None:
            if loss_fn is None:
                raise SlimFitError("memory_budget needs the loss of a batch to calibrate: pass "
                                   "loss_fn to SessionDriver.begin at the first step.")
            self._replan(loss_fn)
        self.session.begin_step()
        self._open = step

    def record_loss(self, loss: torch.Tensor) -> None:
        self.session.record_loss(loss)

    def before_optimizer_step(self) -> None:
        self.session.before_optimizer_step()

    def end(self, step: int) -> dict[str, float] | None:
        """The optimizer step ``step`` ran: close it. Returns its statistics when
        they are due (every ``log_every_n_steps``), else None."""
        if self._open is None:
            return None
        stats = self.session.end_step()
        self._open = None
        return stats if step % self.log_every_n_steps == 0 else None

    def stop(self, out: str | pathlib.Path | None = None) -> dict[str, pathlib.Path]:
        """Stop the session; rank 0 writes the parts' files under ``out``."""
        if self.session is None:
            return {}
        self.session.stop()
        self._open = None
        if out is not None and is_rank_zero():
            self.files = self.session.write_files(out)
        return self.files

    def state_dict(self) -> dict[str, Any]:
        if self.session is None:
            return {}
        self.session.synchronize()  # the loop reads optimizer state right after this
        return self.session.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.session is None:  # the loop restores callback state before setup
            self._pending = state
        else:
            self.session.load_state_dict(state)
