"""``SlimFit``: SlimFit (arXiv 2305.18513) as one Lightning callback. Each hook
is a call into :class:`slimfit.driver.SessionDriver`, which runs the session
(``setup`` builds it, ``on_fit_start`` starts it, the first micro-batch of an
optimizer step begins the step, the optimizer step closes it). Unsupported
setups are refused by ``checks.py`` with an error naming the fix.
"""

from __future__ import annotations

import pathlib
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from slimfit.callbacks.checks import (check_fit_start, check_fsdp2, check_single_process,
                                      check_strategy, is_fsdp2, loss_of, output_dir)
from slimfit.callbacks.sharded import load_only_saved_optimizer_state
from slimfit import SessionDriver

__all__ = ["SlimFit"]


class SlimFit(pl.Callback):
    """Freeze the least-moving ``freeze_rate`` of the weight tensors every optimizer step.

    Args:
        freeze_rate: fraction r in [0, 1) of candidate units frozen each step
            (default 0.9).
        compression / offload_optimizer_state / offload_activations /
            stream_weights: see :class:`slimfit.SessionConfig` (``True`` = the
            defaults of compression and streaming).
        memory_budget: e.g. ``"12GiB"``: at the first step the planner measures
            calibration steps and chooses what fits (:mod:`slimfit.planning`).
        log_every_n_steps: log frozen fraction and score statistics this often.
        output_dir: where the heatmap and summary go (default
            ``<logger dir>/slimfit``: ``slimfit.callbacks.checks.output_dir``).
        config / **freezing: a :class:`slimfit.SlimFitConfig`, or its fields as
            keywords (``include``, ``always_train``, ``seed`` ...).

    Raises:
        SlimFitError: invalid options (at construction); unsupported setups,
            patterns that match nothing or no candidate (at ``setup``).

    Warns:
        ShortBudgetWarning: at fit start, when the run trains each unit fewer
            times than the fidelity study needed to keep accuracy.

    Example: ``L.Trainer(callbacks=[SlimFit(freeze_rate=0.9, compression=True)])``.
    """

    def __init__(self, freeze_rate: float | None = None, *, output_dir: str | None = None,
                 **options: Any):
        self.driver = SessionDriver(freeze_rate, **options)
        self.driver.info = rank_zero_info
        self.output_dir = output_dir

    # what users and the experiments read
    session_config = property(lambda self: self.driver.session_config)
    memory_budget = property(lambda self: self.driver.memory_budget)
    session = property(lambda self: self.driver.session)
    plan = property(lambda self: self.driver.plan)
    files = property(lambda self: self.driver.files)
    freezer = property(lambda self: self.session.freezer if self.session is not None else None)

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":
            check_strategy(trainer.strategy)
            if not is_fsdp2(trainer.strategy):
                self.driver.setup(pl_module)
            else:  # units that never trained have no optimizer state to restore
                load_only_saved_optimizer_state(trainer.strategy, pl_module)

    def on_fit_start(self, trainer, pl_module):
        if not is_fsdp2(trainer.strategy):
            self._start(trainer, pl_module)

    def on_train_start(self, trainer, pl_module):
        # FSDP2: fully_shard ran in configure_model and a checkpoint's state is loaded
        # after on_fit_start, so the session is built on the sharded tensors here
        if is_fsdp2(trainer.strategy):
            self.driver.setup(pl_module)
            check_fsdp2(trainer.strategy, self.session.units)
            self._start(trainer, pl_module)

    def _start(self, trainer, pl_module):
        if self.session_config.stream is not None:
            check_single_process(trainer.world_size, "weight streaming")
        check_fit_start(pl_module, trainer.optimizers, self.session.units)
        self.driver.start(trainer.optimizers[0], trainer.estimated_stepping_batches)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.driver.begin(trainer.global_step,
                          lambda: loss_of(pl_module.training_step(batch, batch_idx)))

    def on_before_backward(self, trainer, pl_module, loss):
        self.driver.record_loss(loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.driver.before_optimizer_step()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.driver.open_step:
            return  # no optimizer step yet (gradient accumulation)
        stats = self.driver.end(trainer.global_step - 1)  # the step just taken
        for logger in trainer.loggers if stats is not None else ():
            logger.log_metrics({f"slimfit/{k}": float(v) for k, v in stats.items()},
                               step=trainer.global_step - 1)

    def on_train_end(self, trainer, pl_module):
        files = self.driver.stop(output_dir(trainer, "slimfit", self.output_dir))
        for logger in trainer.loggers if trainer.is_global_zero else ():
            if hasattr(logger, "log_image") and "heatmap" in files:
                logger.log_image(key="slimfit/freeze_heatmap", images=[str(files["heatmap"])])

    def on_exception(self, trainer, pl_module, exception):
        self.driver.stop()

    def state_dict(self) -> dict[str, Any]:
        return self.driver.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.driver.load_state_dict(state_dict)
