"""``SlimFitConfig``: the validated options of the freezing method.

One dataclass shared by the plain-PyTorch :class:`slimfit.freezer.LayerFreezer`
and the Lightning callback, so both reject bad values with the same messages
(what was received, what is allowed, how to fix it) before any training runs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from slimfit.errors import SlimFitError
from slimfit.selection import Pattern, _validate_pattern

__all__ = ["SlimFitConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlimFitConfig:
    """Options of per-iteration layer freezing (arXiv 2305.18513, sections 1-2).

    Attributes:
        freeze_rate: fraction r in [0, 1) of candidate units frozen each
            optimizer step: ``floor(r * t)`` of ``t`` units (paper: 0.8-0.95).
        include: candidate parameters (regex full match or list of names);
            default: weights with dim() > 1 and normalisation weights.
        exclude: parameters never frozen.
        always_train: parameters never frozen (e.g. a new classifier head).
        groups: regexes whose first capture group names a unit frozen as one.
        seed: seed of the random tie-breaks and the initial round robin.
        max_frozen_age: force a unit to train after this many consecutive
            frozen steps (``None``: the paper's behaviour, where stale scores
            age only implicitly as the learning rate decays).
        score_eps: epsilon in ``|W_new - W_old| / (|W_old| + eps)``.
        lr_normalized: divide each score by the learning rate its step used.
            The paper's raw score is proportional to the learning rate, so
            under warm-up the units measured first (at a tiny lr) look
            converged and, with stale scores, stay frozen; normalizing makes
            scores comparable across steps. Combine with ``max_frozen_age``
            (the implicit aging from lr decay is gone too).
    """

    freeze_rate: float = 0.9
    include: Pattern | None = None
    exclude: Pattern | None = None
    always_train: Pattern | None = None
    groups: Sequence[str] | None = None
    seed: int = 0
    max_frozen_age: int | None = None
    score_eps: float = 1e-8
    lr_normalized: bool = False

    def __post_init__(self):
        r = self.freeze_rate
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) \
                or not 0.0 <= r < 1.0:
            raise SlimFitError(
                f"freeze_rate must be a number in [0, 1), got {r!r}. It is the fraction of "
                "candidate layers frozen each step; the paper uses 0.8-0.95 (0 = full fine-tuning).")
        for field in ("include", "exclude", "always_train"):
            _validate_pattern(getattr(self, field), field)
        if self.groups is not None:
            if isinstance(self.groups, str):
                raise SlimFitError(f"groups must be a list of regex strings, got the string "
                                   f"{self.groups!r}; wrap it in a list.")
            for g in self.groups:
                if not isinstance(g, str):
                    raise SlimFitError(f"each groups entry must be a regex string, got {g!r}.")
                _validate_pattern(g, "groups")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SlimFitError(f"seed must be an int, got {self.seed!r}.")
        a = self.max_frozen_age
        if a is not None and (isinstance(a, bool) or not isinstance(a, int) or a < 1):
            raise SlimFitError(f"max_frozen_age must be None or an int >= 1, got {a!r}.")
        if not isinstance(self.lr_normalized, bool):
            raise SlimFitError(f"lr_normalized must be a bool, got {self.lr_normalized!r}.")
        if not isinstance(self.score_eps, (int, float)) or not self.score_eps > 0:
            raise SlimFitError(f"score_eps must be a positive float, got {self.score_eps!r}.")

    def selection_kwargs(self) -> dict:
        """The arguments of :func:`slimfit.selection.select_units`."""
        return {"include": self.include, "exclude": self.exclude,
                "always_train": self.always_train, "groups": self.groups}
