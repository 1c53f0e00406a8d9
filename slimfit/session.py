"""``SlimFitSession``: one model + optimizer trained the SlimFit way, the step
protocol written once.

Why one object: a SlimFit step touches up to five parts (the freezer, the
activation compressor, the optimizer-state offloader, the activation offloader
and the weight streamer) in an order that matters: the frozen set is decided
and applied before the forward; the optimizer state of frozen units leaves the
device and streamed weights frozen from now on are trimmed right after; saved
activations go to the host only between the first forward and the optimizer
step; the score snapshot is taken after backward and read after the step.
The Lightning callback, the budget planner's calibration, the benchmarks, the
GPU check and the tests all drive this object, so none of them can get the
order wrong or drop an option on the way.

One optimizer step::

    session = SlimFitSession(model, SessionConfig(freezing=SlimFitConfig(freeze_rate=0.9)))
    session.start(optimizer)               # install hooks, offloaders, streaming
    session.begin_step()                   # decide + apply the frozen set (or begin_step(frozen))
    loss = compute_loss(); session.record_loss(loss); loss.backward()
    session.before_optimizer_step()        # close activation offload, snapshot trained units
    optimizer.step(); optimizer.zero_grad(set_to_none=True)
    stats = session.end_step()             # scores of the trained units, statistics
    ...
    session.stop()                         # every weight trainable and resident again

or ``session.step(loss_fn)`` for all of it (``measure=True``: under the ledger).
"""

from __future__ import annotations

import dataclasses
import pathlib
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn

from slimfit.accuracy_price import short_budget_note
from slimfit.compress import ActivationCompressor, CompressionConfig
from slimfit.config import SlimFitConfig
from slimfit.errors import CheckpointMismatchError, OptionTypeError, SlimFitError
from slimfit.freezer import LayerFreezer
from slimfit.frozen_conv import FrozenConvRouter
from slimfit.offload import ActivationOffloader, OptimizerStateOffloader
from slimfit.selection import is_compiled
from slimfit.stream import StreamConfig, WeightStreamer

__all__ = ["SessionConfig", "SlimFitSession"]


