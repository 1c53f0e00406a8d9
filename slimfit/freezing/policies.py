"""Which units train in a step: the freezer's policies, as pure logic over
unit names (no tensors), so every policy has the same guarantees: exactly
``t - n`` units frozen each step, the same decision on every rank (rank 0's is
broadcast), and a plain-Python state that checkpoints and resumes to the same
decisions.

* ``"slimfit"``: :class:`slimfit.freezing.scheduler.InterLayerScheduler`, the
  paper's inter-layer scheduler over training-dynamics scores.
* ``"lisa"`` (Layerwise Importance Sampled AdamW, arXiv 2403.17919): every K
  steps, ``n`` units sampled uniformly at random without replacement train
  until the next sample. LISA samples middle layers and always trains the
  embeddings and the head; here the units are the freezer's (new heads are
  out of the rotation already, ``train_new_heads``) and ``n`` follows from
  ``freeze_rate`` so that arms compare at equal trainable fractions.
* ``"badam"`` (block coordinate descent, arXiv 2404.02827): the units, in
  model order, are cut into blocks of ``n`` consecutive units (the last
  block wraps around to the first units, so every step trains exactly
  ``n``); one block trains for K steps, then the next, in ascending,
  descending or random order (a new permutation each round). BAdam keeps Adam
  state only for the active block; with SlimFit that is
  ``SessionConfig(optimizer_state="release")``.

Neither LISA nor BAdam reads scores, so the freezer takes no weight snapshot
under them (no extra memory, no sync) unless a step scale asks for one.
"""

from __future__ import annotations

import math
import random
from typing import Any, Sequence

from slimfit.errors import CheckpointMismatchError, SlimFitError
from slimfit.freezing.scheduler import InterLayerScheduler, count_problem

__all__ = ["BADAM_ORDERS", "BAdamPolicy", "DEFAULT_INTERVAL", "LisaPolicy", "POLICIES",
           "RotationPolicy", "make_policy"]

#: the values of ``SlimFitConfig.policy``
POLICIES = ("slimfit", "lisa", "badam")
#: BAdam's block orders
BADAM_ORDERS = ("ascending", "descending", "random")
#: K when ``interval`` is None: LMFlow's ``lisa_interval_steps`` default, BAdam's
#: ``switch_block_every`` default
DEFAULT_INTERVAL = {"lisa": 20, "badam": 50}

STATE_VERSION = 1


