"""The inter-layer scheduler (ILS, paper section 2): which units to freeze in
each optimizer step, as pure logic over names and scores.

Each step, with ``t`` candidate units and freezing rate ``r``, exactly
``k = floor(r * t)`` units are frozen and ``n = t - k`` trained. The trained
slots are filled in this order:

1. never measured units (the initial pass: every unit is trained once, in a
   seeded random round robin);
2. units forced by staleness (frozen for at least ``max_frozen_age``
   consecutive steps, if set; oldest first);
3. ``floor(reserve_fraction * n)`` reserved slots, at least one when the
   fraction is above 0 and at least two units train (so a high rate does not
   silently round the reservation away), for the least recently trained of
   the rest (oldest frozen first), so that a few units with high stale scores
   cannot hog every update;
4. the rest by score: ``"topk"`` takes the highest, ``"sample"`` draws without
   replacement with probability proportional to the scores (Efraimidis and
   Spirakis' keys ``u ** (1 / s)``, equivalent to successive proportional
   draws), so that lower-scored units still get trained now and then.

With ``unit_bytes`` (``SlimFitConfig.rate_of="bytes"``) ``r`` is a fraction of
the rotating *bytes*: each step trains units of at most ``(1 - r)`` of their
total bytes, filled in the same order, a unit that does not fit in what is
left being passed over for the next that does (the number trained varies
from step to step). Units differ in size (at Llama-3-8B width a 1 GiB
embedding beside 8 MiB key projections), so a count bounds nothing that a
memory budget can use; this bounds the trained set's gradients and
optimizer state by the rate.

Ties are broken by a seeded random key. Only trained units get fresh scores; a
frozen unit keeps its last (stale) score. With ``frozen_score_decay = d`` the
authority of that old measurement decays: a unit frozen for ``age`` steps
competes with ``s / d ** age`` (computed when deciding; the stored score stays
the measured one), so a unit frozen for its low score rises step by step and
comes back on its own (d = 0.99: x2 after ~70 frozen steps, x10 after ~230).
Without it (the paper) stale scores age only implicitly, as the learning rate
decays and fresh scores shrink.

The state is plain Python (names, floats, ints, the RNG state), so it
checkpoints through Lightning and resumes to the same decisions.
"""

from __future__ import annotations

import math
import random
import warnings
from typing import Any, Sequence

from slimfit.errors import CheckpointMismatchError, SlimFitError

__all__ = ["InterLayerScheduler", "RATE_OF", "SELECTIONS", "count_problem"]

#: How the score-ranked trained slots are filled (``SlimFitConfig.selection``).
SELECTIONS = ("topk", "sample")
#: What ``freeze_rate`` is a fraction of (``SlimFitConfig.rate_of``).
RATE_OF = ("units", "bytes")

STATE_VERSION = 1


def count_problem(frozen: Sequence[int], num_frozen: int, t: int) -> str | None:
    """Why ``frozen`` is not ``num_frozen`` distinct unit indices of ``t``
    (``None``: it is)."""
    if not all(0 <= i < t for i in frozen):
        return f"unit indices must be in [0, {t})"
    if len(set(frozen)) != num_frozen:
        return f"a step must freeze exactly {num_frozen} distinct units of {t}"
    return None


