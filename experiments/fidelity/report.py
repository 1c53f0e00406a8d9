"""The fidelity study's tables and plot, from its recorded runs: paired gaps
per task and arm, the learning-rate sweep, and the accuracy-vs-memory
frontier. Each function takes the runs (``runner.load()``), so a table can be
checked on hand-made runs.
"""

from __future__ import annotations

import pathlib
import statistics

from slimfit.experiments.fidelity.arms import ARMS, TASKS, lr_name, reference, setting

__all__ = ["frontier_runs", "lr_sweep", "plot", "report", "summary"]


def summary(vals: list[float], sign: str = "") -> str:
    """``mean ± std (n=k)`` of ``vals`` to 2 decimals (``sign="+"``: signed, as
    gaps are written); empty for no values."""
    if not vals:
        return ""
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    mean = round(statistics.mean(vals), 2) + 0.0  # + 0.0: no "-0.00"
    return f"{mean:{sign}.2f} ± {sd:.2f} (n={len(vals)})"


def report(runs: list[dict]) -> str:
    """Per-task paired gaps (arm minus full fine-tuning at the same seed and
    training setting: :func:`reference`), mean ± std."""
    done = runs
    lines = ["| task | arm | seeds | accuracy % (mean ± std) | paired gap vs full (points) |",
             "|---|---|---:|---:|---:|"]
    keyed = {(r["task"], r["arm"], r["seed"]): r["val_acc"] for r in done}
    for task in TASKS:
        for arm in sorted({r["arm"] for r in done if r["task"] == task},
                          key=lambda a: (a != "full", reference(a), a != reference(a), a)):
            ref = reference(arm)
            accs = {s: keyed[(task, arm, s)] for (t, a, s) in keyed if t == task and a == arm}
            gaps = [100 * (accs[s] - keyed[(task, ref, s)]) for s in accs
                    if (task, ref, s) in keyed]
            acc = [100 * v for v in accs.values()]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            gap = "" if arm == ref else summary(gaps, "+")
            lines.append(f"| {task} | {arm} | {len(acc)} | {statistics.mean(acc):.2f} ± {sd:.2f} | {gap} |")
    return "\n".join(lines)


def _default_lr(task: str, arm: str = "full") -> float:
    """The peak learning rate ``arm`` composes to on ``task`` without ``@lr``
    (composed, so an experiment or a method that sets its own counts: LoRA's
    method file sets 1e-3)."""
    from hydra import compose, initialize_config_dir
    from slimfit.experiments.train import CONFIG_DIR
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={TASKS[task]}", "output_dir=/tmp/unused",
                                          *ARMS[arm].overrides])
    return float(cfg.task.lr)


