"""``LayerFreezer``: SlimFit's per-step freezing applied to a model, in plain
PyTorch (the Lightning callback and a hand-written loop both drive it).

It is the first part of a session (:mod:`slimfit.parts`), which calls it at
each moment of a step; standalone, one optimizer step is::

    frozen = freezer.decide()        # scheduler's choice (broadcast it under DDP)
    freezer.apply(frozen)            # requires_grad toggled, frozen grads dropped
    loss.backward()                  # (any number of micro-batches)
    freezer.snapshot(optimizer)      # snapshot of the trained units only
    optimizer.step()
    freezer.record(loss=loss)        # scores of trained units, history

Freezing is ``requires_grad=False`` plus ``grad=None``: the parameter stays in
its optimizer param group (no group is ever added or removed), and optimizers
skip a parameter whose gradient is ``None``, so a frozen tensor is
bit-identical after the step (weight decay and momentum included). Autograd
then neither computes its weight gradient nor saves the input kept only for it.

New heads (:mod:`slimfit.freezing.heads`) train every step unless
``train_new_heads=False``. A step whose loss or scores are
NaN/inf is recorded like a skipped step (its scores never reach the
scheduler), with one warning per freezer or a :class:`NonFiniteError`.
"""

from __future__ import annotations

import math
import pathlib
import statistics
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from slimfit.freezing.config import SlimFitConfig
from slimfit.distributed import is_rank_zero
from slimfit.errors import CheckpointMismatchError, NonFiniteError, SlimFitError
from slimfit.freezing.heads import HeadReport, without_new_heads
from slimfit.freezing.history import FreezeHistory
from slimfit.freezing.policies import make_policy
from slimfit.freezing.scores import WeightSnapshot
from slimfit.memory.report import format_bytes
from slimfit.parts import Context, Part, Step
from slimfit.evidence import short_budget_note
from slimfit.selection import Selection, iter_parameters, select_units

__all__ = ["LayerFreezer", "preview"]


