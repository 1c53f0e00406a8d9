"""``SlimFit``: per-iteration layer freezing (arXiv 2305.18513) as one Lightning
callback. The method lives in :class:`slimfit.freezer.LayerFreezer`; this file
maps it onto Lightning's hooks and guards the setups where it would be
silently wrong.

Hook map (one optimizer step, any gradient accumulation):

* ``on_train_batch_start`` of the first micro-batch: decide the frozen set
  (rank 0's decision broadcast under DDP) and apply it;
* ``on_before_optimizer_step``: snapshot the trained units (after backward;
  gradients already unscaled under AMP);
* ``on_train_batch_end`` once ``global_step`` advanced: score the trained units.
  A step skipped by the grad scaler moves no weight and is not a measurement.

Weight streaming (``stream_weights``) is installed at fit start, once the
strategy has placed the model, trimmed to k blocks after each decision, and
removed (every weight back on the device) at the end of training.

Refused with a clear error: weight streaming with more than one process;
FSDP, DeepSpeed and other sharded strategies; DDP without
``find_unused_parameters=True`` or with ``static_graph``; manual optimization;
candidates missing from the optimizer or frozen when DDP wrapped the model
(they would never be synchronised).
"""

from __future__ import annotations

import pathlib
import warnings
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from slimfit.callbacks.checks import (check_fit_start, check_single_process, check_strategy,
                                      loss_of)
from slimfit.compress import ActivationCompressor, CompressionConfig
from slimfit.config import SlimFitConfig
from slimfit.freezer import LayerFreezer
from slimfit.offload import ActivationOffloader, OptimizerStateOffloader
from slimfit.planner import (Plan, build_plan, default_candidates, optimizer_like, parse_budget,
                             plan_for_budget)
from slimfit.selection import Pattern
from slimfit.stream import StreamConfig, WeightStreamer

__all__ = ["SlimFit"]


def _config_option(name: str, value: Any, cls: type) -> Any:
    """``True``: the defaults of ``cls``; ``False``/``None``: off; else an instance of ``cls``."""
    if value is True:
        return cls()
    if value is False or value is None:
        return None
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be True, False, None or a {cls.__name__}, got {value!r}.")
    return value


