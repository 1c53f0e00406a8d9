"""``StepTimer``: wall time of optimizer steps, for the same-run speed ratios
the experiment reports print (CUDA synchronised when the model is on a GPU,
so asynchronous kernels are not missed)."""

from __future__ import annotations

import statistics
import time

import lightning.pytorch as pl
import torch

__all__ = ["StepTimer"]


class StepTimer(pl.Callback):
    """Record the wall time of each training batch after ``skip`` warm-up batches.

    Args:
        skip: batches ignored at the start (allocator and kernel warm-up).
    """

    def __init__(self, skip: int = 2):
        if not isinstance(skip, int) or skip < 0:
            raise ValueError(f"skip must be an int >= 0, got {skip!r}.")
        self.skip = skip
        self.times: list[float] = []
        self._t0: float | None = None
        self._seen = 0

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        self._seen += 1
        if self._t0 is not None and self._seen > self.skip:
            self.times.append(time.perf_counter() - self._t0)

    @property
    def median(self) -> float | None:
        """Median step time in seconds (None before any timed step)."""
        return statistics.median(self.times) if self.times else None