class InterLayerScheduler:
    """Decide the frozen set each step from per-unit scores.

    Args:
        names: unit names (fixed order).
        freeze_rate: r in [0, 1).
        seed: seed of the round robin and tie-breaks.
        max_frozen_age: optional staleness bound (steps).
        frozen_score_decay: optional d in (0, 1]: a stale score counts as
            ``s / d ** age``.
        selection: ``"topk"`` or ``"sample"``.
        reserve_fraction: fraction in [0, 1) of the trained slots reserved for
            the least recently trained units (rounded down, but at least one
            slot when above 0 and at least two units train); with
            ``unit_bytes``, that fraction of the trained bytes (at least one
            unit).
        unit_bytes: each unit's bytes: ``freeze_rate`` is then a fraction of
            the bytes, not of the units (``None``: of the units).

    Example:
        >>> s = InterLayerScheduler(["a", "b", "c", "d"], freeze_rate=0.5, seed=0)
        >>> frozen = s.decide()
        >>> len(frozen)
        2
    """

    #: the ``SlimFitConfig.policy`` this is; it reads the scores of trained units
    name = "slimfit"
    needs_scores = True

    def __init__(self, names: Sequence[str], freeze_rate: float, seed: int = 0,
                 max_frozen_age: int | None = None, frozen_score_decay: float | None = None,
                 selection: str = "topk", reserve_fraction: float = 0.0,
                 num_frozen: int | None = None, unit_bytes: Sequence[int] | None = None):
        if not names:
            raise SlimFitError("InterLayerScheduler needs at least one unit name.")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if list(names).count(n) > 1})[:5]
            raise SlimFitError(f"InterLayerScheduler unit names must be unique; repeated: {dup}.")
        if not 0.0 <= freeze_rate < 1.0:
            raise SlimFitError(f"freeze_rate must be in [0, 1), got {freeze_rate!r}.")
        if frozen_score_decay is not None and not 0.0 < frozen_score_decay <= 1.0:
            raise SlimFitError(f"frozen_score_decay must be None or in (0, 1], got "
                               f"{frozen_score_decay!r}.")
        if selection not in SELECTIONS:
            raise SlimFitError(f"selection must be one of {SELECTIONS}, got {selection!r}.")
        if not 0.0 <= reserve_fraction < 1.0:
            raise SlimFitError(f"reserve_fraction must be in [0, 1), got {reserve_fraction!r}.")
        self.names = list(names)
        self.frozen_score_decay = frozen_score_decay
        self.selection = selection
        self.reserve_fraction = float(reserve_fraction)
        self.freeze_rate = float(freeze_rate)
        if num_frozen is not None and not 0 <= num_frozen < len(names):
            raise SlimFitError(f"num_frozen must be in [0, {len(names)}), got {num_frozen!r}.")
        self._num_frozen = num_frozen  # None: floor(freeze_rate * t)
        self.unit_bytes = None if unit_bytes is None else [int(b) for b in unit_bytes]
        self._budget = None  # the byte budget, fixed by the sizes and the rate
        if self.unit_bytes is not None:
            # + 1e-6: (1 - 0.8) * 5000 is 999.99999... in floats
            self._budget = math.floor((1.0 - self.freeze_rate) * sum(self.unit_bytes) + 1e-6)
            self._check_bytes(num_frozen)
        self.max_frozen_age = max_frozen_age
        self.scores: list[float | None] = [None] * len(names)  # None: never measured
        self.ages = [0] * len(names)  # consecutive steps frozen
        self.step = 0
        self._rng = random.Random(seed)

    def _check_bytes(self, num_frozen: int | None) -> None:
        b = self.unit_bytes
        if num_frozen is not None:
            raise SlimFitError("trained_units counts units; rate_of='bytes' makes freeze_rate a "
                               "fraction of the bytes. Use one of them.")
        if len(b) != len(self.names) or any(x < 0 for x in b):
            raise SlimFitError(f"unit_bytes must give one size >= 0 per unit ({len(self.names)}), "
                               f"got {len(b)} values.")
        big = max(range(len(b)), key=b.__getitem__)
        if b[big] > self.trained_bytes_budget:
            total = sum(b)
            raise SlimFitError(
                f"with rate_of='bytes' and freeze_rate={self.freeze_rate}, a step trains at most "
                f"{self.trained_bytes_budget} of {total} bytes, but unit {self.names[big]!r} alone "
                f"has {b[big]}: it could never train. Use freeze_rate <= "
                f"{math.floor(1000 * (1 - b[big] / total)) / 1000}, freeze the unit yourself "
                "(requires_grad_(False) before SlimFit sees the model), train it every step "
                "(exclude=...), or use rate_of='units'.")

    @property
    def rate_of(self) -> str:
        """What ``freeze_rate`` is a fraction of: ``"units"`` or ``"bytes"``."""
        return "units" if self.unit_bytes is None else "bytes"

    @property
    def trained_bytes_budget(self) -> int | None:
        """With ``unit_bytes``: ``floor((1 - r) * total bytes)``, the most a step
        trains (``None``: the rate counts units)."""
        return self._budget

    @property
    def num_frozen(self) -> int:
        """``floor(r * t)`` (or the count given): units frozen in every step.
        With ``unit_bytes``, the fewest a step can freeze (the most units that
        fit in the budget, smallest first)."""
        if self._num_frozen is not None:
            return self._num_frozen
        if self.unit_bytes is not None:
            left, fit = self.trained_bytes_budget, 0
            for b in sorted(self.unit_bytes):
                if b > left:
                    break
                left, fit = left - b, fit + 1
            return len(self.names) - fit
        return math.floor(self.freeze_rate * len(self.names))

    @property
    def num_trained(self) -> int:
        """``t - floor(r * t)``: units trained in every step (with ``unit_bytes``,
        the most a step can train)."""
        return len(self.names) - self.num_frozen

    def check_frozen(self, frozen: Sequence[int]) -> str | None:
        """Why ``frozen`` is not a set this scheduler could decide (``None``: it
        is): exactly :attr:`num_frozen` units, or with ``unit_bytes`` trained
        bytes within :attr:`trained_bytes_budget`."""
        if self.unit_bytes is None:
            return count_problem(frozen, self.num_frozen, len(self.names))
        if not all(0 <= i < len(self.names) for i in frozen):
            return f"unit indices must be in [0, {len(self.names)})"
        fz = set(frozen)
        trained = sum(b for i, b in enumerate(self.unit_bytes) if i not in fz)
        if trained > self.trained_bytes_budget:
            return (f"the trained units hold {trained} bytes, above the step's budget of "
                    f"{self.trained_bytes_budget} (rate_of='bytes')")
        return None

    def reserved_slots(self, n_train: int) -> int:
        """Trained slots reserved for the least recently trained units:
        ``floor(reserve_fraction * n_train)``, at least 1 when the fraction is
        above 0 and ``n_train >= 2`` (one slot always stays with the scores).

        >>> s = InterLayerScheduler([f"u{i}" for i in range(53)], 0.95, reserve_fraction=0.25)
        >>> s.reserved_slots(3), s.reserved_slots(6), s.reserved_slots(11), s.reserved_slots(1)
        (1, 1, 2, 0)
        """
        if self.reserve_fraction <= 0.0 or n_train < 2:
            return 0
        return max(1, math.floor(self.reserve_fraction * n_train))

    @property
    def initial_pass_done(self) -> bool:
        return all(s is not None for s in self.scores)

    def run_note(self, total_steps: float) -> str | None:
        """Nothing beyond the evidence's note (the freezer's ``short_budget_note``)."""
        return None

    def effective_scores(self) -> list[float | None]:
        """Scores as the next decision sees them: a stale score divided by
        ``frozen_score_decay ** age`` (``None``: never measured)."""
        d = self.frozen_score_decay
        if d is None or d == 1.0:
            return list(self.scores)
        # exp(min(., 700)): a very old unit gets a huge but finite boost (no OverflowError)
        return [None if s is None else s * math.exp(min(-a * math.log(d), 700.0))
                for s, a in zip(self.scores, self.ages)]

    def decide(self) -> list[int]:
        """Indices of the units to freeze in the coming step (sorted).

        Consumes random numbers: call once per optimizer step.
        """
        t = len(self.names)
        ties = [self._rng.random() for _ in range(t)]  # one per unit, as always
        scores, ages, cap = self.effective_scores(), self.ages, self.max_frozen_age
        first, rest = [], []  # (1) never measured, (2) forced by age; the rest
        for i, s in enumerate(scores):
            if s is None:
                first.append((2, 0.0, ties[i], i))
            elif cap is not None and ages[i] >= cap:
                first.append((1, float(ages[i]), ties[i], i))  # oldest first: all come back
            else:
                rest.append(i)
        first.sort(reverse=True)
        if self.unit_bytes is not None:
            return self._decide_bytes([i for *_, i in first], rest, scores, ages, ties)
        n_train = self.num_trained
        trained = [i for *_, i in first[:n_train]]
        # (3) reserved slots: the least recently trained (largest age) of the rest
        n_res = min(self.reserved_slots(n_train), n_train - len(trained))
        if n_res > 0:
            rest.sort(key=lambda i: (ages[i], ties[i]), reverse=True)
            trained += rest[:n_res]
            rest = rest[n_res:]
        # (4) the remaining slots by score
        trained += self._score_order(rest, scores, ties)[:n_train - len(trained)]
        keep = set(trained)
        return [i for i in range(t) if i not in keep]

    def _score_order(self, rest: list[int], scores: list, ties: list[float]) -> list[int]:
        """``rest`` by score, highest first (``"sample"``: by Efraimidis-Spirakis key)."""
        if self.selection == "sample":
            keys = {}
            for i in rest:  # Efraimidis-Spirakis: log(u) / s, larger first; s = 0 last
                u = 1.0 - self._rng.random()  # in (0, 1]
                keys[i] = (math.log(u) / scores[i] if scores[i] > 0 else -math.inf, ties[i])
            return sorted(rest, key=keys.__getitem__, reverse=True)
        return sorted(rest, key=lambda i: (scores[i], ties[i]), reverse=True)

    def _decide_bytes(self, first: list[int], rest: list[int], scores: list, ages: list[int],
                      ties: list[float]) -> list[int]:
        """:meth:`decide` with the rate a fraction of the bytes: the same order
        (never measured or stale, reserved, by score), each unit taken when it
        fits in what is left of the budget, else passed over."""
        size, left, trained = self.unit_bytes, self.trained_bytes_budget, []

        def take(order: list[int], share: int) -> int:
            """Take units of ``order`` that fit in ``left`` until ``share`` bytes are taken."""
            used = 0
            for i in order:
                if used >= share:
                    break
                if size[i] <= left - used:
                    trained.append(i)
                    used += size[i]
            return used

        left -= take(first, left)
        if self.reserve_fraction > 0:
            # the least recently trained, until their share of the budget is reached: the
            # oldest is taken whenever it fits in what is left, so a unit larger than the
            # share (an embedding) still comes back once it is the oldest
            by_age = sorted(rest, key=lambda i: (ages[i], ties[i]), reverse=True)
            left -= take(by_age, max(1, math.floor(self.reserve_fraction * left)))
        taken = set(trained)
        take(self._score_order([i for i in rest if i not in taken], scores, ties), left)
        keep = set(trained)
        return [i for i in range(len(self.names)) if i not in keep]

    def update(self, frozen: Sequence[int], scores: Sequence[float] | None) -> None:
        """Record a finished step: ``scores`` of the trained units (in index
        order), or ``None`` when the step measured nothing (skipped by the
        grad scaler, a zero learning rate, a non-finite loss or score).

        Raises:
            SlimFitError: a score count that does not match, or a NaN/inf
                score (the caller must pass ``None`` for such a step).
        """
        fz = set(frozen)
        trained = [i for i in range(len(self.names)) if i not in fz]
        if scores is not None:
            if len(scores) != len(trained):
                raise SlimFitError(f"got {len(scores)} scores for {len(trained)} trained units.")
            bad = [self.names[i] for i, s in zip(trained, scores) if not math.isfinite(s)]
            if bad:
                raise SlimFitError(f"non-finite scores for units {bad[:5]}: a NaN would never be "
                                   "frozen; record the step with scores=None instead.")
            for i, s in zip(trained, scores):
                self.scores[i] = float(s)
        for i in range(len(self.names)):
            self.ages[i] = self.ages[i] + 1 if i in fz else 0
        self.step += 1

    # -- checkpointing -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "names": list(self.names),
                "freeze_rate": self.freeze_rate, "max_frozen_age": self.max_frozen_age,
                "frozen_score_decay": self.frozen_score_decay, "selection": self.selection,
                "reserve_fraction": self.reserve_fraction, "rate_of": self.rate_of,
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
                "not a SlimFit scheduler state (got "
                + (f"version {state.get('version')!r}" if isinstance(state, dict) else
                   f"a {type(state).__name__}, not a dict")
                + f"; expected version {STATE_VERSION}); the checkpoint is corrupt or from "
                "another tool.")
        if state.get("policy", "slimfit") != "slimfit":
            raise CheckpointMismatchError(
                f"the checkpoint's freezing state is for policy {state['policy']!r}, not "
                "'slimfit'; resume with the policy the run was saved with.")
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
        try:  # validate before anything is changed
            random.Random().setstate(rng_state)
        except (TypeError, ValueError) as e:
            raise CheckpointMismatchError(f"corrupt SlimFit scheduler state: rng_state "
                                          f"{str(rng_state)[:60]!r} is not a random.Random "
                                          f"state ({e}).") from e
        if len(scores) != n or len(ages) != n or \
                any(s is not None and not math.isfinite(s) for s in scores):
            raise CheckpointMismatchError(
                f"corrupt SlimFit scheduler state: {len(scores)} scores and {len(ages)} ages "
                f"for {n} units, or a non-finite score.")
        # a policy that differs from the saved one (a changed default: reserve_fraction
        # became 0.25) continues the run with other decisions: said, not refused, as a
        # user may change the policy on purpose; a state older than an option ran without it
        before = {"max_frozen_age": None, "frozen_score_decay": None, "selection": "topk",
                  "reserve_fraction": 0.0, "rate_of": "units"}
        changed = [f"{k}={state.get(k, old)!r} (now {getattr(self, k)!r})"
                   for k, old in before.items() if state.get(k, old) != getattr(self, k)]
        if changed:
            warnings.warn("the checkpoint's SlimFit state was saved with " + ", ".join(changed)
                          + ": the freezing decisions from here on differ from the saved run's; "
                          "pass the saved values to continue it as it was.", stacklevel=2)
        self.scores, self.ages, self.step = scores, ages, step
        self._rng.setstate(rng_state)
