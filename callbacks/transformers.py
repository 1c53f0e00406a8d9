"""``SlimFitTrainerCallback``: SlimFit for ``transformers.Trainer`` (and the
trainers built on it, TRL's ``SFTTrainer``), the same options as the
Lightning callback. Each hook is a call into
:class:`slimfit.driver.SessionDriver`: the first micro-batch of an optimizer
step begins the step (one frozen set per optimizer step under gradient
accumulation), the optimizer step closes it (scores from the real update),
``on_save`` writes the freezing state into the checkpoint folder and a
resumed run reads it back. Statistics and, every ``memory_every_n_steps``,
the ledger's memory report go into the Trainer's logs, so every
``report_to`` logger receives them.
"""

from __future__ import annotations

import inspect
import pathlib
from typing import Any

import torch
from transformers import TrainerCallback

from slimfit.distributed import is_rank_zero, world_size
from slimfit.driver import SessionDriver
from slimfit.errors import CheckpointMismatchError, UnsupportedSetupError
from slimfit.memory.ledger import MeasuredStep

__all__ = ["SlimFitTrainerCallback"]

#: the file the freezing state is written to, inside each checkpoint-N folder
STATE_FILE = "slimfit_state.pt"


class SlimFitTrainerCallback(TrainerCallback):
    """SlimFit in a ``transformers.Trainer``: ``Trainer(..., callbacks=[SlimFitTrainerCallback(0.9)])``.

    Args:
        freeze_rate / **options: as :class:`slimfit.callbacks.SlimFit` (``compression``,
            ``chunked_loss``, ``optimizer_state``, ``policy``, ``memory_budget`` ...).
        memory_every_n_steps: log the ledger's report of every n-th optimizer
            step (0: never).
        output_dir: where the heatmap and summary go (default
            ``<TrainingArguments.output_dir>/slimfit``).

    Raises:
        SlimFitError: invalid options; at train begin, unsupported setups
            (DeepSpeed, FSDP, DDP without ``ddp_find_unused_parameters``).
    """

    def __init__(self, freeze_rate: float | None = None, *, memory_every_n_steps: int = 0,
                 output_dir: str | None = None, **options: Any):
        self.driver = SessionDriver(freeze_rate, **options)
        self.memory_every_n_steps = int(memory_every_n_steps)
        self.output_dir = output_dir
        self.history: list[tuple[int, Any]] = []
        self._logs: dict[str, float] = {}
        self._measured: MeasuredStep | None = None

    session = property(lambda self: self.driver.session)
    freezer = property(lambda self: self.session.freezer if self.session is not None else None)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _check_setup(args, model)
        _put_before_reporters(self)  # so our entries reach every report_to logger
        self.driver.setup(model)
        if state.global_step > 0:  # resumed: the freezing state saved with that checkpoint
            ckpt = pathlib.Path(args.resume_from_checkpoint or
                                pathlib.Path(args.output_dir) / f"checkpoint-{state.global_step}")
            if not (ckpt / STATE_FILE).exists():
                raise CheckpointMismatchError(
                    f"resuming at step {state.global_step} but {ckpt / STATE_FILE} does not exist: "
                    "the checkpoint was not written with SlimFitTrainerCallback, or is elsewhere "
                    "(pass TrainingArguments(resume_from_checkpoint=<its folder>)).")
            self.driver.load_state_dict(torch.load(ckpt / STATE_FILE, weights_only=False))
        self.driver.start(optimizer, state.max_steps)

    def on_step_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.memory_every_n_steps and state.global_step % self.memory_every_n_steps == 0:
            self._measured = MeasuredStep(model, self.session.parts).open()
        self.driver.begin(state.global_step, _first_batch_loss(model, train_dataloader)
                          if self.driver.memory_budget is not None else None)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.driver.before_optimizer_step()
        if self._measured is not None:
            self._measured.gradients_ready()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        stats = self.driver.end(state.global_step)
        self._logs.update({f"slimfit/{k}": float(v) for k, v in (stats or {}).items()})
        if self._measured is not None:
            report = self._measured.close(getattr(optimizer, "optimizer", optimizer))
            self._measured = None
            self.history.append((state.global_step, report))
            self._logs.update(report.scalars("memory/"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs.update(self._logs)
        self._logs = {}

    def on_save(self, args, state, control, **kwargs):
        state_dict = self.driver.state_dict()
        ckpt = pathlib.Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if is_rank_zero() and ckpt.is_dir():
            torch.save(state_dict, ckpt / STATE_FILE)

    def on_train_end(self, args, state, control, **kwargs):
        if self._measured is not None:
            self._measured.abort()
        self.driver.stop(self.output_dir or pathlib.Path(args.output_dir) / "slimfit")


def _first_batch_loss(model, loader):
    """The loss of the training data's first batch: what a memory budget's
    calibration steps measure (the Trainer hands callbacks no batch)."""
    batch = next(iter(loader))
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return lambda: model(**batch).loss


def _check_setup(args, model=None) -> None:
    """Refuse what per-step freezing cannot run correctly under."""
    if getattr(args, "deepspeed", None):
        raise UnsupportedSetupError(
            "SlimFitTrainerCallback does not support DeepSpeed: ZeRO fixes the trainable set at "
            "initialize (DeepSpeed #5639), so per-step freezing would not apply. Use DDP "
            "(torchrun, no deepspeed=) or FSDP2 with Lightning's ModelParallelStrategy.")
    if getattr(args, "fsdp", None):
        raise UnsupportedSetupError(
            f"SlimFitTrainerCallback refuses accelerate's FSDP (fsdp={args.fsdp!r}): FSDP1 either "
            "fails on mixed requires_grad or saves no gradient memory (pytorch #104690), and "
            "accelerate's FSDP2 preparation (parameters re-created from a full state dict, "
            "optimizer groups switched) has not been verified with per-step freezing, so a run "
            "could be silently wrong. Use DDP (torchrun, no fsdp=), or FSDP2 through Lightning's "
            "ModelParallelStrategy with slimfit.callbacks.SlimFit (docs/multi-node.md).")
    if world_size() > 1 and _find_unused(args, model) is False:
        why = ("ddp_find_unused_parameters=False" if args.ddp_find_unused_parameters is False else
               "gradient_checkpointing=True with ddp_find_unused_parameters unset, which makes "
               "transformers pass find_unused_parameters=False (TRL's SFTConfig turns "
               "gradient checkpointing on by default)")
        raise UnsupportedSetupError(
            f"SlimFit under DDP needs find_unused_parameters=True (frozen layers produce no "
            f"gradient); this run has {why}, and DDP would fail with 'Expected to have "
            "finished reduction'. Set ddp_find_unused_parameters=True (with gradient "
            "checkpointing, also gradient_checkpointing_kwargs={'use_reentrant': False}).")


def _find_unused(args, model=None) -> bool:
    """What the Trainer will pass to DDP as ``find_unused_parameters`` (its own
    rule: unset means True unless activation checkpointing is on)."""
    if args.ddp_find_unused_parameters is not None:
        return bool(args.ddp_find_unused_parameters)
    return not (getattr(args, "gradient_checkpointing", False)
                or getattr(args, "activation_checkpointing", False)
                or getattr(model, "is_activation_checkpointing", False))


def _put_before_reporters(callback: TrainerCallback) -> None:
    """Move ``callback`` right after the Trainer's flow callback, before the
    ``report_to`` loggers, so the entries it adds in ``on_log`` reach them.
    The handler is the caller of ``on_train_begin`` (transformers passes no
    handle to the Trainer); where it cannot be found, SlimFit's entries reach
    the loggers listed after it only."""
    frame = inspect.currentframe()
    handler = None
    while frame is not None and handler is None:
        owner = frame.f_locals.get("self")
        if type(owner).__name__ == "CallbackHandler":
            handler = owner
        frame = frame.f_back
    if handler is None or callback not in handler.callbacks:
        return
    handler.callbacks.remove(callback)
    handler.callbacks.insert(1 if handler.callbacks else 0, callback)
