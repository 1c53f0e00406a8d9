"""``MemoryMonitor``: the ledger's breakdown of real training steps, logged from
a Lightning run.

Every ``every_n_steps`` optimizer steps the callback wraps one step in the
ledger (saved-tensor hooks and module hooks from the first micro-batch of the
step to the optimizer step), counts gradients in ``on_before_optimizer_step``
(gradients as held at the step, already unscaled under AMP) and optimizer
state after the step, and logs the scalars through every attached logger. All
hooks are removed between measurements, so unmeasured steps cost nothing. At
the end of training it writes the per-module table and the stacked-bar chart
(``slimfit.memory_files``) and hands the chart to loggers that take images.
"""

from __future__ import annotations

import pathlib
from typing import Any

import lightning.pytorch as pl

from slimfit.ledger import build_report, count_gradients, count_optimizer_state, cuda_peak
from slimfit.memory_files import write_memory_files
from slimfit.report import MemoryReport
from slimfit.tracker import SavedTensorTracker
from slimfit.session import SlimFitSession
from slimfit.stream import WeightStreamer

__all__ = ["MemoryMonitor"]


class MemoryMonitor(pl.Callback):
    """Measure training memory every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: measure the optimizer steps whose index is a multiple of
            this (step 0 included).
        output_dir: where the end-of-training files go; default
            ``<trainer.log_dir or default_root_dir>/memory``.
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
        self._tracker: SavedTensorTracker | None = None
        self._cuda_cm: Any = None
        self._cuda_box: list | None = None
        self._grads: tuple[int, dict[str, int]] | None = None

    @property
    def measuring(self) -> bool:
        """True while a step is being measured (hooks installed)."""
        return self._tracker is not None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._tracker is None and trainer.global_step % self.every_n_steps == 0:
            self._cuda_cm = cuda_peak(pl_module)
            self._cuda_box = self._cuda_cm.__enter__()
            self._tracker = SavedTensorTracker(pl_module).__enter__()
            self._grads = None
            streamer = _streamer(trainer)
            if streamer is not None:
                streamer.reset_peak()  # weights on the device: this step's high-water mark

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self._tracker is not None:
            self._tracker.close()  # backward is done: stop packing, drop module hooks
            self._grads = count_gradients(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._tracker is None or self._grads is None:
            return  # not measuring, or a micro-batch inside an accumulation window
        session = _session(trainer)
        host = session.host_storage_keys() if session is not None else set()
        optim = count_optimizer_state(pl_module, trainer.optimizers, host)
        self._cuda_cm.__exit__(None, None, None)
        report = build_report(pl_module, self._tracker, self._grads, optim, cuda=self._cuda_box[0],
                              streamer=_streamer(trainer))
        self._reset()
        step = trainer.global_step - 1  # the step just taken
        self.history.append((step, report))
        for logger in trainer.loggers:
            logger.log_metrics(report.scalars(self.prefix), step=step)

    def _reset(self) -> None:
        if self._tracker is not None:
            self._tracker.close()
        self._tracker = self._cuda_cm = self._cuda_box = self._grads = None

    def on_train_end(self, trainer, pl_module):
        self._reset()
        # trainer.log_dir is a collective under DDP: every rank must read it.
        root = self.output_dir or pathlib.Path(trainer.log_dir or trainer.default_root_dir) / "memory"
        if not self.history or not trainer.is_global_zero:
            return
        self.files = write_memory_files(self.history, root, depth=self.depth)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="memory/breakdown", images=[str(self.files["plot"])],
                                 step=self.history[-1][0])

    def on_exception(self, trainer, pl_module, exception):
        self._reset()


def _session(trainer) -> SlimFitSession | None:
    """The running session of the run's SlimFit callback, if any."""
    from slimfit.callbacks.slimfit import SlimFit  # a sibling module, imported when needed
    return next((c.session for c in trainer.callbacks
                 if isinstance(c, SlimFit) and c.session is not None), None)


def _streamer(trainer) -> WeightStreamer | None:
    """The weight streamer of the run (SlimFit's ``stream_weights``), if any."""
    session = _session(trainer)
    return session.streamer if session is not None else None
