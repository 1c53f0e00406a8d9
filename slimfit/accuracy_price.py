"""The accuracy price of each SlimFit setting, as measured by the fidelity study.

Why a table and not a model: what freezing and compression cost in accuracy
is an empirical fact about fine-tuning, not something a calibration step can
measure. The budget planner uses this table to put accuracy first (the lowest
price that fits) and prints the price with its plan, so the user sees what
the memory costs before training.

Source: ``python -m slimfit.experiments.fidelity --report`` (MiniLM, 3 epochs,
the paper's budget; per-seed paired gaps to full fine-tuning at the same
seed; ``experiments/results/fidelity.jsonl``). ``tests/test_accuracy_price.py``
checks that every entry equals what that report computes from the committed
results, so the table cannot drift from the study.
"""

from __future__ import annotations

import bisect
import dataclasses
import math

__all__ = ["Price", "MEASURED", "COMPRESSION", "expected_price", "compression_price",
           "BudgetRun", "BUDGET_RUNS", "STUDY_TRAINED", "short_budget_note"]


@dataclasses.dataclass(frozen=True)
class Price:
    """Mean paired gap (accuracy points, negative = worse than ``against``)."""

    gap: float
    runs: int          # paired runs behind the mean
    arm: str           # the study arm it comes from
    task: str          # its task, or "all": every task's paired runs
    against: str = "full"  # the arm each run is paired with (same task and seed)


#: (freeze_rate, compression) -> measured price at the defaults of that arm.
#: Full fine-tuning (rate 0, no compression) is the reference: price 0.
MEASURED: dict[tuple[float, bool], Price] = {
    (0.0, True): Price(gap=-0.30, runs=1, arm="compress-only", task="movie"),
    (0.5, True): Price(gap=-0.10, runs=2, arm="slimfit-r0.5", task="movie"),
    (0.8, True): Price(gap=0.00, runs=2, arm="slimfit-r0.8", task="movie"),
    # every task with paired runs at the defaults, TREC included
    (0.9, True): Price(gap=-0.17, runs=12, arm="slimfit", task="all"),
    (0.95, True): Price(gap=-1.35, runs=2, arm="slimfit-r0.95", task="movie"),
    # measured before a quarter of the trained slots were reserved (the default since)
    (0.9, False): Price(gap=-1.00, runs=1, arm="slimfit-nocompress@topk", task="movie"),
}

#: Compression's own price: the mean difference between runs with and without
#: it at the same task, seed and rate (``arm`` against ``against``), not the
#: difference of two means over different tasks; None until measured.
COMPRESSION: Price | None = Price(gap=0.40, runs=1, arm="slimfit-topk", task="movie",
                                  against="slimfit-nocompress@topk")


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


def compression_price() -> float | None:
    """What compression adds to the price (points, <= 0: a measured gain is
    read as seed noise), from :data:`COMPRESSION`; None if not measured."""
    return None if COMPRESSION is None else min(0.0, COMPRESSION.gap)


def expected_price(freeze_rate: float, compression: bool) -> tuple[float, str]:
    """Expected accuracy price (points) of freezing at ``freeze_rate`` with or
    without compression, and a note on where the figure comes from.

    A price is never positive: a measured mean above full fine-tuning is read
    as seed noise (price 0, the note gives the mean). Each setting's price is
    interpolated linearly through its own measured rates, from full
    fine-tuning (0 at rate 0) without compression, from compression alone's
    price with it (measured, or compression's own price until it is); a
    setting with no measured rate uses the other's points moved by
    compression's own price (:data:`COMPRESSION`, at most 0; 0 until
    measured, and the note says so). Beyond the highest measured rate the
    last slope is extended (the note says "extrapolated"), and prices never
    fall as the rate grows (a lower price measured at a higher rate is seed
    noise, and the note says which price was used), so the figure errs on
    the side of a larger price.
    """
    if freeze_rate == 0 and not compression:
        return 0.0, "exact"
    comp = compression_price()
    shift = comp or 0.0  # compression's own price, 0 until measured
    own = [(r, p.gap) for (r, c), p in MEASURED.items() if c == compression]
    if not own:  # the other setting's points, moved by compression's price
        own = [(r, p.gap + (shift if compression else -shift)) for (r, _c), p in MEASURED.items()]
    alone = MEASURED.get((0.0, True))  # compression alone, trained (every Linear input int8)
    # with compression the curve starts at compression alone's price (rate 0): measured, or
    # compression's own price until it is
    origin = 0.0
    if compression:
        origin = shift if alone is None else min(0.0, alone.gap)
    gap = _curve(own, freeze_rate, origin=origin)  # never above origin <= 0: never positive
    measured = MEASURED.get((round(freeze_rate, 4), compression))
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
        # every Linear trains, so every Linear input is stored compressed: a setting
        # the study's freezing runs do not contain
        note = (f"inferred: compression's own price with freezing ({COMPRESSION.runs} paired "
                "run(s)); compression alone not trained in the study yet")
    if compression and comp is None:
        note += "; compression's own price not measured yet (gradient cosine >= 0.99)"
    return gap, note