def _option(name: str, value: Any, cls: type) -> Any:
    """``True``: the defaults of ``cls``; ``False``/``None``: off; else an instance of ``cls``."""
    if value is True:
        return cls()
    if value is False or value is None:
        return None
    if not isinstance(value, cls):
        raise OptionTypeError(f"{name} must be True, False, None or a {cls.__name__}, got {value!r}.")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class SessionConfig:
    """What a session runs; every part is optional.

    Attributes:
        freezing: per-iteration freezing (``None``: every tensor trained
            every step, as in full fine-tuning).
        compression: compress static saved activations (``None``: off).
        offload_optimizer_state: optimizer state of frozen units in host
            memory (needs ``freezing``).
        offload_activations: saved activations in host memory between the
            forward and the optimizer step (CUDA; a no-op on the CPU unless
            ``force_host_copies``).
        stream: stream the weights of frozen tensors (``None``: off; needs
            ``freezing`` to have frozen tensors to stream, one process).
        force_host_copies: do the host copies of activation offload on a
            machine without CUDA (tests: same bookkeeping, nothing saved).
    """

    freezing: SlimFitConfig | None = None
    compression: CompressionConfig | None = None
    offload_optimizer_state: bool = False
    offload_activations: bool = False
    stream: StreamConfig | None = None
    force_host_copies: bool = False

    def __post_init__(self):
        for name, cls in (("freezing", SlimFitConfig), ("compression", CompressionConfig),
                          ("stream", StreamConfig)):
            v = getattr(self, name)
            if v is not None and not isinstance(v, cls):
                raise OptionTypeError(f"SessionConfig.{name} must be a {cls.__name__} or None, "
                                   f"got {v!r}.")
        for name in ("offload_optimizer_state", "offload_activations", "force_host_copies"):
            if not isinstance(getattr(self, name), bool):
                raise OptionTypeError(f"SessionConfig.{name} must be a bool, got "
                                   f"{getattr(self, name)!r}.")
        if self.offload_optimizer_state and self.freezing is None:
            raise SlimFitError("offload_optimizer_state=True moves the optimizer state of frozen "
                               "units: it needs freezing (a SlimFitConfig); without freezing no "
                               "unit is ever frozen.")

    @classmethod
    def from_options(cls, *, config: SlimFitConfig | None = None,
                     compression: CompressionConfig | bool | None = None,
                     offload_optimizer_state: bool = False, offload_activations: bool = False,
                     stream_weights: StreamConfig | bool | None = None,
                     **freezing: Any) -> "SessionConfig":
        """The user-facing options of ``SlimFit(...)``: ``compression`` and
        ``stream_weights`` take ``True`` (defaults), ``False``/``None`` (off) or
        their config; ``freezing`` holds :class:`SlimFitConfig` fields, or pass
        ``config``.

        Raises:
            SlimFitError: both ``config`` and freezing keywords, or a bad value.
            TypeError: an unknown option (the message lists the known ones).
        """
        if config is not None and freezing:
            raise SlimFitError(f"pass either config=SlimFitConfig(...) or freezing options "
                               f"{sorted(freezing)}, not both.")
        if config is None:
            known = set(SlimFitConfig.__dataclass_fields__)
            unknown = sorted(set(freezing) - known)
            if unknown:
                raise TypeError(f"unknown SlimFit option(s) {unknown}; freezing options are the "
                                f"fields of SlimFitConfig: {sorted(known)}.")
            config = SlimFitConfig(**freezing)
        out = cls(freezing=config, compression=_option("compression", compression, CompressionConfig),
                  offload_optimizer_state=offload_optimizer_state,
                  offload_activations=offload_activations,
                  stream=_option("stream_weights", stream_weights, StreamConfig))
        if (out.offload_optimizer_state or out.offload_activations or out.stream) \
                and not torch.cuda.is_available():
            warnings.warn("SlimFit offload requested but no CUDA device is available: host and "
                          "device memory are the same here, so offloading saves nothing (the "
                          "bookkeeping still runs).", UserWarning, stacklevel=3)
        return out

    def label(self) -> str:
        """Short human-readable name, e.g. ``SlimFit r=0.9 + compression``."""
        f = self.freezing
        parts = ["full fine-tuning" if f is None or f.freeze_rate == 0
                 else f"SlimFit r={f.freeze_rate:g}"]
        parts += [n for n, on in (("optimizer-state offload", self.offload_optimizer_state),
                                  ("compression", self.compression is not None),
                                  ("weight streaming", self.stream is not None),
                                  ("activation offload", self.offload_activations)) if on]
        return " + ".join(parts)


