"""The policy study's report (issue 27): which layers train, SlimFit's scores
against LISA and BAdam (and LoRA and full fine-tuning), on the three tasks
that are not saturated, from the recorded runs.

How it reads the runs, and why:
- Every choice (which arm is the default, which K) is made on the validation
  split; the test split (never used for a choice) is what the gaps report.
- A gap is paired: the arm minus full fine-tuning at the same task and seed.
- Each family (the score policy, LISA, BAdam, LoRA: the arm name up to its
  first ``-`` or ``@``) has one chosen arm: of its arms that ran on every
  task with the frozen units' optimizer state kept, the one with the best
  mean validation gap over the seeds all of them share on each task (a
  sweep ran at seed 0, so that is where a K or an lr is compared); its test
  gap, over all its seeds, is what the family reports. A ``-release`` arm is
  the state option's question: it is compared with its kept twin on their
  shared seeds, in a table of its own.
- The interval has tasks as its units, not runs: per task the mean paired gap
  over its seeds, then the mean over tasks with a 95% Student-t interval on
  (tasks - 1) degrees of freedom. Seeds of one task are not independent
  evidence about another task; with three tasks the interval is wide, and it
  says so. An arm that has not run on at least two tasks gets no interval.
"""

from __future__ import annotations

import pathlib
import statistics

from slimfit.experiments.fidelity.arms import POLICY_TASKS

__all__ = ["T95", "arm_summary", "choices", "family", "paired_gaps", "plot", "report",
           "state_effect", "task_table"]

#: two-sided 95% Student-t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228}


def _policy_runs(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r["task"] in POLICY_TASKS and r.get("test_acc") is not None]


def paired_gaps(runs: list[dict], arm: str, split: str = "test",
                seeds: dict[str, set[int]] | None = None) -> dict[str, list[float]]:
    """Per task, the gaps (points) of ``arm`` minus ``full`` at each seed both
    ran (only the task's ``seeds`` when given)."""
    acc = {(r["task"], r["arm"], r["seed"]): r[f"{split}_acc"] for r in _policy_runs(runs)}
    out: dict[str, list[float]] = {}
    for (task, a, seed), v in sorted(acc.items()):
        if a == arm and (task, "full", seed) in acc and (seeds is None
                                                         or seed in seeds.get(task, ())):
            out.setdefault(task, []).append(100 * (v - acc[(task, "full", seed)]))
    return out


def family(arm: str) -> str:
    """The method an arm is a setting of: ``lisa`` for ``lisa-lrx-k5``, ``lora``
    for ``lora@lr2e-3``, ``slimfit`` for ``slimfit-release``."""
    return arm.split("@")[0].split("-")[0]


def choices(runs: list[dict]) -> dict[str, dict]:
    """Per family (:func:`family`), the arm validation chooses: of the family's
    arms with paired runs on every task, the best mean over tasks of the
    validation gap on the seeds every such arm shares on that task. Returns
    family -> {"arm", "candidates", "val" (the chosen arm's gap on the shared
    seeds), "test" (:func:`arm_summary` on the test split, all its seeds)}."""
    out: dict[str, dict] = {}
    for fam in sorted({family(a) for a in _arms(runs)}):
        cands = [a for a in _arms(runs) if family(a) == fam and not a.endswith("-release")
                 and set(paired_gaps(runs, a)) == set(POLICY_TASKS)]
        if not cands:
            continue
        seeds = {t: set.intersection(*({r["seed"] for r in _policy_runs(runs)
                                        if r["task"] == t and r["arm"] == a} for a in cands))
                 for t in POLICY_TASKS}
        val = {}
        for a in cands:
            gaps = paired_gaps(runs, a, "val", seeds)
            if set(gaps) == set(POLICY_TASKS):  # a shared paired seed on every task
                val[a] = statistics.mean(statistics.mean(g) for g in gaps.values())
        if val:
            best = max(val, key=lambda a: (val[a], -len(a)))  # ties: the plainer name
            out[fam] = {"arm": best, "candidates": sorted(val), "val": val[best],
                        "test": arm_summary(runs, best, "test")}
    return out


def _over_tasks(gaps: dict[str, list[float]]) -> dict:
    """Per-task gaps (points, one per seed) to the mean over tasks of their
    per-task means, with its 95% Student-t interval (tasks as units; ``None``
    below two tasks)."""
    per_task = {t: statistics.mean(g) for t, g in gaps.items()}
    vals = list(per_task.values())
    half = (T95.get(len(vals) - 1, 1.96) * statistics.stdev(vals) / len(vals) ** 0.5
            if len(vals) > 1 else None)
    return {"tasks": per_task, "seeds": {t: len(g) for t, g in gaps.items()},
            "mean": statistics.mean(vals) if vals else None, "half_width": half}


def _interval(summary: dict, alone: str = "") -> str:
    """`` [lo, hi]`` of a summary's interval, or ``alone`` when it has none."""
    m, h = summary["mean"], summary["half_width"]
    return f" [{m - h:+.2f}, {m + h:+.2f}]" if h is not None else alone


def arm_summary(runs: list[dict], arm: str, split: str = "test") -> dict:
    """Mean over tasks of the per-task mean paired gap, with its 95% interval
    (tasks as units; ``None`` below two tasks)."""
    return {"arm": arm, **_over_tasks(paired_gaps(runs, arm, split))}


