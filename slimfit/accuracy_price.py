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

__all__ = ["Price", "MEASURED", "expected_price"]


@dataclasses.dataclass(frozen=True)
class Price:
    """Mean paired gap (accuracy points, negative = worse than full fine-tuning)."""

    gap: float
    runs: int          # paired runs behind the mean
    arm: str           # the study arm it comes from
    task: str


#: (freeze_rate, compression) -> measured price at the defaults of that arm.
#: Full fine-tuning (rate 0, no compression) is the reference: price 0.
MEASURED: dict[tuple[float, bool], Price] = {
    (0.9, True): Price(gap=-1.40, runs=1, arm="slimfit-lrscale1", task="movie"),
}


def expected_price(freeze_rate: float, compression: bool) -> tuple[float, str]:
    """Expected accuracy price (points) of freezing at ``freeze_rate`` with or
    without compression, and a note on where the figure comes from.

    Between measured rates the price is interpolated linearly from full
    fine-tuning (0 at rate 0); a price measured only with compression stands
    in for the setting without it (compression costs at most that), and
    beyond the highest measured rate the last measured slope is extended, so
    the figure errs on the side of a larger price. Prices never fall as the
    rate grows (a lower measured price at a higher rate is seed noise).
    """
    pts = sorted((r, p.gap) for (r, c), p in MEASURED.items() if c == compression)
    if not pts and MEASURED:  # e.g. only compressed runs: their price bounds the other
        pts = sorted((r, p.gap) for (r, _c), p in MEASURED.items())
    pts = [(0.0, 0.0)] + [pt for pt in pts if pt[0] > 0]
    for i in range(1, len(pts)):  # more freezing never priced cheaper (seed noise aside)
        pts[i] = (pts[i][0], min(pts[i][1], pts[i - 1][1]))
    rates = [r for r, _ in pts]
    i = bisect.bisect_right(rates, freeze_rate)
    if i >= len(pts):  # beyond the last measured rate: extend the last slope
        (r0, g0), (r1, g1) = pts[-2] if len(pts) > 1 else pts[-1], pts[-1]
        slope = (g1 - g0) / (r1 - r0) if r1 > r0 else 0.0
        gap = g1 + slope * (freeze_rate - r1)
    else:
        (r0, g0), (r1, g1) = pts[i - 1], pts[i]
        gap = g0 + (g1 - g0) * (freeze_rate - r0) / (r1 - r0)
    measured = MEASURED.get((round(freeze_rate, 4), compression))
    if measured is not None:
        note = f"measured: {measured.task}, {measured.runs} paired run(s)"
    else:
        note = "interpolated from the fidelity study" if freeze_rate > 0 else "exact"
    return (0.0 if freeze_rate == 0 and not compression else gap), note
