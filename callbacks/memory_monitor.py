"""``MemoryMonitor``: the ledger's breakdown of real training steps, logged from
a Lightning run.

Every ``every_n_steps`` optimizer steps the callback holds one
:class:`slimfit.memory.ledger.MeasuredStep` across its hooks: opened at the
first micro-batch of the step, its gradients counted in
``on_before_optimizer_step`` (as held at the step, already unscaled under
AMP), closed after the step; the scalars go to every attached logger. A
running SlimFit session is found with ``SlimFitSession.of(pl_module)``, so
what its parts keep in host memory is reported apart. All hooks are removed
between measurements, so unmeasured steps cost nothing. At the end of
training it writes the per-module table and the stacked-bar chart
(``slimfit.memory.files``) and hands the chart to loggers that take images.
"""

from __future__ import annotations

import pathlib

import lightning.pytorch as pl

from slimfit.callbacks.checks import output_dir
from slimfit.memory.files import write_memory_files
from slimfit import MeasuredStep
from slimfit import MemoryReport
from slimfit import SlimFitSession

__all__ = ["MemoryMonitor"]


class MemoryMonitor(pl.Callback):
    """Measure training memory every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: measure the optimizer steps whose index is a multiple of
            this (step 0 included).
        output_dir: where the end-of-training files go; default
            ``<logger dir>/memory`` (``slimfit.callbacks.checks.output_dir``).
        depth: fold module names to this many components in the table and
            chart (``None``: every module).
        prefix: prefix of the logged scalar names.

    Raises:
        ValueError: ``every_n_steps`` is not a positive int, ``depth`` is not None
            or an int >= 1, or ``prefix`` is not a string.
    """

    def __init__(self, *, every_n_steps: int = 50, output_dir: str | None = None,
                 depth: int | None = None, prefix: str = "memory/"):
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}; "
                             "use 1 to measure every optimizer step.")
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)
                                  or depth < 1):
            raise ValueError(f"depth must be None or an int >= 1, got {depth!r}.")
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a string such as 'memory/', got {prefix!r}.")
        self.every_n_steps = every_n_steps
        self.output_dir = output_dir
        self.depth = depth
        self.prefix = prefix
        self.history: list[tuple[int, MemoryReport]] = []
        self.files: dict[str, pathlib.Path] = {}
        self._measured: MeasuredStep | None = None

    @property
    def measuring(self) -> bool:
        """True while a step is being measured (hooks installed)."""
        return self._measured is not None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._measured is None and trainer.global_step % self.every_n_steps == 0:
            session = SlimFitSession.of(pl_module)
            self._measured = MeasuredStep(pl_module, session.parts if session else ()).open()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self._measured is not None:
            self._measured.gradients_ready()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._measured is None or not self._measured.counted_gradients:
            return  # not measuring, or a micro-batch inside an accumulation window
        report = self._measured.close(trainer.optimizers)
        self._measured = None
        step = trainer.global_step - 1  # the step just taken
        self.history.append((step, report))
        for logger in trainer.loggers:
            logger.log_metrics(report.scalars(self.prefix), step=step)

    def _reset(self) -> None:
        if self._measured is not None:
            self._measured.abort()
        self._measured = None

    def on_train_end(self, trainer, pl_module):
        self._reset()
        root = output_dir(trainer, "memory", self.output_dir)  # a collective under DDP
        if not self.history or not trainer.is_global_zero:
            return
        self.files = write_memory_files(self.history, root, depth=self.depth)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="memory/breakdown", images=[str(self.files["plot"])],
                                 step=self.history[-1][0])

    def on_exception(self, trainer, pl_module, exception):
        self._reset()
