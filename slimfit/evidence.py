"""What the fidelity study measured, as the library uses it: the accuracy price
of each freezing setting (the planner orders plans by it and prints it) and
the fewest updates per unit that kept accuracy (a run shorter than that
warns, :class:`slimfit.errors.ShortBudgetWarning`).

Why a file and not constants: the figures are study results, and they change
whenever the study runs again. They live in one JSON file written by the
study itself (``python -m slimfit.experiments.fidelity --evidence`` from
``experiments/results/fidelity.jsonl``; a test regenerates it and compares),
shipped with ``slimfit.experiments``; this module holds only the logic that
reads them: interpolation of the price over the freezing rate, and the
updates-per-unit threshold. ``SLIMFIT_EVIDENCE=<path>`` or
:meth:`Evidence.from_file` use another file; with none installed, prices are
unknown (0, said so) and no run is called short.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import importlib.resources
import json
import math
import os
import pathlib
from typing import Any

__all__ = ["BudgetRun", "Evidence", "Price", "expected_price", "short_budget_note", "updates_per_unit"]


@dataclasses.dataclass(frozen=True)
class Price:
    """Mean paired gap (accuracy points, negative = worse than ``against``)."""

    gap: float
    runs: int          # paired runs behind the mean
    arm: str           # the study arm it comes from
    task: str          # its task, or "all": every task's paired runs
    against: str = "full"  # the arm each run is paired with (same task and seed)


@dataclasses.dataclass(frozen=True)
class BudgetRun:
    """One run of the defaults at some training length, paired with full
    fine-tuning at the same length and seed (``gap`` in points)."""

    task: str
    arm: str
    seed: int
    updates: float  # how many times each candidate unit trained, on average
    gap: float


def updates_per_unit(steps: float, trained: int, units: int) -> float:
    """Average times each of ``units`` candidate units trains in ``steps``
    steps that train ``trained`` of them each."""
    return steps * trained / units


def _curve(points: list[tuple[float, float]], rate: float, origin: float = 0.0) -> float:
    """Piecewise-linear price through ``(0, origin)`` and ``points``, never
    falling as the rate grows, the last slope extended beyond the last point."""
    pts = [(0.0, origin)] + sorted(pt for pt in points if pt[0] > 0)
    for i in range(1, len(pts)):  # more freezing never priced cheaper (seed noise aside)
        pts[i] = (pts[i][0], min(pts[i][1], pts[i - 1][1]))
    i = bisect.bisect_right([r for r, _ in pts], rate)
    if i >= len(pts):  # beyond the last measured rate: extend the last slope
        (r0, g0), (r1, g1) = pts[-2] if len(pts) > 1 else pts[-1], pts[-1]
        slope = (g1 - g0) / (r1 - r0) if r1 > r0 else 0.0
        return g1 + slope * (rate - r1)
    (r0, g0), (r1, g1) = pts[i - 1], pts[i]
    return g0 + (g1 - g0) * (rate - r0) / (r1 - r0)


@dataclasses.dataclass(frozen=True)
class Evidence:
    """The study's figures.

    Attributes:
        prices: ``(freeze_rate, compression) -> Price`` at the defaults of that
            setting; full fine-tuning (0, no compression) is the reference.
        compression: compression's own price (runs with and without it at the
            same task, seed and rate), or None until measured.
        budget_runs: every run of the defaults at any training length.
        source: where the figures come from (printed with a price).
    """

    prices: dict[tuple[float, bool], Price] = dataclasses.field(default_factory=dict)
    compression: Price | None = None
    budget_runs: tuple[BudgetRun, ...] = ()
    source: str = "no study evidence installed"

    # -- reading ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Evidence":
        """From the JSON the study writes (``fidelity --evidence``)."""
        prices = {(float(p["freeze_rate"]), bool(p["compression"])):
                  Price(p["gap"], p["runs"], p["arm"], p["task"], p.get("against", "full"))
                  for p in data.get("prices", [])}
        comp = data.get("compression")
        return cls(prices=prices, compression=Price(**comp) if comp else None,
                   budget_runs=tuple(BudgetRun(**r) for r in data.get("budget_runs", [])),
                   source=str(data.get("source", "")))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Evidence":
        return cls.from_dict(json.loads(pathlib.Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source,
                "prices": [{"freeze_rate": r, "compression": c, **dataclasses.asdict(p)}
                           for (r, c), p in sorted(self.prices.items())],
                "compression": dataclasses.asdict(self.compression) if self.compression else None,
                "budget_runs": [dataclasses.asdict(r) for r in self.budget_runs]}

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def default() -> "Evidence":
        """``$SLIMFIT_EVIDENCE``, else the study's file shipped with
        ``slimfit.experiments``, else no evidence (read once)."""
        path = os.environ.get("SLIMFIT_EVIDENCE")
        if path:
            return Evidence.from_file(path)
        try:
            shipped = importlib.resources.files("slimfit.experiments") / "results" / "evidence.json"
            if shipped.is_file():
                return Evidence.from_dict(json.loads(shipped.read_text()))
        except ModuleNotFoundError:  # the library without the experiments package
            pass
        return Evidence()

    # -- prices ---------------------------------------------------------------------------
    def compression_price(self) -> float | None:
        """What compression adds to the price (points, <= 0: a measured gain is
        read as seed noise); None if not measured."""
        return None if self.compression is None else min(0.0, self.compression.gap)

    def expected_price(self, freeze_rate: float, compression: bool) -> tuple[float, str]:
        """Expected accuracy price (points) of freezing at ``freeze_rate`` with or
        without compression, and a note on where the figure comes from.

        A price is never positive: a measured mean above full fine-tuning is read
        as seed noise (price 0, the note gives the mean). Each setting's price is
        interpolated linearly through its own measured rates, from full
        fine-tuning (0 at rate 0) without compression, from compression alone's
        price with it (measured, or compression's own price until it is); a
        setting with no measured rate uses the other's points moved by
        compression's own price (at most 0; 0 until measured, and the note says
        so). Beyond the highest measured rate the last slope is extended (the
        note says "extrapolated"), and prices never fall as the rate grows (a
        lower price measured at a higher rate is seed noise, and the note says
        which price was used), so the figure errs on the side of a larger price.
        """
        if freeze_rate == 0 and not compression:
            return 0.0, "exact"
        if not self.prices:
            return 0.0, f"not measured ({self.source})"
        comp = self.compression_price()
        shift = comp or 0.0  # compression's own price, 0 until measured
        own = [(r, p.gap) for (r, c), p in self.prices.items() if c == compression]
        if not own:  # the other setting's points, moved by compression's price
            own = [(r, p.gap + (shift if compression else -shift))
                   for (r, _c), p in self.prices.items()]
        alone = self.prices.get((0.0, True))  # compression alone, every Linear input int8
        origin = 0.0
        if compression:  # the curve starts at compression alone's price
            origin = shift if alone is None else min(0.0, alone.gap)
        gap = _curve(own, freeze_rate, origin=origin)  # never above origin <= 0
        measured = self.prices.get((round(freeze_rate, 4), compression))
        if measured is not None:
            where = "all tasks" if measured.task == "all" else measured.task
            note = f"measured: {where}, {measured.runs} paired run(s)"
            if gap < min(0.0, measured.gap) - 1e-9:  # a lower rate measured a larger loss
                note += (f", mean {measured.gap:+.2f}; priced at a lower rate's measured price "
                         "(more freezing is never priced cheaper)")
            elif measured.gap > 0:  # a mean above full fine-tuning is seed noise, not a bonus
                note += f", mean {measured.gap:+.2f}: no loss measured"
            return gap, note
        top = max(r for r, _ in own)
        note = ("interpolated from the fidelity study" if freeze_rate <= top else
                f"extrapolated beyond the highest rate the study measured ({top:g})")
        if freeze_rate == 0 and compression and alone is None and comp is not None:
            note = (f"inferred: compression's own price with freezing ({self.compression.runs} "
                    "paired run(s)); compression alone not trained in the study yet")
        if compression and comp is None:
            note += "; compression's own price not measured yet (gradient cosine >= 0.99)"
        return gap, note

    # -- short runs -------------------------------------------------------------------------
    def short_threshold(self, tolerance: float = 1.0) -> tuple[BudgetRun, float] | None:
        """The run with the most updates per unit that still lost more than
        ``tolerance`` points, and the fewest updates measured above it (every run
        from there on within the tolerance); None if no run lost that much or none
        was measured above it (no count known to be enough)."""
        lost = [r for r in self.budget_runs if r.gap < -tolerance]
        if not lost:
            return None
        worst = max(lost, key=lambda r: r.updates)
        above = [r.updates for r in self.budget_runs if r.updates > worst.updates]
        return (worst, min(above)) if above else None

    def short_budget_note(self, steps: float, trained: int, units: int,
                          tolerance: float = 1.0) -> str | None:
        """A warning when a run of ``steps`` optimizer steps, training ``trained``
        of its ``units`` candidate units per step, trains each unit fewer times
        than the study needed to stay within ``tolerance`` points of full
        fine-tuning; None when it trains them as often (or the length is unknown).

        The count that matters is updates per unit (``steps * trained / units``),
        not epochs: at r = 0.9 a unit trains in about a tenth of the steps, and a
        large data set's single epoch can be plenty. The threshold is the fewest
        updates the study measured above its most-updated loss past the
        tolerance; a run between the two counts as short (the note errs towards
        warning). The note names both runs and what reaches the count: more
        steps, or the highest freezing rate that trains each unit often enough.
        """
        if not math.isfinite(steps) or steps <= 0 or units <= 0 or trained >= units:
            return None  # length unknown, or nothing frozen: every unit trains every step
        found = self.short_threshold(tolerance)
        if found is None:
            return None
        worst, safe = found
        updates = updates_per_unit(steps, trained, units)
        if updates >= safe:
            return None
        need_steps = math.ceil(safe * units / trained)
        need_trained = math.ceil(safe * units / steps)  # units per step that reach it in these steps
        if need_trained < units:
            rate = math.floor(100 * (units - need_trained) / units) / 100  # floor(r*t) <= t - need
            lower = f"freeze_rate <= {rate:.2f} (trains {need_trained}+ units per step)"
        else:
            lower = "compression alone (freeze_rate=0.0): no unit is frozen"
        return (f"SlimFit trains each of its {units} candidate units about {updates:.1f} times "
                f"in this run ({steps:.0f} steps, {trained} units per step). The fidelity study "
                f"lost {-worst.gap:.2f} points to full fine-tuning at {worst.updates:.1f} updates "
                f"per unit ({worst.task}, {worst.arm}, seed {worst.seed}); every run from "
                f"{safe:.1f} on stayed within {tolerance:g} point. For the accuracy of full "
                f"fine-tuning: train >= {need_steps} steps, or {lower}.")


def expected_price(freeze_rate: float, compression: bool,
                   evidence: Evidence | None = None) -> tuple[float, str]:
    """:meth:`Evidence.expected_price` of ``evidence`` (default: the study's)."""
    return (evidence or Evidence.default()).expected_price(freeze_rate, compression)


def short_budget_note(steps: float, trained: int, units: int, tolerance: float = 1.0,
                      evidence: Evidence | None = None) -> str | None:
    """:meth:`Evidence.short_budget_note` of ``evidence`` (default: the study's)."""
    return (evidence or Evidence.default()).short_budget_note(steps, trained, units, tolerance)