class LayerFreezer(Part):
    """Per-iteration freezing of a model's candidate units.

    Args:
        model: the module to fine-tune (its trainable parameters at this
            point define the candidates).
        config: a :class:`SlimFitConfig`; or pass its fields as keywords.

    Attributes:
        selection: what is frozen and what is always trained (new heads
            included); ``describe()`` prints it.
        heads: the new-head parameters taken out of the candidates and how
            they were found (:class:`slimfit.freezing.heads.HeadReport`).
        nonfinite_steps: the steps whose loss or scores were NaN/inf.

    Raises:
        SlimFitError: bad options; SelectionError when a pattern matches
            nothing, the model has no candidate, or every candidate is a new
            head.
    """

    name = "freezing"

    def __init__(self, model: nn.Module, config: SlimFitConfig | None = None, **kwargs: Any):
        if config is not None and kwargs:
            raise SlimFitError(f"pass either config=SlimFitConfig(...) or keyword options, not "
                               f"both; got a config and keywords {sorted(kwargs)}.")
        if config is not None and not isinstance(config, SlimFitConfig):
            raise SlimFitError(f"config must be a SlimFitConfig, got {config!r}; write "
                               "LayerFreezer(model, SlimFitConfig(...)) or pass keyword options.")
        self.config = config if config is not None else SlimFitConfig(**kwargs)
        c = self.config
        self.selection: Selection = select_units(model, **c.selection_kwargs())
        self.heads = HeadReport([], "off")
        if c.train_new_heads:
            self.selection, self.heads = without_new_heads(model, self.selection, c.include)
        self.units = self.selection.units
        self.names = [u.name for u in self.units]
        #: the policy that decides each step's frozen set (slimfit.freezing.policies)
        self.scheduler = make_policy(self.names, c, [u.nbytes for u in self.units])
        t = len(self.units)
        trained = 1.0 - c.freeze_rate if c.trained_units is None else (t - self.num_frozen) / t
        self.lr_scale = c.lr_scale(trained)  # the step factor of trained units
        # embedding tables: scored over the rows the step used (slimfit.freezing.scores)
        self._tables = _embedding_tables(model)
        self.nonfinite_steps: list[int] = []  # steps whose loss or scores were NaN/inf
        self._warned_nonfinite = False
        self.history = FreezeHistory(self.names)
        self.frozen: list[int] | None = None
        self.last_stats: dict[str, float] = {}
        self._snapshot: WeightSnapshot | None = None
        self._lrs: list[float] | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def from_config(cls, model: nn.Module, config: Any) -> "LayerFreezer | None":
        return cls(model, config.freezing) if config.freezing is not None else None

    @property
    def num_frozen(self) -> int:
        return self.scheduler.num_frozen

    # -- the step protocol (slimfit.parts) -------------------------------------------
    def attach(self, ctx: Context) -> None:
        self._optimizer = ctx.optimizer

    def on_step_start(self, step: Step) -> None:
        self.apply(step.frozen)

    def before_optimizer_step(self, step: Step) -> None:
        self.snapshot(self._optimizer)

    def after_optimizer_step(self, step: Step) -> dict[str, float]:
        return dict(self.record(skipped=step.skipped, loss=step.loss_finite))

    def detach(self) -> None:
        self.restore()

    def run_notes(self, total_steps: float) -> list[str]:
        notes = (short_budget_note(total_steps, self.scheduler.num_trained, len(self.units)),
                 self.scheduler.run_note(total_steps))
        return [n for n in notes if n is not None]

    def write_files(self, out: pathlib.Path) -> dict[str, pathlib.Path]:
        """The freezing heatmap (unit x step) and the summary table (nothing before
        the first step)."""
        if not len(self.history):
            return {}
        out = pathlib.Path(out)
        files = {"heatmap": self.history.plot_heatmap(out / "freeze_heatmap.png"),
                 "summary": out / "freeze_summary.md"}
        files["summary"].write_text(self.summary() + "\n")
        return files

    def resolve(self, model: nn.Module) -> None:
        """Find each unit's tensors again by name in ``model`` (the session calls
        this at ``start``: FSDP2 replaced them since): :meth:`Selection.resolved`."""
        self.selection = self.selection.resolved(model)
        self.units = self.selection.units
        self._tables = _embedding_tables(model)

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
        problem = self.scheduler.check_frozen(sorted(fz))
        if problem is not None:
            raise SlimFitError(f"{problem}, got {sorted(fz)[:8]}...")
        for i, u in enumerate(self.units):
            train = i not in fz
            for p in u.params:
                p.requires_grad_(train)
                if not train:
                    p.grad = None  # a stale grad would let the optimizer move it
        self.frozen = sorted(fz)

    def frozen_names(self) -> list[str]:
        """The units frozen in the model now (no tensor requiring grad), by name."""
        return [u.name for u in self.units if not any(p.requires_grad for p in u.params)]

    def snapshot(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Snapshot the trained units (call after backward, before ``step``).

        Args:
            optimizer: needed with ``lr_normalized=True``, to read the learning
                rate each trained unit is about to be updated with.
        """
        if self.frozen is None:
            raise SlimFitError("snapshot() called before apply(): no step is open.")
        fz = set(self.frozen)
        self._lrs = None
        if self.config.lr_normalized:
            if optimizer is None:
                raise SlimFitError("lr_normalized=True needs snapshot(optimizer).")
            lr_of = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
            self._lrs = [lr_of.get(id(u.params[0]), 0.0)
                         for i, u in enumerate(self.units) if i not in fz]
        for i in self.frozen:  # guard: nothing may have re-created a frozen grad
            for p in self.units[i].params:
                p.grad = None
        trained = [u.params for i, u in enumerate(self.units) if i not in fz]
        if not self.scheduler.needs_scores and self.lr_scale == 1.0:
            trained = []  # LISA, BAdam: no score read, no weight copied (the loss is still checked)
        self._snapshot = WeightSnapshot(
            trained, eps=self.config.score_eps, score=self.config.score,
            row_sparse=[p for ps in trained for p in ps if id(p) in self._tables],
            keep_weights=self.lr_scale != 1.0)

    def record(self, *, skipped: bool = False,
               loss: torch.Tensor | float | None = None) -> dict[str, float]:
        """Score the trained units and record the step.

        Args:
            skipped: the optimizer step did not run (AMP found inf/NaN): the
                weights did not move, which must not be read as convergence.
            loss: optional, the step's loss (a tensor or a float), or a bool
                tensor "every micro-batch loss was finite". Checked in the same
                device-to-host transfer as the scores (no extra sync).

        Returns:
            Statistics to log: frozen fraction, whether the step was measured,
            whether it was non-finite, and min/median/max of the current scores.

        Raises:
            NonFiniteError: ``on_nonfinite="raise"`` and the loss or a score of
                a trained unit is NaN/inf (the step is recorded as unmeasured
                first, so the freezer's state stays consistent).
        """
        if self.frozen is None or self._snapshot is None:
            raise SlimFitError("record() needs snapshot() first: no step was snapshotted.")
        snap, self._snapshot = self._snapshot, None
        step, frozen = self.scheduler.step, self.frozen
        scores, bad = None, None
        if not skipped:  # a skipped step is not read at all (no sync)
            if self.lr_scale != 1.0:  # W <- W_old + s * dW, in place, before scoring
                snap.scale_update(self.lr_scale)
            m = snap.measure(_loss_flag(loss))
            if m.finite:
                scores = m.scores
                if self._lrs is not None:  # change per unit of learning rate
                    scores = [s / lr if lr > 0 else 0.0 for s, lr in zip(scores, self._lrs)]
            else:
                fz = set(frozen)
                trained = [n for i, n in enumerate(self.names) if i not in fz]
                bad = (m.loss_finite,
                       [n for n, v in zip(trained, m.scores) if not math.isfinite(v)])
        # A step that moved no trained weight at all (skipped by the grad scaler,
        # lr = 0 during warm-up) says nothing about convergence; nor does a
        # non-finite one: the scheduler gets no scores (ages and history advance).
        measured = scores is not None and any(s > 0.0 for s in scores)
        self.scheduler.update(frozen, scores if measured else None)
        self.history.record(step, frozen)
        known = [s for s in self.scheduler.scores if s is not None]
        self.last_stats = {
            "frozen_fraction": len(frozen) / len(self.units),
            "frozen_units": float(len(frozen)),
            "measured": float(measured),
            "nonfinite": float(bad is not None),
            "initial_pass": float(not self.scheduler.initial_pass_done),
        }
        if known:
            self.last_stats.update(score_min=min(known), score_median=statistics.median(known),
                                   score_max=max(known))
        self.frozen = None
        if bad is not None:
            self._report_nonfinite(step, *bad)
        return self.last_stats

    def _report_nonfinite(self, step: int, loss_finite: bool, units: list[str]) -> None:
        self.nonfinite_steps.append(step)
        what = ", ".join((["the loss"] if not loss_finite else []) +
                         ([f"scores of {len(units)} unit(s) {units[:4]}"] if units else []))
        msg = (f"SlimFit: non-finite loss/scores at step {step} ({what}); scores of this step "
               "are not recorded (the step counts as skipped: ages and history advance). Lower "
               "the learning rate, clip gradients or check the precision")
        if self.config.on_nonfinite == "raise":
            raise NonFiniteError(msg + "; on_nonfinite='warn' trains on instead.")
        if not self._warned_nonfinite and is_rank_zero():
            warnings.warn(msg + "; on_nonfinite='raise' stops at the first such step. Warned "
                          "once: later steps are listed in LayerFreezer.nonfinite_steps.",
                          UserWarning, stacklevel=3)
        self._warned_nonfinite = True

    def restore(self) -> None:
        """Make every candidate trainable again (end of training)."""
        for p in self.parameters():
            p.requires_grad_(True)
        self.frozen = None
        self._snapshot = None

    # -- reporting --------------------------------------------------------------
    def describe(self) -> str:
        """What this freezer does, for a user to check before training: units,
        rate, score and selection policy, and the new heads always trained."""
        c = self.config
        policy = f"score {c.score!r}, selection {c.selection!r}"
        if c.policy != "slimfit":
            policy = self.scheduler.describe()
        elif c.reserve_fraction and c.rate_of == "bytes":
            policy += f", {c.reserve_fraction:g} of the trained bytes for the longest-frozen units"
        elif c.reserve_fraction:
            n_train = self.scheduler.num_trained
            policy += (f", {self.scheduler.reserved_slots(n_train)} of the {n_train} trained slots "
                       f"reserved for the longest-frozen units (reserve_fraction={c.reserve_fraction:g})")
        if c.frozen_score_decay is not None:
            policy += f", stale scores x{c.frozen_score_decay:g} per frozen step"
        if c.max_frozen_age is not None:
            policy += f", trained again after {c.max_frozen_age} frozen steps"
        heads = (f"new heads always trained: {self.heads.describe()}" if c.train_new_heads
                 else "new heads: candidates like any layer (train_new_heads=False)")
        return (f"SlimFit: {len(self.units)} units, {self._rate()}; {policy}"
                + (f"; trained step x{self.lr_scale:.3g}" if self.lr_scale != 1.0 else "") + "\n"
                f"  {self.selection}\n  {heads}")

    def _rate(self) -> str:
        r, budget = self.config.freeze_rate, self.scheduler.trained_bytes_budget
        return (f"freeze rate {r} ({self.num_frozen} frozen per step)" if budget is None else
                f"freeze rate {r} of the bytes (at most {format_bytes(budget)} trained per step)")

    def summary(self, top: int | None = None) -> str:
        """Markdown table: how often each unit was frozen, most frozen first."""
        head = f"SlimFit: {len(self.units)} units, {self._rate()}, {len(self.history)} steps recorded\n"
        if self.heads.names:
            head += f"New heads always trained: {self.heads.describe()}\n"
        if self.nonfinite_steps:
            head += (f"Non-finite loss/scores (not recorded) at {len(self.nonfinite_steps)} "
                     f"step(s): {self.nonfinite_steps[:10]}\n")
        return head + "\n" + self.history.summary_table(top)

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
                "not a SlimFit state (expected a dict with keys 'scheduler' and 'history', got "
                f"{list(state)[:6] if isinstance(state, dict) else type(state).__name__}); the "
                "checkpoint is corrupt or was written by another callback.")
        self.scheduler.load_state_dict(state["scheduler"])
        try:
            self.history.load_state_dict(state["history"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointMismatchError(
                f"corrupt SlimFit history state {str(state['history'])[:80]!r}: {e!r}.") from e


def preview(model: nn.Module, config: SlimFitConfig | None = None,
            **options: Any) -> dict[str, list[str]]:
    """What freezing will touch, before any training: the units the freezer
    rotates, and the new heads it trains every step, listed apart.

    Args:
        model: the model to fine-tune.
        config / **options: a :class:`SlimFitConfig` or its fields, as for
            :class:`LayerFreezer` (``include``, ``exclude``, ``groups`` ...).

    Returns:
        ``{"units": [rotating unit names], "matched": [their parameter names],
        "heads": [new-head weights taken out of the rotation: always trained],
        "unmatched": [every other parameter: biases (the head's too, always
        trained), excluded, frozen by the user]}``.

    Raises:
        SlimFitError: as :class:`LayerFreezer` (a pattern matching nothing, no
            candidate, bad options).

    Example:
        >>> m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> p = preview(m)
        >>> p["units"], p["heads"]
        (['0.weight', '1.weight'], ['2.weight'])
    """
    freezer = LayerFreezer(model, config, **options)
    matched = [n for u in freezer.units for n in u.param_names]
    heads = list(freezer.heads.names)
    taken = set(matched) | set(heads)
    return {"units": list(freezer.names), "matched": matched, "heads": heads,
            "unmatched": [n for n, _, _ in iter_parameters(model) if n not in taken]}


def _embedding_tables(model: nn.Module) -> set[int]:
    """ids of the embedding tables' weights (scored over the rows a step used)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}


def _loss_flag(loss: torch.Tensor | float | None) -> torch.Tensor | bool | None:
    """"The loss was finite", left on the device for a tensor (no sync here)."""
    if loss is None:
        return None
    if torch.is_tensor(loss):
        loss = loss.detach()
        return loss.all() if loss.dtype == torch.bool else torch.isfinite(loss).all()
    return math.isfinite(float(loss))

