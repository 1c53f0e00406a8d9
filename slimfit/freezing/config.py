"""``SlimFitConfig``: the validated options of the freezing method.

One dataclass shared by the plain-PyTorch :class:`slimfit.freezing.freezer.LayerFreezer`
and the Lightning callback, so both reject bad values with the same messages
(what was received, what is allowed, how to fix it) before any training runs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from slimfit.errors import SlimFitError
from slimfit.freezing.policies import BADAM_ORDERS, POLICIES
from slimfit.freezing.scheduler import RATE_OF, SELECTIONS
from slimfit.freezing.scores import SCORES
from slimfit.selection import Pattern, validate_pattern

__all__ = ["SlimFitConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlimFitConfig:
    """Options of per-iteration layer freezing (arXiv 2305.18513, sections 1-2).

    The defaults are the fidelity study's choices; each choice, and the runs
    behind it, are in docs/results.md ("Fidelity at the paper's budget").

    Attributes:
        freeze_rate: fraction r in [0, 1) of the rotating units frozen each
            optimizer step: ``floor(r * t)`` of ``t`` units (paper: 0.8-0.95),
            whatever the policy; with ``rate_of="bytes"``, of their bytes.
        rate_of: what ``freeze_rate`` is a fraction of: ``"units"`` (the
            paper: ``floor(r * t)`` units frozen) or ``"bytes"`` (each step
            trains units holding at most ``(1 - r)`` of the rotating bytes, so
            the trained set's gradients and optimizer state are bounded by the
            rate when units differ in size, as a decoder's embedding and
            projections do; ``"slimfit"`` policy only).
        policy: how the trained units are chosen (:mod:`slimfit.freezing.
            policies`): ``"slimfit"`` (by training-dynamics score, the paper's
            inter-layer scheduler), ``"lisa"`` (sampled uniformly at random,
            kept for ``interval`` steps; arXiv 2403.17919) or ``"badam"``
            (consecutive blocks of units in turn, each for ``interval`` steps;
            arXiv 2404.02827).
        interval: K, the steps a LISA sample or a BAdam block is kept
            (``None``: the tool's default, LISA 20 as LMFlow's
            ``lisa_interval_steps``, BAdam 50 as its ``switch_block_every``).
        order: BAdam's block order: ``"ascending"``, ``"descending"`` or
            ``"random"`` (a new permutation every round).
        trained_units: units trained per step instead of ``freeze_rate``'s
            ``t - floor(r * t)`` (LISA's gamma, BAdam's block size); ``None``:
            from ``freeze_rate``.
        include: candidate parameters (regex full match or list of names);
            default: weights with dim() > 1 and normalisation weights.
        exclude: parameters never frozen.
        always_train: parameters never frozen (e.g. a new classifier head).
        groups: regexes whose first capture group names a unit frozen as one.
        seed: seed of the random tie-breaks, samples and the initial round robin.
        max_frozen_age: force a unit to train after this many consecutive
            frozen steps (``None``: the paper's behaviour, where stale scores
            age only implicitly as the learning rate decays; the study found
            ``reserve_fraction`` ages units more gently).
        score_eps: epsilon in ``|W_new - W_old| / (|W_old| + eps)``.
        lr_normalized: divide each score by the learning rate its step used.
            The paper's raw score is proportional to the learning rate, so
            under warm-up the units measured first (at a tiny lr) look
            converged and, with stale scores, stay frozen; normalizing makes
            scores comparable across steps. Combine with ``max_frozen_age``
            (the implicit aging from lr decay is gone too). Update-based
            scores only (``"paper"``, ``"update_norm"``).
        score: the training-dynamics score (:mod:`slimfit.freezing.scores`):
            ``"paper"`` mean(|dW| / (|W| + eps)), ``"update_norm"``
            ||dW|| / (||W|| + eps), ``"grad_norm"`` ||g|| / (||W|| + eps),
            ``"fisher"`` mean(g^2) * mean(W^2).
        on_nonfinite: a non-finite loss or score: ``"warn"`` (once, naming
            the step; the step's scores are not recorded) or ``"raise"``.
        train_new_heads: never freeze the parameters the pretrained checkpoint
            did not provide, or else the model's output head
            (:mod:`slimfit.freezing.heads`); a head matched by ``include``
            stays a candidate.
        frozen_score_decay: d in (0, 1]: the authority of a frozen unit's
            stale score decays with each step it stays frozen, the unit
            competing with ``score / d ** age``, so it comes back on its own
            (0.99: x2 after ~70 frozen steps; ``None``: the paper's behaviour).
        selection: how the trained set is chosen from the scores: ``"topk"``
            (the highest, deterministic) or ``"sample"`` (without replacement,
            in proportion to the scores, seeded).
        reserve_fraction: fraction in [0, 1) of the trained slots given to the
            least recently trained units (oldest frozen first; at least one
            slot when above 0), the rest going by score: top-k on stale scores
            lets a few matrices take nearly every update while LayerNorm gains
            and embeddings, whose relative change is small by construction,
            train once and never again; a rotating slot brings every unit
            back (MiniLM at r = 0.9: 53 units, 1 of the 6 trained slots, each
            unit back within 53 steps). ``0.0`` is the paper's top-k. A
            checkpoint saved under another value resumes with a warning.
        trained_lr_scale: multiply the optimizer step of every candidate unit
            trained this step by this factor (``W <- W_old + s * dW``: under
            SGD or AdamW, its learning rate times s; always-trained tensors,
            biases and new heads keep the optimizer's rate). A unit trains in
            only about 1 - r of the steps; ``"auto"`` uses ``(1 - r) ** -0.5``
            under the ``"slimfit"`` policy (3.16 at r = 0.9; 1 at r = 0) and
            1.0 under LISA and BAdam (their papers' step, a unit training K
            steps in a row); 1.0 is the optimizer's rate (the paper's).
    """

    freeze_rate: float = 0.9
    rate_of: str = "units"
    policy: str = "slimfit"
    interval: int | None = None
    order: str = "ascending"
    trained_units: int | None = None
    include: Pattern | None = None
    exclude: Pattern | None = None
    always_train: Pattern | None = None
    groups: Sequence[str] | None = None
    seed: int = 0
    max_frozen_age: int | None = None
    score_eps: float = 1e-8
    lr_normalized: bool = False
    score: str = "paper"
    on_nonfinite: str = "warn"
    train_new_heads: bool = True
    frozen_score_decay: float | None = None
    selection: str = "topk"
    reserve_fraction: float = 0.25
    trained_lr_scale: float | str = "auto"

    def __post_init__(self):
        r = self.freeze_rate
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) \
                or not 0.0 <= r < 1.0:
            raise SlimFitError(
                f"freeze_rate must be a number in [0, 1), got {r!r}. It is the fraction of "
                "candidate layers frozen each step; the paper uses 0.8-0.95 (0 = full fine-tuning).")
        self._check_policy()
        for field in ("include", "exclude", "always_train"):
            validate_pattern(getattr(self, field), field)
        if self.groups is not None:
            if isinstance(self.groups, str):
                raise SlimFitError(f"groups must be a list of regex strings, got the string "
                                   f"{self.groups!r}; wrap it in a list.")
            for g in self.groups:
                if not isinstance(g, str):
                    raise SlimFitError(f"each groups entry must be a regex string, got {g!r}.")
                validate_pattern(g, "groups")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SlimFitError(f"seed must be an int, got {self.seed!r}.")
        a = self.max_frozen_age
        if a is not None and (isinstance(a, bool) or not isinstance(a, int) or a < 1):
            raise SlimFitError(f"max_frozen_age must be None or an int >= 1, got {a!r}.")
        if not isinstance(self.lr_normalized, bool):
            raise SlimFitError(f"lr_normalized must be a bool, got {self.lr_normalized!r}.")
        if isinstance(self.score_eps, bool) or not isinstance(self.score_eps, (int, float)) \
                or not 0 < self.score_eps < math.inf:
            raise SlimFitError(f"score_eps must be a positive finite float (default 1e-8), "
                               f"got {self.score_eps!r}.")
        for field, allowed in (("score", SCORES), ("on_nonfinite", ("warn", "raise")),
                               ("selection", SELECTIONS)):
            if getattr(self, field) not in allowed:
                raise SlimFitError(f"{field} must be one of {', '.join(map(repr, allowed))}, "
                                   f"got {getattr(self, field)!r}.")
        if self.lr_normalized and self.score not in ("paper", "update_norm"):
            raise SlimFitError(
                f"lr_normalized=True divides an update by the learning rate that made it, but "
                f"score={self.score!r} does not depend on the learning rate; use "
                "score='paper' or 'update_norm', or lr_normalized=False.")
        if not isinstance(self.train_new_heads, bool):
            raise SlimFitError(f"train_new_heads must be a bool, got {self.train_new_heads!r}.")
        d = self.frozen_score_decay
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float))
                              or not 0.0 < d <= 1.0):
            raise SlimFitError(
                f"frozen_score_decay must be None or a number in (0, 1], got {d!r}; e.g. 0.99 "
                "doubles a frozen unit's stale score in ~70 steps (None: the paper's behaviour).")
        f = self.reserve_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
            raise SlimFitError(
                f"reserve_fraction must be a number in [0, 1), got {f!r}: the fraction of the "
                "trained slots given to the least recently trained units (0 = none).")
        s = self.trained_lr_scale
        if s != "auto" and (isinstance(s, bool) or not isinstance(s, (int, float))
                            or not 0.0 < s < math.inf):
            raise SlimFitError(
                f"trained_lr_scale must be a positive finite number or 'auto', got {s!r}: "
                "the factor on the optimizer step of the units trained in a step (1.0 = the "
                "optimizer's learning rate; 'auto' = (1 - freeze_rate) ** -0.5).")

    def _check_policy(self) -> None:
        if self.policy not in POLICIES:
            raise SlimFitError(f"policy must be one of {', '.join(map(repr, POLICIES))}, got "
                               f"{self.policy!r}.")
        k = self.interval
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise SlimFitError(f"interval must be None or an int >= 1 (the steps a LISA sample or "
                               f"a BAdam block is kept), got {k!r}.")
        if k is not None and self.policy == "slimfit":
            raise SlimFitError(f"interval={k} applies to policy='lisa' or 'badam'; the 'slimfit' "
                               "policy decides every step. Drop interval or choose the policy.")
        if self.order not in BADAM_ORDERS:
            raise SlimFitError(f"order must be one of {', '.join(map(repr, BADAM_ORDERS))}, got "
                               f"{self.order!r}.")
        if self.order != "ascending" and self.policy != "badam":
            raise SlimFitError(f"order={self.order!r} is BAdam's block order; it applies to "
                               "policy='badam' only.")
        n = self.trained_units
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise SlimFitError(f"trained_units must be None (from freeze_rate) or an int >= 1, "
                               f"got {n!r}.")
        if self.rate_of not in RATE_OF:
            raise SlimFitError(f"rate_of must be one of {', '.join(map(repr, RATE_OF))} (what "
                               f"freeze_rate is a fraction of), got {self.rate_of!r}.")
        if self.rate_of == "bytes" and self.policy != "slimfit":
            raise SlimFitError(f"rate_of='bytes' applies to policy='slimfit'; {self.policy!r} "
                               "trains a number of units (its paper's), so use rate_of='units'.")
        if self.rate_of == "bytes" and n is not None:
            raise SlimFitError(f"trained_units={n} counts units but rate_of='bytes' makes "
                               "freeze_rate a fraction of the bytes; use one of them.")

    def frozen_count(self, units: int) -> int:
        """Units frozen per step out of ``units``: ``floor(r * t)``, or
        ``t - trained_units`` when that is set.

        Raises:
            SlimFitError: ``trained_units`` larger than the model's units.
        """
        if self.trained_units is None:
            return math.floor(self.freeze_rate * units)
        if self.trained_units > units:
            raise SlimFitError(f"trained_units={self.trained_units} but the model has {units} "
                               "rotating units; choose at most that many.")
        return units - self.trained_units

    def lr_scale(self, trained_fraction: float) -> float:
        """The factor :attr:`trained_lr_scale` stands for when ``trained_fraction``
        of the units train each step (``"auto"``: ``trained_fraction ** -0.5``
        under the ``"slimfit"`` policy, 1 under LISA and BAdam)."""
        if self.trained_lr_scale != "auto":
            return float(self.trained_lr_scale)
        if self.policy != "slimfit" or trained_fraction <= 0:
            return 1.0
        return trained_fraction ** -0.5

    def selection_kwargs(self) -> dict:
        """The arguments of :func:`slimfit.selection.select_units`."""
        return {"include": self.include, "exclude": self.exclude,
                "always_train": self.always_train, "groups": self.groups}
