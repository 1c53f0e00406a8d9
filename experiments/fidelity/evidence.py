"""The study's figures the library uses (:mod:`slimfit.evidence`), computed
from the recorded runs and written to ``experiments/results/evidence.json``
(``python -m slimfit.experiments.fidelity --evidence``; a test regenerates it
and compares, so the file cannot drift from the runs).

Which arm prices which setting is study design, kept here: each price is the
mean paired gap of one arm (over every task it ran), at the defaults of that
setting where such runs exist; r = 0.9 without compression was measured only
before the reserved slots became the default (``@topk``).
"""

from __future__ import annotations

import json
import pathlib
import statistics

from slimfit.evidence import BudgetRun, Evidence, Price, updates_per_unit
from slimfit.experiments.fidelity.arms import POLICY_TASKS, reference
from slimfit.experiments.fidelity.runner import RESULTS

__all__ = ["BUDGET_ARMS", "COMPRESSION_PAIR", "EVIDENCE", "PRICE_ARMS", "STUDY_TRAINED",
           "build", "write"]

#: the file the library reads
EVIDENCE = RESULTS.parent / "evidence.json"

#: (freeze_rate, compression) -> the arm whose paired runs price it
PRICE_ARMS: dict[tuple[float, bool], str] = {
    (0.0, True): "compress-only",
    (0.5, True): "slimfit-r0.5",
    (0.8, True): "slimfit-r0.8",
    (0.9, True): "slimfit",
    (0.95, True): "slimfit-r0.95",
    (0.9, False): "slimfit-nocompress@topk",
}
#: compression's own price: this arm against that one, same task, seed and rate
COMPRESSION_PAIR = ("slimfit-topk", "slimfit-nocompress@topk")
#: the runs of the defaults at every training length the study ran
BUDGET_ARMS = ("slimfit", "slimfit-0.2ep", "slimfit-1ep")
#: units trained per step in the study: MiniLM at r = 0.9 trains 6 of its 53 candidate units
STUDY_TRAINED: tuple[int, int] = (6, 53)


def _pairs(runs: list[dict], arm: str, against: str) -> tuple[list[float], set[str]]:
    """Paired gaps (points) of ``arm`` against ``against``, and the tasks they span."""
    acc = {(r["task"], r["arm"], r["seed"]): r["val_acc"] for r in runs}
    keys = sorted(k for k in acc if k[1] == arm and (k[0], against, k[2]) in acc)
    return [100 * (acc[k] - acc[(k[0], against, k[2])]) for k in keys], {k[0] for k in keys}


def _price(runs: list[dict], arm: str, against: str = "full") -> Price | None:
    gaps, tasks = _pairs(runs, arm, against)
    if not gaps:
        return None
    task = tasks.pop() if len(tasks) == 1 else "all"
    return Price(round(statistics.mean(gaps), 2) + 0.0, len(gaps), arm, task, against)


def build(runs: list[dict]) -> Evidence:
    """The :class:`slimfit.evidence.Evidence` of ``runs`` (the first study's tasks:
    the policy study's report their test split, ``report.policy_table``)."""
    runs = [r for r in runs if r["task"] not in POLICY_TASKS]
    prices = {key: p for key, arm in PRICE_ARMS.items() if (p := _price(runs, arm)) is not None}
    by_id = {(r["task"], r["arm"], r["seed"]): r for r in runs}
    budget = []
    for (task, arm, seed), r in sorted(by_id.items()):
        ref = by_id.get((task, reference(arm), seed))
        if arm in BUDGET_ARMS and ref is not None:
            budget.append(BudgetRun(task, arm, seed, round(updates_per_unit(r["steps"], *STUDY_TRAINED), 4),
                                    round(100 * (r["val_acc"] - ref["val_acc"]), 2) + 0.0))
    return Evidence(prices=prices, compression=_price(runs, *COMPRESSION_PAIR),
                    budget_runs=tuple(budget),
                    source="fidelity study, experiments/results/fidelity.jsonl")


def write(runs: list[dict], path: pathlib.Path = EVIDENCE) -> pathlib.Path:
    path.write_text(json.dumps(build(runs).to_dict(), indent=1) + "\n")
    return path
