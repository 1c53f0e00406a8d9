"""``LayerFreezer``: SlimFit's per-step freezing applied to a model, in plain
PyTorch (the Lightning callback and a hand-written loop both drive it).

One optimizer step is::

    frozen = freezer.decide()        # scheduler's choice (broadcast it under DDP)
    freezer.apply(frozen)            # requires_grad toggled, frozen grads dropped
    loss.backward()                  # (any number of micro-batches)
    freezer.before_optimizer_step()  # snapshot of the trained units only
    optimizer.step()
    freezer.after_optimizer_step()   # scores of trained units, history

Freezing is ``requires_grad=False`` plus ``grad=None``: the parameter stays in
its optimizer param group (no group is ever added or removed), and optimizers
skip a parameter whose gradient is ``None``, so a frozen tensor is
bit-identical after the step (weight decay and momentum included). Autograd
then neither computes its weight gradient nor saves the input kept only for it.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

import torch
from torch import nn

from slimfit.config import SlimFitConfig
from slimfit.errors import CheckpointMismatchError, SlimFitError
from slimfit.history import FreezeHistory
from slimfit.scheduler import InterLayerScheduler
from slimfit.scores import WeightSnapshot
from slimfit.selection import Selection, select_units

__all__ = ["LayerFreezer"]


class LayerFreezer:
    """Per-iteration freezing of a model's candidate units.

    Args:
        model: the module to fine-tune (its trainable parameters at this
            point define the candidates).
        config: a :class:`SlimFitConfig`; or pass its fields as keywords.

    Raises:
        SlimFitError: bad options; SelectionError when a pattern matches
            nothing or the model has no candidate.
    """

    def __init__(self, model: nn.Module, config: SlimFitConfig | None = None, **kwargs: Any):
        if config is not None and kwargs:
            raise SlimFitError("pass either config=SlimFitConfig(...) or keyword options, not both.")
        self.config = config if config is not None else SlimFitConfig(**kwargs)
        self.selection: Selection = select_units(model, **self.config.selection_kwargs())
        self.units = self.selection.units
        self.names = [u.name for u in self.units]
        self.scheduler = InterLayerScheduler(self.names, self.config.freeze_rate,
                                             seed=self.config.seed,
                                             max_frozen_age=self.config.max_frozen_age)
        self.history = FreezeHistory(self.names)
        self.frozen: list[int] | None = None
        self.last_stats: dict[str, float] = {}
        self._snapshot: WeightSnapshot | None = None
        self._lrs: list[float] | None = None

    @property
    def num_frozen(self) -> int:
        return self.scheduler.num_frozen

    def parameters(self) -> list[nn.Parameter]:
        """Every candidate parameter (identity-tracked)."""
        return [p for u in self.units for p in u.params]

    # -- one optimizer step ---------------------------------------------------
    def decide(self) -> list[int]:
        """The scheduler's frozen unit indices for the coming optimizer step."""
        return self.scheduler.decide()

    def apply(self, frozen: Sequence[int]) -> None:
        """Freeze ``frozen`` (unit indices) and make every other unit trainable."""
        fz = set(int(i) for i in frozen)
        if len(fz) != self.num_frozen or not all(0 <= i < len(self.units) for i in fz):
            raise SlimFitError(f"a step must freeze exactly {self.num_frozen} distinct units "
                               f"out of {len(self.units)}, got {sorted(fz)[:8]}...")
        for i, u in enumerate(self.units):
            train = i not in fz
            for p in u.params:
                p.requires_grad_(train)
                if not train:
                    p.grad = None  # a stale grad would let the optimizer move it
        self.frozen = sorted(fz)

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Snapshot the trained units (call after backward, before ``step``).

        Args:
            optimizer: needed with ``lr_normalized=True``, to read the learning
                rate each trained unit is about to be updated with.
        """
        if self.frozen is None:
            raise SlimFitError("before_optimizer_step() called before apply(): no step is open.")
        fz = set(self.frozen)
        self._lrs = None
        if self.config.lr_normalized:
            if optimizer is None:
                raise SlimFitError("lr_normalized=True needs before_optimizer_step(optimizer).")
            lr_of = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
            self._lrs = [lr_of.get(id(u.params[0]), 0.0)
                         for i, u in enumerate(self.units) if i not in fz]
        for i in self.frozen:  # guard: nothing may have re-created a frozen grad
            for p in self.units[i].params:
                p.grad = None
        self._snapshot = WeightSnapshot(
            [u.params for i, u in enumerate(self.units) if i not in fz], eps=self.config.score_eps)

    def after_optimizer_step(self, *, skipped: bool = False) -> dict[str, float]:
        """Score the trained units and record the step.

        Args:
            skipped: the optimizer step did not run (AMP found inf/NaN): the
                weights did not move, which must not be read as convergence.

        Returns:
            Statistics to log: frozen fraction, whether the step was measured,
            and min/median/max of the current scores.
        """
        if self.frozen is None or self._snapshot is None:
            raise SlimFitError("after_optimizer_step() needs before_optimizer_step() first.")
        scores = self._snapshot.scores()
        self._snapshot = None
        if self._lrs is not None:  # change per unit of learning rate
            scores = [s / lr if lr > 0 else 0.0 for s, lr in zip(scores, self._lrs)]
        # A step that moved no trained weight at all (skipped by the grad
        # scaler, or lr = 0 during warm-up) says nothing about convergence.
        measured = not skipped and any(s > 0.0 for s in scores)
        step = self.scheduler.step
        self.scheduler.update(self.frozen, scores if measured else None)
        self.history.record(step, self.frozen)
        known = [s for s in self.scheduler.scores if s is not None]
        self.last_stats = {
            "frozen_fraction": len(self.frozen) / len(self.units),
            "frozen_units": float(len(self.frozen)),
            "measured": float(measured),
            "initial_pass": float(not self.scheduler.initial_pass_done),
        }
        if known:
            self.last_stats.update(score_min=min(known), score_median=statistics.median(known),
                                   score_max=max(known))
        self.frozen = None
        return self.last_stats

    def restore(self) -> None:
        """Make every candidate trainable again (end of training)."""
        for p in self.parameters():
            p.requires_grad_(True)
        self.frozen = None
        self._snapshot = None

    # -- reporting --------------------------------------------------------------
    def summary(self, top: int | None = None) -> str:
        """Markdown table: how often each unit was frozen, most frozen first."""
        head = (f"SlimFit: {len(self.units)} units, freeze rate {self.config.freeze_rate} "
                f"({self.num_frozen} frozen per step), {len(self.history)} steps recorded\n\n")
        return head + self.history.summary_table(top)

    # -- checkpointing -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state: scheduler (names, scores, ages, step, RNG) and history."""
        return {"scheduler": self.scheduler.state_dict(), "history": self.history.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            CheckpointMismatchError: corrupt state, or a state for another model.
        """
        if not isinstance(state, dict) or "scheduler" not in state or "history" not in state:
            raise CheckpointMismatchError(
                "not a SlimFit state (expected keys 'scheduler' and 'history'); the checkpoint "
                "is corrupt or was written by another callback.")
        self.scheduler.load_state_dict(state["scheduler"])
        try:
            self.history.load_state_dict(state["history"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointMismatchError(f"corrupt SlimFit history state: {e!r}.") from e

