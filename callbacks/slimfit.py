"""``SlimFit``: per-iteration layer freezing (arXiv 2305.18513) as one Lightning
callback. The step protocol lives in :class:`slimfit.session.SlimFitSession`;
each hook is a call into it: ``setup`` builds it, ``on_fit_start`` checks the
strategy and optimizer and starts it, the first micro-batch of an optimizer
step decides (rank 0's decision broadcast under DDP) and begins the step,
``on_before_backward`` notes the loss, and the optimizer step closes it.
Unsupported setups are refused by ``checks.py`` with an error naming the fix.
"""

from __future__ import annotations

import pathlib
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from slimfit.callbacks.checks import (check_fit_start, check_single_process, check_strategy,
                                      loss_of)
from slimfit.compress import CompressionConfig
from slimfit.config import SlimFitConfig
from slimfit.errors import ShortBudgetWarning, SlimFitError
from slimfit.planner import Plan, optimizer_like, parse_budget, plan_for_budget
from slimfit.session import SessionConfig, SlimFitSession
from slimfit.stream import StreamConfig

__all__ = ["SlimFit"]


class SlimFit(pl.Callback):
    """Freeze the least-moving ``freeze_rate`` of the weight tensors every optimizer step.

    Args:
        freeze_rate: fraction r in [0, 1) of candidate units frozen each step
            (default 0.9).
        compression / offload_optimizer_state / offload_activations /
            stream_weights: see :class:`slimfit.session.SessionConfig`
            (``True`` = the defaults of compression and streaming).
        memory_budget: e.g. ``"12GiB"``: at the first step the planner measures
            calibration steps and chooses what fits (``slimfit.planner``).
        log_every_n_steps: log frozen fraction and score statistics this often.
        output_dir: where the heatmap and summary go (default
            ``<log_dir or default_root_dir>/slimfit``).
        config / **freezing: a :class:`slimfit.config.SlimFitConfig`, or its
            fields as keywords (``include``, ``always_train``, ``seed`` ...).

    Raises:
        SlimFitError: invalid options (at construction); unsupported setups,
            patterns that match nothing or no candidate (at ``setup``).

    Warns:
        ShortBudgetWarning: at fit start (after planning, with a budget), when
            the run's steps train each unit fewer times than the fidelity study
            needed to keep accuracy; it names the steps or rate that suffice.

    Example: ``L.Trainer(callbacks=[SlimFit(freeze_rate=0.9, compression=True)])``.
    """

    def __init__(self, freeze_rate: float | None = None, *,
                 compression: CompressionConfig | bool | None = None,
                 offload_optimizer_state: bool = False, offload_activations: bool = False,
                 stream_weights: StreamConfig | bool | None = None,
                 memory_budget: str | int | None = None, log_every_n_steps: int = 1,
                 output_dir: str | None = None, config: SlimFitConfig | None = None,
                 **freezing: Any):
        if config is None:
            freezing["freeze_rate"] = 0.9 if freeze_rate is None else freeze_rate
        elif freeze_rate is not None:
            raise SlimFitError(f"freeze_rate={freeze_rate!r} given with config=...: set the rate "
                               "in the SlimFitConfig (its freeze_rate field) instead.")
        self.session_config = SessionConfig.from_options(
            config=config, compression=compression, offload_optimizer_state=offload_optimizer_state,
            offload_activations=offload_activations, stream_weights=stream_weights, **freezing)
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) \
                or log_every_n_steps < 1:
            raise SlimFitError(f"log_every_n_steps must be a positive int, got "
                               f"{log_every_n_steps!r}.")
        self.memory_budget = None if memory_budget is None else parse_budget(memory_budget)
        self.log_every_n_steps, self.output_dir = log_every_n_steps, output_dir
        self.session: SlimFitSession | None = None
        self.plan: Plan | None = None
        self.files: dict[str, pathlib.Path] = {}
        self._pending_state: dict | None = None
        self._open_step: int | None = None

    @property
    def freezer(self):
        return self.session.freezer if self.session is not None else None

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        check_strategy(trainer.strategy)
        if self.session is None:
            self.session = SlimFitSession(pl_module, self.session_config)
            rank_zero_info(self.session.describe())
        if self._pending_state is not None:
            self.session.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_fit_start(self, trainer, pl_module):
        if self.session_config.stream is not None:
            check_single_process(trainer.world_size, "weight streaming")
        check_fit_start(pl_module, trainer.optimizers, self.session.units)
        if self.memory_budget is None:
            self.session.start(trainer.optimizers[0])
            self._warn_if_short(trainer)

    def _warn_if_short(self, trainer) -> None:
        # estimated_stepping_batches is inf for an open-ended run: no warning then
        note = self.session.short_budget_note(float(trainer.estimated_stepping_batches))
        if note is not None:
            rank_zero_warn(note, category=ShortBudgetWarning)

    def _make_plan(self, trainer, pl_module, batch, batch_idx) -> None:
        opt = trainer.optimizers[0]
        plan = plan_for_budget(pl_module, optimizer_like(opt),
                               lambda: loss_of(pl_module.training_step(batch, batch_idx)),
                               self.memory_budget, base=self.session_config,
                               stream=trainer.world_size == 1)
        self.plan = trainer.strategy.broadcast(plan, src=0) if trainer.world_size > 1 else plan
        rank_zero_info(self.plan.describe())
        resumed = self.session.state_dict() if len(self.session.freezer.history) else None
        self.session = SlimFitSession(pl_module, self.plan.config).start(opt)
        if resumed is not None:  # scores, ages and history survive re-planning after a resume
            self.session.load_state_dict(resumed)
        self._warn_if_short(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._open_step == trainer.global_step:
            return  # later micro-batch of the same optimizer step
        if self.memory_budget is not None and self.plan is None:
            self._make_plan(trainer, pl_module, batch, batch_idx)
        frozen = self.session.decide()
        if trainer.world_size > 1:  # identical frozen sets on every rank, whatever the scores
            frozen = trainer.strategy.broadcast(frozen, src=0)
        self.session.begin_step(frozen)
        self._open_step = trainer.global_step

    def on_before_backward(self, trainer, pl_module, loss):
        self.session.record_loss(loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.session.before_optimizer_step()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._open_step is None or trainer.global_step == self._open_step:
            return  # no optimizer step yet (gradient accumulation)
        stats = self.session.end_step()
        self._open_step = None
        step = trainer.global_step - 1  # the step just taken
        if step % self.log_every_n_steps == 0:  # our own interval, not the Trainer's
            for logger in trainer.loggers:
                logger.log_metrics({f"slimfit/{k}": float(v) for k, v in stats.items()}, step=step)

    def on_train_end(self, trainer, pl_module):
        self.session.stop()
        self._open_step = None
        # trainer.log_dir is a collective under DDP: every rank must read it.
        out = pathlib.Path(self.output_dir or pathlib.Path(trainer.log_dir or trainer.default_root_dir)
                           / "slimfit")
        if not trainer.is_global_zero:
            return
        self.files = self.session.write_files(out)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image") and self.files:
                logger.log_image(key="slimfit/freeze_heatmap", images=[str(self.files["heatmap"])])

    def on_exception(self, trainer, pl_module, exception):
        if self.session is not None:
            self.session.stop()

    def summary(self, top: int | None = None) -> str:
        """Which units were frozen how often (markdown)."""
        return self.freezer.summary(top) if self.freezer else "SlimFit has not been set up yet."

    def state_dict(self) -> dict[str, Any]:
        if self.session is None:
            return {}
        self.session.synchronize()  # Lightning reads optimizer state right after this
        return self.session.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.session is None:  # Lightning restores callback state after setup; be safe
            self._pending_state = state_dict
        else:
            self.session.load_state_dict(state_dict)