class SlimFitSession:
    """Runs SlimFit's step protocol on one model and its optimizer.

    Args:
        model: the module being trained (its trainable parameters now define
            the freezing candidates).
        config: a :class:`SessionConfig`.

    Raises:
        SlimFitError: bad options, a pattern that matches nothing, a model with
            no candidate, a compiled model with compression or streaming.
    """

    def __init__(self, model: nn.Module, config: SessionConfig | None = None):
        self.model = model
        self.config = config if config is not None else SessionConfig()
        if not isinstance(self.config, SessionConfig):
            raise SlimFitError(f"config must be a SessionConfig, got {self.config!r}.")
        c = self.config
        # built now so that selection errors surface before any training
        self.freezer = LayerFreezer(model, c.freezing) if c.freezing is not None else None
        self.compressor = ActivationCompressor(model, c.compression) \
            if c.compression is not None else None
        self.optimizer: torch.optim.Optimizer | None = None
        self.offloader: OptimizerStateOffloader | None = None
        self.streamer: WeightStreamer | None = None
        # frozen convolutions save no input (exact); not under torch.compile, whose
        # graphs would break at the hooks' function mode
        self.conv_router = FrozenConvRouter(model) \
            if self.freezer is not None and not is_compiled(model) else None
        self._act: ActivationOffloader | None = None  # built once: one side stream
        self._act_open = False
        self._finite: torch.Tensor | None = None  # all losses of the step finite (no sync)

    # -- life cycle ------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self.optimizer is not None

    @property
    def units(self) -> Sequence[Any]:
        """The freezer's units (empty without freezing)."""
        return self.freezer.units if self.freezer is not None else ()

    def start(self, optimizer: torch.optim.Optimizer) -> "SlimFitSession":
        """Install compression, the offloaders and weight streaming for ``optimizer``
        (call once the model is on its training device). Idempotent."""
        if self.started:
            return self
        opt = getattr(optimizer, "optimizer", optimizer)  # Lightning's LightningOptimizer
        if not isinstance(opt, torch.optim.Optimizer):
            raise SlimFitError(f"start() needs a torch.optim.Optimizer, got {optimizer!r}.")
        self.optimizer = opt
        c = self.config
        if self.compressor is not None:
            self.compressor.install()
        if self.conv_router is not None:
            self.conv_router.install()
        if c.offload_optimizer_state:
            self.offloader = OptimizerStateOffloader(opt, [u.params for u in self.units])
        if c.stream is not None:
            self.streamer = WeightStreamer(self.model, c.stream).install()
        if c.offload_activations and self._act is None and (torch.cuda.is_available()
                                                            or c.force_host_copies):
            # the model's weights are never copied; nothing to move on a CPU-only machine
            self._act = ActivationOffloader(self.model, force_host_copy=c.force_host_copies,
                                            min_bytes=0 if c.force_host_copies else 1 << 16)
        return self

    def stop(self) -> None:
        """Undo :meth:`start`: every weight resident and trainable, every hook
        removed, offloaded optimizer state back on the device. Idempotent."""
        self._close_activation_offload()
        if self.streamer is not None:
            self.streamer.remove()
            self.streamer = None
        if self.offloader is not None:  # kept: its counters stay readable
            self.offloader.restore_all()
        if self.freezer is not None:
            self.freezer.restore()
        if self.compressor is not None:
            self.compressor.remove()
        if self.conv_router is not None:
            self.conv_router.remove()
        self._finite = None
        self.optimizer = None

    # -- one optimizer step --------------------------------------------------------------
    def decide(self) -> list[int]:
        """The frozen unit indices for the coming step (broadcast them under DDP)."""
        return self.freezer.decide() if self.freezer is not None else []

    def begin_step(self, frozen: Sequence[int] | None = None) -> list[int]:
        """Apply ``frozen`` (default: :meth:`decide`), move optimizer state and
        streamed weights accordingly, and open activation offload."""
        if not self.started:
            raise SlimFitError("begin_step() before start(optimizer): the session is not running.")
        frozen = self.decide() if frozen is None else list(frozen)
        if self.freezer is not None:
            self.freezer.apply(frozen)
        if self.offloader is not None:
            self.offloader.sync(frozen)  # state of frozen units to host, trained ones back
        if self.streamer is not None:
            self.streamer.sync()  # weights frozen from this step on may leave the device
        if self._act is not None and not self._act_open:
            self._act.__enter__()
            self._act_open = True
        self._finite = None
        return frozen

    def record_loss(self, loss: torch.Tensor) -> None:
        """Note a micro-batch loss; a non-finite one makes the step's scores unrecorded
        (``SlimFitConfig.on_nonfinite``). No device->host sync here."""
        if torch.is_tensor(loss):
            ok = torch.isfinite(loss.detach()).all()
            self._finite = ok if self._finite is None else self._finite & ok

    def before_optimizer_step(self) -> None:
        """After backward, before ``optimizer.step()``."""
        self._close_activation_offload()
        if self.offloader is not None:
            self.offloader.before_optimizer_step()
        if self.freezer is not None:
            self.freezer.before_optimizer_step(self.optimizer)

    def end_step(self, skipped: bool = False) -> dict[str, float]:
        """After ``optimizer.step()``: score the trained units; returns statistics
        to log (``skipped``: the grad scaler skipped the step)."""
        stats: dict[str, float] = {}
        if self.freezer is not None:
            stats = dict(self.freezer.after_optimizer_step(skipped=skipped, loss=self._finite))
        if self.streamer is not None:  # overlap achieved, traffic so far
            stats |= {f"stream_{k}": float(v) for k, v in self.streamer.stats.items()}
            stats["stream_prefetch_hit_rate"] = self.streamer.overlap()
        self._finite = None
        return stats

    def _close_activation_offload(self) -> None:
        if self._act_open:
            self._act.__exit__(None, None, None)
            self._act_open = False

    def step(self, loss_fn: Callable[[], torch.Tensor], measure: bool = False,
             frozen: Sequence[int] | None = None):
        """One whole optimizer step: ``loss_fn()`` does the forward and returns
        the loss. With ``measure``, the step runs under the memory ledger and its
        :class:`slimfit.ledger.MemoryReport` is returned (else ``None``)."""
        from slimfit.ledger import measure_step  # the ledger imports features, not vice versa

        self.begin_step(frozen)

        def forward_backward():
            loss = loss_fn()
            self.record_loss(loss)
            loss.backward()
            self.before_optimizer_step()

        report = None
        if measure:
            report = measure_step(self.model, self.optimizer, forward_backward,
                                  self.host_storage_keys(), streamer=self.streamer)
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
    def short_budget_note(self, total_steps: float) -> str | None:
        """A warning if ``total_steps`` optimizer steps train each candidate unit
        fewer times than the fidelity study needed to keep accuracy
        (:func:`slimfit.accuracy_price.short_budget_note`); None otherwise."""
        if self.freezer is None:
            return None
        return short_budget_note(total_steps, self.freezer.scheduler.num_trained,
                                 len(self.freezer.units))

    def host_storage_keys(self) -> set:
        """Optimizer state held in host memory, for the memory ledger."""
        return self.offloader.host_storage_keys() if self.started and self.offloader else set()

    def describe(self) -> str:
        lines = [f"SlimFit session: {self.config.label()}"]
        if self.freezer is not None:
            lines.append(f"  freezing: {self.freezer.selection}; {self.freezer.num_frozen} of "
                         f"{len(self.freezer.units)} units frozen per step")
        if self.compressor is not None:
            lines.append("  activation compression:\n" + self.compressor.describe())
        if self.streamer is not None:
            lines.append("  " + self.streamer.describe())
        return "\n".join(lines)

    def write_files(self, out: str | pathlib.Path) -> dict[str, pathlib.Path]:
        """The freezing heatmap (unit x step) and the summary table under ``out``
        (nothing without freezing or before the first step)."""
        if self.freezer is None or not len(self.freezer.history):
            return {}
        out = pathlib.Path(out)
        files = {"heatmap": self.freezer.history.plot_heatmap(out / "freeze_heatmap.png"),
                 "summary": out / "freeze_summary.md"}
        files["summary"].write_text(self.freezer.summary() + "\n")
        return files

    def synchronize(self) -> None:
        """Wait for host copies in flight (before a checkpoint reads optimizer state)."""
        if self.offloader is not None:
            self.offloader.synchronize()

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python freezing state (empty without freezing)."""
        return self.freezer.state_dict() if self.freezer is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            CheckpointMismatchError: corrupt state, or a state for another model.
        """
        if self.freezer is not None:
            self.freezer.load_state_dict(state)
        elif state:
            raise CheckpointMismatchError(
                "the checkpoint holds SlimFit freezing state but this session does not freeze "
                "(SessionConfig.freezing is None); resume with the same SlimFit options.")