class SlimFit(pl.Callback):
    """Freeze the least-moving ``freeze_rate`` of the weight tensors every optimizer step.

    Args:
        freeze_rate: fraction r in [0, 1) of candidate units frozen each step.
        include / exclude / always_train / groups / seed / max_frozen_age /
            score_eps / lr_normalized: see :class:`slimfit.config.SlimFitConfig`.
        compression: compress the static saved activations (GELU input, attention
            operands and probabilities, LayerNorm input, FFN down-projection
            input, dropout masks): ``True`` for the defaults, a
            :class:`slimfit.compress.CompressionConfig`, or ``None``/``False``.
        offload_optimizer_state: keep the optimizer state of frozen units in
            pinned host memory, prefetched on a side CUDA stream when the unit
            trains again (exact).
        offload_activations: save tensors for backward in pinned host memory,
            copied on a side CUDA stream (combined with compression, the
            compressed bytes are what moves).
        stream_weights: keep the weights of frozen tensors in host memory with
            only k blocks on the device, prefetching k' ahead (``True`` for
            k=2, k'=1, or a :class:`slimfit.stream.StreamConfig`); exact.
            Single process only.
        memory_budget: e.g. ``"12GiB"``: at the first step, calibration steps
            measured by the ledger choose the freezing rate, offload,
            compression and weight streaming (k, k') that fit
            (``slimfit.planner``); the other options then only set selection
            and scoring.
        log_every_n_steps: log frozen fraction and score statistics this often.
        output_dir: where the heatmap and summary go at the end of training
            (default ``<log_dir or default_root_dir>/slimfit``).

    Raises:
        SlimFitError: invalid options (at construction); unsupported trainer
            setups, patterns that match nothing or a model with no candidate
            (at ``setup``).

    Example::

        trainer = L.Trainer(callbacks=[SlimFit(freeze_rate=0.9, always_train=["classifier.weight"])])
    """

    def __init__(self, freeze_rate: float = 0.9, *, include: Pattern | None = None,
                 exclude: Pattern | None = None, always_train: Pattern | None = None,
                 groups: Sequence[str] | None = None, seed: int = 0,
                 max_frozen_age: int | None = None, score_eps: float = 1e-8,
                 lr_normalized: bool = False, compression: CompressionConfig | bool | None = None,
                 offload_optimizer_state: bool = False, offload_activations: bool = False,
                 stream_weights: StreamConfig | bool | None = None,
                 memory_budget: str | int | None = None,
                 log_every_n_steps: int = 1, output_dir: str | None = None):
        self.config = SlimFitConfig(freeze_rate=freeze_rate, include=include, exclude=exclude,
                                    always_train=always_train, groups=groups, seed=seed,
                                    max_frozen_age=max_frozen_age, score_eps=score_eps,
                                    lr_normalized=lr_normalized)
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) \
                or log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be a positive int, got {log_every_n_steps!r}.")
        self.compression = _config_option("compression", compression, CompressionConfig)
        for name, v in (("offload_optimizer_state", offload_optimizer_state),
                        ("offload_activations", offload_activations)):
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, got {v!r}.")
        self.stream_config = _config_option("stream_weights", stream_weights, StreamConfig)
        self.streamer: WeightStreamer | None = None
        if (offload_optimizer_state or offload_activations or self.stream_config) \
                and not torch.cuda.is_available():
            warnings.warn("SlimFit offload requested but no CUDA device is available: host and "
                          "device memory are the same here, so offloading saves nothing (the "
                          "bookkeeping still runs).", UserWarning, stacklevel=2)
        self.offload_optimizer_state = offload_optimizer_state
        self.offload_activations = offload_activations
        self.offloader: OptimizerStateOffloader | None = None
        self._act_offloader: ActivationOffloader | None = None  # built once: one side stream
        self._act_active = False
        self.memory_budget = None if memory_budget is None else parse_budget(memory_budget)
        self.plan: Plan | None = None
        self.log_every_n_steps = log_every_n_steps
        self.output_dir = output_dir
        self.freezer: LayerFreezer | None = None
        self.compressor: ActivationCompressor | None = None
        self.files: dict[str, pathlib.Path] = {}
        self._pending_state: dict | None = None
        self._open_step: int | None = None

    # -- setup and checks ------------------------------------------------------
    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        check_strategy(trainer.strategy)
        if self.freezer is None:
            self.freezer = LayerFreezer(pl_module, self.config)
            rank_zero_info(f"SlimFit: {self.freezer.selection}; {self.freezer.num_frozen} of "
                           f"{len(self.freezer.units)} units frozen per step.")
        if self.compression is not None and self.compressor is None:
            self.compressor = ActivationCompressor(pl_module, self.compression).install()
            rank_zero_info("SlimFit activation compression:\n" + self.compressor.describe())
        if self._pending_state is not None:
            self.freezer.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_fit_start(self, trainer, pl_module):
        check_fit_start(pl_module, trainer.optimizers, self.freezer.units)
        if self.offload_optimizer_state:
            self.offloader = OptimizerStateOffloader(trainer.optimizers[0],
                                                     [u.params for u in self.freezer.units])
        if self.stream_config is not None:
            self._start_streaming(trainer, pl_module, self.stream_config)

    def _start_streaming(self, trainer, pl_module, config: StreamConfig) -> None:
        check_single_process(trainer.world_size, "weight streaming")
        self.streamer = WeightStreamer(pl_module, config).install()
        rank_zero_info("SlimFit " + self.streamer.describe())

    # -- per step ---------------------------------------------------------------
    def _make_plan(self, trainer, pl_module, batch, batch_idx) -> None:
        opt = trainer.optimizers[0]
        options = self.config.selection_kwargs() | {"max_frozen_age": self.config.max_frozen_age,
                                                    "lr_normalized": self.config.lr_normalized}
        for part in (self.compressor, self.streamer):  # calibration installs its own
            if part is not None:
                part.remove()
        self.compressor = self.streamer = None
        plan = plan_for_budget(pl_module, optimizer_like(opt),
                               lambda: loss_of(pl_module.training_step(batch, batch_idx)),
                               self.memory_budget, seed=self.config.seed,
                               compression=self.compression,
                               candidates=default_candidates(stream=trainer.world_size == 1),
                               **options)
        self.plan = trainer.strategy.broadcast(plan, src=0) if trainer.world_size > 1 else plan
        rank_zero_info(self.plan.describe())
        resumed = self.freezer.state_dict() if len(self.freezer.history) else None
        self.freezer, self.compressor, self.offloader, stream = build_plan(
            self.plan, pl_module, opt, self.compression, seed=self.config.seed, **options)
        if stream is not None:
            self._start_streaming(trainer, pl_module, stream)
        if resumed is not None:  # scores, ages and history survive re-planning after a resume
            self.freezer.load_state_dict(resumed)
        self.offload_activations = self.plan.candidate.offload_activations

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._open_step == trainer.global_step:
            return  # later micro-batch of the same optimizer step
        if self.memory_budget is not None and self.plan is None:
            self._make_plan(trainer, pl_module, batch, batch_idx)
        frozen = self.freezer.decide()
        if trainer.world_size > 1:  # identical frozen sets on every rank, whatever the scores
            frozen = trainer.strategy.broadcast(frozen, src=0)
        self.freezer.apply(frozen)
        if self.offloader is not None:
            self.offloader.sync(frozen)  # state of frozen units to host, trained ones back
        if self.streamer is not None:
            self.streamer.sync()  # weights frozen from this step on may leave the device
        if self.offload_activations:
            if self._act_offloader is None and torch.cuda.is_available():  # no-op on CPU
                self._act_offloader = ActivationOffloader(pl_module)  # weights are not copied
            if self._act_offloader is not None:
                self._act_offloader.__enter__()
                self._act_active = True
        self._open_step = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._end_activation_offload()
        if self.offloader is not None:
            self.offloader.before_optimizer_step()
        self.freezer.before_optimizer_step(optimizer)

    def _end_activation_offload(self) -> None:
        if self._act_active:
            self._act_offloader.__exit__(None, None, None)
            self._act_active = False

    def offloaded_storage_keys(self) -> set:
        """Optimizer state held in host memory, for the memory ledger."""
        return self.offloader.host_storage_keys() if self.offloader is not None else set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._open_step is None or trainer.global_step == self._open_step:
            return  # no optimizer step yet (gradient accumulation)
        stats = self.freezer.after_optimizer_step()
        self._open_step = None
        step = trainer.global_step - 1  # the step just taken
        if step % self.log_every_n_steps == 0:  # our own interval, not the Trainer's
            metrics = {f"slimfit/{k}": float(v) for k, v in stats.items()}
            if self.streamer is not None:  # overlap achieved, traffic so far
                metrics |= {f"slimfit/stream_{k}": float(v) for k, v in self.streamer.stats.items()}
                metrics["slimfit/stream_prefetch_hit_rate"] = self.streamer.overlap()
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    # -- end of training ------------------------------------------------------------
    def _release(self) -> None:
        self._end_activation_offload()
        if self.streamer is not None:
            self.streamer.remove()  # every weight back on the device for good
            self.streamer = None
        if self.offloader is not None:
            self.offloader.restore_all()
        if self.freezer is not None:
            self.freezer.restore()
        if self.compressor is not None:
            self.compressor.remove()
            self.compressor = None

    def on_train_end(self, trainer, pl_module):
        self._release()
        self._open_step = None
        # trainer.log_dir is a collective under DDP: every rank must read it.
        out = pathlib.Path(self.output_dir or pathlib.Path(trainer.log_dir or trainer.default_root_dir)
                           / "slimfit")
        if not trainer.is_global_zero or not len(self.freezer.history):
            return
        self.files = {"heatmap": self.freezer.history.plot_heatmap(out / "freeze_heatmap.png"),
                      "summary": out / "freeze_summary.md"}
        self.files["summary"].write_text(self.freezer.summary() + "\n")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="slimfit/freeze_heatmap", images=[str(self.files["heatmap"])])

    def on_exception(self, trainer, pl_module, exception):
        self._release()

    def summary(self, top: int | None = None) -> str:
        """Which units were frozen how often (markdown)."""
        return self.freezer.summary(top) if self.freezer else "SlimFit has not been set up yet."

    # -- checkpointing ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.offloader is not None:  # Lightning reads optimizer state right after this
            self.offloader.synchronize()
        return self.freezer.state_dict() if self.freezer is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.freezer is None:  # Lightning restores callback state after setup; be safe
            self._pending_state = state_dict
        else:
            self.freezer.load_state_dict(state_dict)