# -- short budgets --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BudgetRun:
    """One run of the defaults (r = 0.9 + compression) at some training
    budget, paired with full fine-tuning at the same budget and seed (``gap``
    in points)."""

    task: str
    arm: str     # "slimfit" (3 epochs), "slimfit-1ep", "slimfit-0.2ep"
    seed: int
    steps: int   # optimizer steps of the run
    gap: float

    @property
    def updates(self) -> float:
        """How many times each candidate unit trained, on average."""
        return _updates(self.steps, *STUDY_TRAINED)


def _updates(steps: float, trained: int, units: int) -> float:
    """Average times each of ``units`` candidate units trains in ``steps``
    steps that train ``trained`` of them each."""
    return steps * trained / units


#: Units trained per step in the study: MiniLM at r = 0.9 trains 6 of its 53 candidate units.
STUDY_TRAINED: tuple[int, int] = (6, 53)

#: Every run of the defaults in the study, at 3 epochs (``slimfit``) and at the ``short``
#: group's budgets: what a run loses when each unit trains only a few times.
BUDGET_RUNS: tuple[BudgetRun, ...] = (
    BudgetRun("bbc", "slimfit", 0, 159, +0.00),
    BudgetRun("bbc", "slimfit", 1, 159, +0.00),
    BudgetRun("bbc", "slimfit", 2, 159, +0.40),
    BudgetRun("bbc", "slimfit-0.2ep", 0, 10, -18.40),
    BudgetRun("bbc", "slimfit-1ep", 0, 53, -0.20),
    BudgetRun("movie", "slimfit", 0, 801, -0.60),
    BudgetRun("movie", "slimfit", 1, 801, -0.60),
    BudgetRun("movie", "slimfit", 2, 801, -0.70),
    BudgetRun("movie", "slimfit-0.2ep", 0, 53, -5.10),
    BudgetRun("movie", "slimfit-1ep", 0, 267, -1.80),
    BudgetRun("sms", "slimfit", 0, 357, +0.40),
    BudgetRun("sms", "slimfit", 1, 357, +0.40),
    BudgetRun("sms", "slimfit", 2, 357, +0.10),
    BudgetRun("sms", "slimfit-0.2ep", 0, 23, -2.80),
    BudgetRun("sms", "slimfit-1ep", 0, 119, -0.30),
    BudgetRun("trec", "slimfit", 0, 456, +0.00),
    BudgetRun("trec", "slimfit", 1, 456, -0.80),
    BudgetRun("trec", "slimfit", 2, 456, -0.60),
)


def _short_threshold(runs: tuple[BudgetRun, ...],
                     tolerance: float) -> tuple[BudgetRun, float] | None:
    """The run with the most updates per unit that still lost more than
    ``tolerance`` points, and the fewest updates measured above it (every run
    from there on within the tolerance); None if no run lost that much or none
    was measured above it (no count known to be enough)."""
    lost = [r for r in runs if r.gap < -tolerance]
    if not lost:
        return None
    worst = max(lost, key=lambda r: r.updates)
    above = [r.updates for r in runs if r.updates > worst.updates]
    return (worst, min(above)) if above else None


def short_budget_note(steps: float, trained: int, units: int,
                      tolerance: float = 1.0) -> str | None:
    """A warning when a run of ``steps`` optimizer steps, training ``trained``
    of its ``units`` candidate units per step, trains each unit fewer times
    than the fidelity study needed to stay within ``tolerance`` points of full
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
    found = _short_threshold(BUDGET_RUNS, tolerance)
    if found is None:
        return None
    worst, safe = found
    updates = _updates(steps, trained, units)
    if updates >= safe:
        return None
    need_steps = math.ceil(safe * units / trained)
    need_trained = math.ceil(safe * units / steps)  # units per step that reach it in these steps
    if need_trained < units:
        rate = math.floor(100 * (units - need_trained) / units) / 100  # floor(r*t) <= t - need
        lower = f"freeze_rate <= {rate:.2f} (trains {need_trained}+ units per step)"
    else:
        lower = "compression alone (freeze_rate=0.0): no unit is frozen"
    return (f"SlimFit trains each of its {units} candidate units about {updates:.1f} times in "
            f"this run ({steps:.0f} steps, {trained} units per step). The fidelity study lost "
            f"{-worst.gap:.2f} points to full fine-tuning at {worst.updates:.1f} updates per unit "
            f"({worst.task}, {worst.arm}, seed {worst.seed}); every run from {safe:.1f} on stayed "
            f"within {tolerance:g} point. For the accuracy of full fine-tuning: train >= "
            f"{need_steps} steps, or {lower}.")