def lr_sweep(runs: list[dict], task: str = "movie") -> str:
    """The learning-rate sweep as a table: each family (``full``, ``slimfit``,
    ...) at each peak lr it ran at (its plain arm at its own default: the
    task's, or what its method sets, LoRA's 1e-3), the
    paired gap to full fine-tuning at the same lr and seed, and each family at
    its own best lr, so that no arm is judged at a rate that handicaps it.
    Empty when no ``@lr`` arm of ``task`` has run."""
    # (family, its study lr or None for its own, run): an arm at another peak lr of a family
    # (Arm.family), or a plain arm (no study lr) as its own family at its own lr
    arms = {r["arm"]: ARMS[r["arm"]] for r in runs if r["task"] == task}
    runs = [(a.family, a.lr, r) if a.family is not None else (r["arm"], None, r)
            for r in runs if r["task"] == task for a in [arms[r["arm"]]]
            if a.family is not None or a.lr is None]
    swept = {fam for fam, lr, _ in runs if lr is not None}
    if not swept:
        return ""
    # each family's plain arm ran at its own default (the task's; LoRA's method sets its own)
    defaults = {fam: _default_lr(task, fam) for fam in swept | {"full"}}
    acc: dict[tuple[str, float], dict[int, float]] = {}  # (family, lr) -> seed -> accuracy %
    for fam, lr, r in runs:
        if fam in defaults:
            acc.setdefault((fam, lr if lr is not None else defaults[fam]), {})[r["seed"]] = \
                100 * r["val_acc"]
    families = sorted({fam for fam, _ in acc}, key=lambda f: (f != "full", f))
    others = [f for f in families if f != "full"]
    lrs = sorted({lr for _, lr in acc})

    name = lr_name
    def gap(a: dict[int, float], b: dict[int, float]) -> str:
        return summary([a[s] - b[s] for s in sorted(a) if s in b], "+")

    # a same-lr gap column only for a family that shares an lr and a seed with full fine-tuning
    # (LoRA's lrs are above full fine-tuning's: its column would be empty)
    paired = [f for f in others if any(gap(acc.get((f, lr), {}), acc.get(("full", lr), {}))
                                       for lr in lrs)]
    head = ["peak lr", *families, *(f"{f} - full (same lr, paired)" for f in paired)]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for lr in lrs:
        own = [f for f in families if defaults[f] == lr and defaults[f] != defaults["full"]]
        row = [name(lr) + (" (default)" if lr == defaults["full"] else
                           f" ({', '.join(own)} default)" if own else "")]
        row += [summary(list(acc.get((f, lr), {}).values())) for f in families]
        row += [gap(acc.get((f, lr), {}), acc.get(("full", lr), {})) for f in paired]
        lines.append("| " + " | ".join(row) + " |")
    best = {}
    for f in families:  # ranked on the seeds every lr of f ran (if any): equal footing
        ran = [lr for lr in lrs if (f, lr) in acc]
        common = set.intersection(*(set(acc[(f, lr)]) for lr in ran))
        best[f] = max(ran, key=lambda lr: statistics.mean(
            v for s, v in acc[(f, lr)].items() if s in common or not common))
    at_best = [f"{f} {statistics.mean(acc[(f, best[f])].values()):.2f} at {name(best[f])}"
               for f in families]
    at_best += [f"{f} - full, each at its best, paired: "
                + (gap(acc[(f, best[f])], acc.get(("full", best.get("full")), {})) or "no shared seed")
                for f in others]
    lines += ["", "Each at its best lr (highest mean on the seeds all its lrs ran): " + "; ".join(at_best)]
    return "\n".join(lines)


def frontier_runs(runs: list[dict], task: str) -> list[dict]:
    """The runs of ``task`` the frontier plot draws: those with a memory figure, at the
    default training setting (:func:`setting`); a budget, schedule or lr of its own is
    another frontier (the lr table has the sweep)."""
    return [r for r in runs if r["task"] == task and r.get("memory_total")
            and setting(r["arm"]) == ""]


def plot(runs: list[dict], path: str, task: str = "movie") -> pathlib.Path:
    """Accuracy against ledger memory, one point per arm of ``task`` at the default setting
    (mean over seeds, error bar: std), full fine-tuning marked: the study's frontier."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = frontier_runs(runs, task)
    arms = sorted({r["arm"] for r in rows}, key=lambda a: (a != "full", a))
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    tab20 = plt.get_cmap("tab20").colors  # dark hues first, then their light pairs
    colors = tab20[::2] + tab20[1::2]      # 20 colours x 5 markers: no two arms look alike
    for i, arm in enumerate(arms):
        rs = [r for r in rows if r["arm"] == arm]
        acc = [100 * r["val_acc"] for r in rs]
        mem = statistics.mean(r["memory_total"] for r in rs) / 2**20
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        ax.errorbar(mem, statistics.mean(acc), yerr=sd, capsize=3, label=f"{arm} (n={len(acc)})",
                    fmt="s" if arm == "full" else "o^vDP"[i % 5], color=colors[i % 20])
    ax.set_xlabel("training memory on the ledger (MiB)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"Fidelity study, {task}: 3 epochs, MiniLM")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside: no point hidden
    fig.tight_layout()
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