def state_effect(runs: list[dict], arm: str, split: str = "test") -> dict:
    """``arm`` (a ``-release`` arm) minus its twin with the state kept, paired on
    task and seed, as :func:`arm_summary` gives it (tasks as units), plus both
    arms' mean ledger memory over those runs."""
    kept = arm.removesuffix("-release")
    rows = {(r["task"], r["arm"], r["seed"]): r for r in _policy_runs(runs)}
    gaps: dict[str, list[float]] = {}
    mem: dict[str, list[float]] = {arm: [], kept: []}
    for (task, a, seed), r in sorted(rows.items()):
        twin = rows.get((task, kept, seed))
        if a == arm and twin is not None:
            gaps.setdefault(task, []).append(100 * (r[f"{split}_acc"] - twin[f"{split}_acc"]))
            mem[arm].append(r["memory_total"])
            mem[kept].append(twin["memory_total"])
    return {"arm": arm, "kept": kept, **_over_tasks(gaps),
            "memory": {a: statistics.mean(m) if m else None for a, m in mem.items()}}


def _arms(runs: list[dict]) -> list[str]:
    arms = {r["arm"] for r in _policy_runs(runs)} - {"full"}
    return sorted(arms, key=lambda a: (a.split("-")[0] not in ("slimfit", "lisa", "badam"), a))


def task_table(runs: list[dict]) -> str:
    """Per task and arm: seeds, validation and test accuracy (mean), the paired
    test gap to full fine-tuning, and ledger memory."""
    rows = _policy_runs(runs)
    lines = ["| task | arm | seeds | val acc % | test acc % | test gap vs full (points) | "
             "memory (MiB) |", "|---|---|---:|---:|---:|---:|---:|"]
    for task in POLICY_TASKS:
        for arm in ["full"] + _arms(runs):
            rs = [r for r in rows if r["task"] == task and r["arm"] == arm]
            if not rs:
                continue
            gaps = paired_gaps(runs, arm).get(task, [])
            gap = "" if arm == "full" else (f"{statistics.mean(gaps):+.2f}" if gaps else "n/a")
            mem = statistics.mean(r["memory_total"] for r in rs) / 2**20
            lines.append(f"| {task} | {arm} | {len(rs)} | "
                         f"{100 * statistics.mean(r['val_acc'] for r in rs):.2f} | "
                         f"{100 * statistics.mean(r['test_acc'] for r in rs):.2f} | {gap} | "
                         f"{mem:.0f} |")
    return "\n".join(lines)


def report(runs: list[dict]) -> str:
    """The per-task table, then every arm's mean paired gap over tasks on the
    validation split (where choices are made) and on the test split."""
    if not _policy_runs(runs):
        return ""
    lines = [task_table(runs), "",
             "| arm | tasks (seeds) | val gap, mean over tasks | test gap, mean over tasks "
             "[95% interval, tasks as units] |", "|---|---|---:|---:|"]
    for arm in _arms(runs):
        v, t = arm_summary(runs, arm, "val"), arm_summary(runs, arm, "test")
        if t["mean"] is None:
            continue
        ci = _interval(t, " (one task: no interval)")
        tasks = ", ".join(f"{k} ({n})" for k, n in t["seeds"].items())
        lines.append(f"| {arm} | {tasks} | {v['mean']:+.2f} | {t['mean']:+.2f}{ci} |")
    chosen = choices(runs)
    if chosen:
        lines += ["", "| family | chosen on validation (of) | val gap, shared seeds | "
                      "test gap, all its seeds [95% interval] |", "|---|---|---:|---:|"]
        for fam, c in chosen.items():
            t = c["test"]
            ci = _interval(t)
            lines.append(f"| {fam} | {c['arm']} ({', '.join(c['candidates'])}) | "
                         f"{c['val']:+.2f} | {t['mean']:+.2f}{ci} |")
    released = [a for a in _arms(runs) if a.endswith("-release")]
    effects = [(state_effect(runs, a, "val"), state_effect(runs, a)) for a in released]
    effects = [(v, t) for v, t in effects if t["mean"] is not None]
    if effects:
        lines += ["", "| released minus kept | tasks (seeds) | val | test [95% interval] | "
                      "memory (MiB), released / kept |", "|---|---|---:|---:|---:|"]
        for v, t in effects:
            ci = _interval(t)
            tasks = ", ".join(f"{k} ({n})" for k, n in t["seeds"].items())
            m = t["memory"]
            lines.append(f"| {t['arm']} - {t['kept']} | {tasks} | {v['mean']:+.2f} | "
                         f"{t['mean']:+.2f}{ci} | {m[t['arm']] / 2**20:.0f} / "
                         f"{m[t['kept']] / 2**20:.0f} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: str) -> pathlib.Path:
    """Test accuracy against ledger memory, one panel per task, every arm (mean
    over its seeds): the memory/accuracy frontier of the policy study."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = _policy_runs(runs)
    arms = ["full"] + _arms(runs)
    colors = plt.get_cmap("tab20").colors
    fig, axes = plt.subplots(1, len(POLICY_TASKS), figsize=(14, 4.2))
    for ax, task in zip(axes, POLICY_TASKS):
        for i, arm in enumerate(arms):
            rs = [r for r in rows if r["task"] == task and r["arm"] == arm]
            if not rs:
                continue
            ax.scatter(statistics.mean(r["memory_total"] for r in rs) / 2**20,
                       100 * statistics.mean(r["test_acc"] for r in rs),
                       marker="s" if arm == "full" else "o^vDP<>"[i % 7],
                       color=colors[i % 20], label=f"{arm} (n={len(rs)})")
        ax.set_title(task)
        ax.set_xlabel("training memory on the ledger (MiB)")
    axes[0].set_ylabel("test accuracy (%)")
    legend = {}  # by arm, from whichever panel drew it
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab.split(" (n=")[0], h)
    fig.legend(list(legend.values()), list(legend), fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
