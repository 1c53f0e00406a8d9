"""The inter-layer scheduler (ILS, paper section 2): which units to freeze in
each optimizer step, as pure logic over names and scores.

Each step, with ``t`` candidate units and freezing rate ``r``, exactly
``k = floor(r * t)`` units are frozen and ``t - k`` trained. Units are ranked
for training by, in order: never measured (the initial pass: every unit is
trained once, in a seeded random round robin), forced by staleness (frozen for
at least ``max_frozen_age`` consecutive steps, if set; oldest first), then score (highest
relative weight change first), ties broken by a seeded random key. Only
trained units get fresh scores; a frozen unit keeps its last (stale) score.

The state is plain Python (names, floats, ints, the RNG state), so it
checkpoints through Lightning and resumes to the same decisions.
"""

from __future__ import annotations

import math
import random
from typing import Any, Sequence

from slimfit.errors import CheckpointMismatchError, SlimFitError

__all__ = ["InterLayerScheduler"]

STATE_VERSION = 1


class InterLayerScheduler:
    """Decide the frozen set each step from per-unit scores.

    Args:
        names: unit names (fixed order).
        freeze_rate: r in [0, 1).
        seed: seed of the round robin and tie-breaks.
        max_frozen_age: optional staleness bound (steps).

    Example:
        >>> s = InterLayerScheduler(["a", "b", "c", "d"], freeze_rate=0.5, seed=0)
        >>> frozen = s.decide()
        >>> len(frozen)
        2
    """

    def __init__(self, names: Sequence[str], freeze_rate: float, seed: int = 0,
                 max_frozen_age: int | None = None):
        if not names:
            raise SlimFitError("InterLayerScheduler needs at least one unit name.")
        if len(set(names)) != len(names):
            raise SlimFitError("InterLayerScheduler unit names must be unique.")
        if not 0.0 <= freeze_rate < 1.0:
            raise SlimFitError(f"freeze_rate must be in [0, 1), got {freeze_rate!r}.")
        self.names = list(names)
        self.freeze_rate = float(freeze_rate)
        self.max_frozen_age = max_frozen_age
        self.scores: list[float | None] = [None] * len(names)  # None: never measured
        self.ages = [0] * len(names)  # consecutive steps frozen
        self.step = 0
        self._rng = random.Random(seed)

    @property
    def num_frozen(self) -> int:
        """``floor(r * t)``: units frozen in every step."""
        return math.floor(self.freeze_rate * len(self.names))

    @property
    def initial_pass_done(self) -> bool:
        return all(s is not None for s in self.scores)

    def decide(self) -> list[int]:
        """Indices of the units to freeze in the coming step (sorted).

        Consumes random numbers: call once per optimizer step.
        """
        age_cap = self.max_frozen_age
        keys = []
        for i, s in enumerate(self.scores):
            tie = self._rng.random()
            if s is None:
                tier, val = 2, 0.0
            elif age_cap is not None and self.ages[i] >= age_cap:
                tier, val = 1, float(self.ages[i])  # oldest first, so every unit comes back
            else:
                tier, val = 0, s
            keys.append((tier, val, tie, i))
        keys.sort(reverse=True)  # best candidates for training first
        n_train = len(self.names) - self.num_frozen
        return sorted(i for *_, i in keys[n_train:])

    def update(self, frozen: Sequence[int], scores: Sequence[float] | None) -> None:
        """Record a finished step: ``scores`` of the trained units (in index
        order), or ``None`` when the step changed no weight (skipped by the
        grad scaler, or a zero learning rate): not a measurement."""
        fz = set(frozen)
        trained = [i for i in range(len(self.names)) if i not in fz]
        if scores is not None:
            if len(scores) != len(trained):
                raise SlimFitError(f"got {len(scores)} scores for {len(trained)} trained units.")
            for i, s in zip(trained, scores):
                self.scores[i] = float(s)
        for i in range(len(self.names)):
            self.ages[i] = self.ages[i] + 1 if i in fz else 0
        self.step += 1

    # -- checkpointing -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "names": list(self.names),
                "freeze_rate": self.freeze_rate, "max_frozen_age": self.max_frozen_age,
                "scores": list(self.scores), "ages": list(self.ages), "step": self.step,
                "rng_state": self._rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved state.

        Raises:
            CheckpointMismatchError: the state is corrupt or its units are not
                this model's.
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise CheckpointMismatchError(
                f"not a SlimFit scheduler state (version {state.get('version') if isinstance(state, dict) else None!r}, "
                f"expected {STATE_VERSION}); the checkpoint is corrupt or from another tool.")
        names = state.get("names")
        if names != self.names:
            names = list(names or [])
            missing = [n for n in self.names if n not in names][:5]
            extra = [n for n in names if n not in self.names][:5]
            raise CheckpointMismatchError(
                f"the saved SlimFit state is for another model: {len(names)} saved units vs "
                f"{len(self.names)} in this model; missing from the checkpoint: {missing}; "
                f"unknown to this model: {extra}. Resume with the same model and the same "
                "include/exclude/groups options, or start without the checkpoint's callback state.")
        n = len(self.names)
        try:
            scores = [None if s is None else float(s) for s in state["scores"]]
            ages = [int(a) for a in state["ages"]]
            step = int(state["step"])
            rng_state = state["rng_state"]
            rng_state = (rng_state[0], tuple(rng_state[1]), rng_state[2])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CheckpointMismatchError(f"corrupt SlimFit scheduler state: {e!r}.") from e
        if len(scores) != n or len(ages) != n:
            raise CheckpointMismatchError(
                f"corrupt SlimFit scheduler state: {len(scores)} scores and {len(ages)} ages "
                f"for {n} units.")
        self.scores, self.ages, self.step = scores, ages, step
        self._rng.setstate(rng_state)