class RotationPolicy:
    """A policy that keeps one trained set for ``interval`` steps, then picks
    the next (:meth:`_next`); scores are not read.

    Args:
        names: unit names (fixed order: model order).
        num_frozen: units frozen per step.
        interval: K, the steps a trained set is kept.
        seed: seed of the random choices.

    Attributes (the scheduler's, so the freezer and its reports use either):
        step: steps recorded so far; ``scores``: always None (not read);
        ``ages``: consecutive steps each unit has been frozen.
    """

    name = "rotation"
    needs_scores = False

    def __init__(self, names: Sequence[str], num_frozen: int, interval: int, seed: int = 0):
        if not names:
            raise SlimFitError(f"{type(self).__name__} needs at least one unit name.")
        if not 0 <= num_frozen < len(names):
            raise SlimFitError(f"{type(self).__name__}: {num_frozen} frozen of {len(names)} units; "
                               "at least one unit must train.")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise SlimFitError(f"interval must be an int >= 1, got {interval!r}.")
        self.names = list(names)
        self.num_frozen = num_frozen
        self.interval = interval
        self.scores: list[float | None] = [None] * len(names)
        self.ages = [0] * len(names)
        self.step = 0
        self._trained: list[int] = []  # the set in use
        self._kept = 0  # steps it has been used
        self._ever = [False] * len(names)  # trained at least once
        self._rng = random.Random(seed)

    @property
    def num_trained(self) -> int:
        return len(self.names) - self.num_frozen

    @property
    def initial_pass_done(self) -> bool:
        """Every unit has trained at least once (every tensor has optimizer state)."""
        return all(self._ever)

    #: the rate counts units (the scheduler's byte budget under rate_of="bytes")
    trained_bytes_budget = None

    def reserved_slots(self, n_train: int) -> int:
        return 0

    def check_frozen(self, frozen: Sequence[int]) -> str | None:
        """Why ``frozen`` is not a set of exactly :attr:`num_frozen` units (``None``: it is)."""
        return count_problem(frozen, self.num_frozen, len(self.names))

    def _next(self) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decide(self) -> list[int]:
        """Indices of the units to freeze in the coming step (sorted)."""
        if not self._trained or self._kept >= self.interval:
            self._trained = sorted(self._next())
            self._kept = 0
        keep = set(self._trained)
        return [i for i in range(len(self.names)) if i not in keep]

    def update(self, frozen: Sequence[int], scores: Sequence[float] | None) -> None:
        """Record a finished step (``scores`` are ignored: not read by this policy)."""
        fz = set(frozen)
        for i in range(len(self.names)):
            self.ages[i] = self.ages[i] + 1 if i in fz else 0
            self._ever[i] = self._ever[i] or i not in fz
        self._kept += 1
        self.step += 1

    def describe(self) -> str:
        return f"policy {self.name!r}: {self.num_trained} units kept for {self.interval} steps"

    def run_note(self, total_steps: float) -> str | None:
        """A warning about a run of ``total_steps`` optimizer steps under this
        policy (``None``: nothing to say; an open-ended run has no length)."""
        return None

    # -- checkpointing -------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "policy": self.name, "names": list(self.names),
                "num_frozen": self.num_frozen, "interval": self.interval, "step": self.step,
                "ages": list(self.ages), "trained": list(self._trained), "kept": self._kept,
                "ever": list(self._ever), "rng_state": self._rng.getstate(),
                **self._extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved state.

        Raises:
            CheckpointMismatchError: corrupt state, another policy's, or another
                model's units.
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION \
                or state.get("policy") != self.name:
            got = state.get("policy", "the 'slimfit' scheduler") if isinstance(state, dict) else \
                type(state).__name__
            raise CheckpointMismatchError(
                f"the checkpoint's freezing state is for policy {got!r}, not {self.name!r} (or is "
                "corrupt); resume with the policy the run was saved with.")
        if state.get("names") != self.names:
            raise CheckpointMismatchError(
                f"the saved SlimFit state is for another model: {len(state.get('names') or [])} "
                f"saved units vs {len(self.names)} in this model. Resume with the same model and "
                "the same include/exclude/groups options.")
        try:
            n = len(self.names)
            ages, ever = [int(a) for a in state["ages"]], [bool(e) for e in state["ever"]]
            trained = [int(i) for i in state["trained"]]
            rng = state["rng_state"]
            rng = (rng[0], tuple(rng[1]), rng[2])
            random.Random().setstate(rng)
            if len(ages) != n or len(ever) != n or any(not 0 <= i < n for i in trained):
                raise ValueError("lengths or indices do not match the units")
            if (state["num_frozen"], state["interval"]) != (self.num_frozen, self.interval):
                raise ValueError(f"saved {state['num_frozen']} frozen every {state['interval']} "
                                 f"steps, now {self.num_frozen} every {self.interval}")
            step, kept = int(state["step"]), int(state["kept"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CheckpointMismatchError(f"corrupt or mismatched {self.name} state: {e}.") from e
        self._load_extra(state)
        self.ages, self._ever, self._trained = ages, ever, trained
        self.step, self._kept = step, kept
        self._rng.setstate(rng)


class LisaPolicy(RotationPolicy):
    """LISA: ``n`` units sampled uniformly every K steps.

    Example:
        >>> p = LisaPolicy([f"u{i}" for i in range(10)], num_frozen=8, interval=3, seed=0)
        >>> sets = []
        >>> for _ in range(6):
        ...     frozen = p.decide(); p.update(frozen, None); sets.append(tuple(frozen))
        >>> sets[0] == sets[1] == sets[2] != sets[3], len(sets[0])
        (True, 8)
    """

    name = "lisa"

    def _next(self) -> list[int]:
        return self._rng.sample(range(len(self.names)), self.num_trained)

    def describe(self) -> str:
        return (f"policy 'lisa': {self.num_trained} of {len(self.names)} units sampled uniformly "
                f"every {self.interval} steps")


class BAdamPolicy(RotationPolicy):
    """BAdam: blocks of ``n`` consecutive units, each trained for K steps in turn.

    Args:
        order: ``"ascending"``, ``"descending"`` or ``"random"``.

    Example:
        >>> p = BAdamPolicy([f"u{i}" for i in range(5)], num_frozen=3, interval=1)
        >>> p.blocks
        [[0, 1], [2, 3], [4, 0]]
        >>> trained = []
        >>> for _ in range(4):
        ...     frozen = p.decide(); p.update(frozen, None)
        ...     trained.append(sorted(set(range(5)) - set(frozen)))
        >>> trained
        [[0, 1], [2, 3], [0, 4], [0, 1]]
    """

    name = "badam"

    def __init__(self, names: Sequence[str], num_frozen: int, interval: int, seed: int = 0,
                 order: str = "ascending"):
        super().__init__(names, num_frozen, interval, seed)
        if order not in BADAM_ORDERS:
            raise SlimFitError(f"order must be one of {BADAM_ORDERS}, got {order!r}.")
        self.order = order
        t, n = len(self.names), self.num_trained
        # blocks of n consecutive units; the last wraps to the first units: exactly n each
        self.blocks = [[(j * n + k) % t for k in range(n)] for j in range(-(-t // n))]
        self._queue: list[int] = []  # blocks still to train this round

    def _next(self) -> list[int]:
        if not self._queue:
            idx = list(range(len(self.blocks)))
            if self.order == "descending":
                idx.reverse()
            elif self.order == "random":
                self._rng.shuffle(idx)
            self._queue = idx
        return list(self.blocks[self._queue.pop(0)])

    def describe(self) -> str:
        return (f"policy 'badam': {len(self.blocks)} blocks of {self.num_trained} consecutive "
                f"units, {self.order}, each for {self.interval} steps")

    def run_note(self, total_steps: float) -> str | None:
        """Warns when the run ends before the last block of the first round
        starts (every block trains K steps in turn): those blocks never train
        (under ``"ascending"`` the ones nearest the output, under
        ``"descending"`` the embeddings). The policy study's 375-step runs on
        MiniLM (9 blocks) are such runs at BAdam's K = 50."""
        n_blocks, k = len(self.blocks), self.interval
        if not math.isfinite(total_steps) or total_steps <= 0:
            return None
        trained = min(n_blocks, math.ceil(total_steps / k))  # blocks reached in this run
        if trained == n_blocks:
            return None
        never = {"ascending": range(trained, n_blocks),
                 "descending": range(n_blocks - trained)}.get(self.order, ())  # random: unknown
        starts = [repr(self.names[self.blocks[b][0]]) for b in never]
        which = ""
        if len(starts) == 1:
            which = f" (the block starting at unit {starts[0]})"
        elif starts:
            more = ", ..." if len(starts) > 4 else ""
            which = f" (the blocks starting at units {', '.join(starts[:4])}{more})"
        if total_steps >= n_blocks:
            fix = (f"Set interval <= {int(total_steps // n_blocks)} (SlimFitConfig(interval=...), "
                   "Hydra +slimfit.interval=...) for every block to train at least once.")
        else:  # even one step per block does not reach them all
            fix = (f"Even interval 1 reaches only {total_steps:.0f} blocks: train at least "
                   f"{n_blocks} steps, or lower freeze_rate (larger, fewer blocks).")
        return (f"policy 'badam': {n_blocks} blocks x interval {k} = {n_blocks * k} steps per "
                f"round, more than this run's {total_steps:.0f}: {n_blocks - trained} of the "
                f"{n_blocks} blocks would never train{which}. {fix}")

    def _extra_state(self) -> dict[str, Any]:
        return {"order": self.order, "queue": list(self._queue)}

    def _load_extra(self, state: dict[str, Any]) -> None:
        if state.get("order") != self.order:
            raise CheckpointMismatchError(f"the checkpoint's BAdam order is {state.get('order')!r}, "
                                          f"not {self.order!r}; resume with the saved order.")
        queue = [int(b) for b in state.get("queue", [])]
        if any(not 0 <= b < len(self.blocks) for b in queue):
            raise CheckpointMismatchError("corrupt BAdam state: a queued block out of range.")
        self._queue = queue


def make_policy(names: Sequence[str], config: Any, unit_bytes: Sequence[int] | None = None
                ) -> "InterLayerScheduler | RotationPolicy":
    """The policy a ``SlimFitConfig`` names, over the units ``names`` (model order);
    ``unit_bytes``, each unit's bytes, is read under ``rate_of="bytes"``.

    Raises:
        SlimFitError: ``trained_units`` above the number of units; under
            ``rate_of="bytes"``, no sizes or a unit too large to ever train.
    """
    frozen = config.frozen_count(len(names))
    if config.policy == "slimfit":
        if config.rate_of == "bytes" and unit_bytes is None:
            raise SlimFitError("rate_of='bytes' needs each unit's bytes (make_policy's "
                               "unit_bytes); the LayerFreezer passes them.")
        return InterLayerScheduler(
            names, config.freeze_rate, seed=config.seed, max_frozen_age=config.max_frozen_age,
            frozen_score_decay=config.frozen_score_decay, selection=config.selection,
            reserve_fraction=config.reserve_fraction,
            num_frozen=None if config.trained_units is None else frozen,
            unit_bytes=unit_bytes if config.rate_of == "bytes" else None)
    interval = config.interval or DEFAULT_INTERVAL[config.policy]
    if config.policy == "lisa":
        return LisaPolicy(names, frozen, interval, seed=config.seed)
    return BAdamPolicy(names, frozen, interval, seed=config.seed, order=config.order)
