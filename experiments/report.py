"""Collect finished runs (``results.json`` under a folder) into the results
table and plots.

    python -m slimfit.experiments.report runs/sweeps/20261126-120000 --out reports/freeze_sweep

Rows group runs by task, model and method as run (the ``method`` group's
transform and optimizer with SlimFit's freezing rate and compression:
``results.json``'s ``method_label``; runs written before the method group
are labelled from their freezing rate and compression); they show the
``method=`` name, validation accuracy (mean, standard deviation, number of seeds), the
ledger's memory breakdown (mean over seeds), step time, and ratios against
the full fine-tuning row of the same task and model (SlimFit at rate 0 trains
every tensor every step, so it serves as the baseline when no ``full`` run
exists). Writes ``results.md``, ``accuracy_vs_memory.png`` and
``memory_breakdown.png``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
from typing import Any

from slimfit.memory.report import CATEGORIES


def load_runs(root: str | pathlib.Path) -> list[dict[str, Any]]:
    root = pathlib.Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such folder {str(root)!r}: pass the folder holding the runs "
                                "(e.g. runs/ or runs/sweeps/<date>).")
    runs = []
    for p in sorted(root.rglob("results.json")):
        r = json.loads(p.read_text())
        r["_path"] = str(p.parent)
        runs.append(r)
    if not runs:
        raise FileNotFoundError(f"no results.json under {str(root)!r}; run experiments first.")
    return runs


FULL = "full fine-tuning"


def _label(r: dict) -> str:
    # eager attention is a secondary row: the baseline users run is the model as
    # loaded (SDPA / fused attention)
    eager = ", eager attention" if r.get("attention") == "eager" else ""
    if r.get("method_label"):
        return r["method_label"] + eager
    if r["method"] == "full":  # a run from before the method group
        return FULL + eager
    return f"SlimFit r={r['freeze_rate']:g}" + (" + compression" if r["compression"] else "") + eager


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["model"], _label(r)), []).append(r)
    rows = []

    def order(kv):  # per task and model: full fine-tuning first, then by freezing rate, label
        (task, model, label), rs = kv
        return task, model, label != FULL, rs[0]["freeze_rate"], label

    for (task, model, label), rs in sorted(groups.items(), key=order):
        rate = rs[0]["freeze_rate"]
        accs = [x["val_acc"] for x in rs if x["val_acc"] is not None]
        times = [x["step_time_s"] for x in rs if x.get("step_time_s")]
        mems = [x["memory"] for x in rs if x.get("memory")]
        mem = {c: statistics.mean(m[c] for m in mems) for c in (*CATEGORIES, "total")} if mems else None
        rows.append({"task": task, "model": model, "label": label, "rate": rate,
                     "name": " ".join(sorted({str(x["method"]) for x in rs})),
                     "full": label == FULL, "n": len(rs),
                     "acc_mean": statistics.mean(accs) if accs else None,
                     "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "step_time": statistics.mean(times) if times else None, "memory": mem,
                     "steps": rs[0]["steps"], "batch": rs[0]["batch_size"],
                     "seeds": sorted(x["seed"] for x in rs), "heatmap": rs[0].get("heatmap")})
    for row in rows:  # baseline: full fine-tuning, else rate 0, of the same task and model
        same = [o for o in rows if (o["task"], o["model"]) == (row["task"], row["model"])]
        base = next((o for o in same if o["full"]), None) or next(
            (o for o in same if o["rate"] == 0.0 and not o["label"].endswith("compression")), None)
        row["base"] = base
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    lines = ["| task | model | method | name | seeds | val acc % (mean ± std) | params MiB | "
             "grads MiB | optimizer MiB | activations MiB | total MiB | total vs full | step s | "
             "time vs full |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m, b = r["memory"], r["base"]
        acc = f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}" if r["acc_mean"] is not None else "-"
        cells = [mib(m[c]) for c in (*CATEGORIES, "total")] if m else ["-"] * 5
        ratio = (f"{b['memory']['total'] / m['total']:.2f}x smaller" if m and b and b["memory"]
                 and b is not r else "1.00x" if b is r else "-")
        t = f"{r['step_time']:.2f}" if r["step_time"] else "-"
        tr = (f"{r['step_time'] / b['step_time']:.2f}" if r["step_time"] and b and b["step_time"]
              else "-")
        lines.append(f"| {r['task']} | {r['model']} | {r['label']} | {r['name']} | {r['n']} | {acc} | "
                     + " | ".join(cells) + f" | {ratio} | {t} | {tr} |")
    return "\n".join(lines)


def plots(rows: list[dict[str, Any]], out: pathlib.Path) -> list[pathlib.Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with_mem = [r for r in rows if r["memory"]]
    paths = []
    fig = Figure(figsize=(7, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in with_mem:
        if r["acc_mean"] is None:
            continue
        ax.errorbar(r["memory"]["total"] / 2**20, 100 * r["acc_mean"], yerr=100 * r["acc_std"],
                    fmt="o", capsize=3, label=f"{r['task']}: {r['label']}")
    ax.set_xlabel("total training memory (ledger, MiB)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("accuracy vs memory")
    ax.legend(fontsize="small")
    paths.append(out / "accuracy_vs_memory.png")
    fig.savefig(paths[-1], dpi=110)

    fig = Figure(figsize=(9, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    names = [f"{r['task']}\n{r['label']}" for r in with_mem]
    bottom = [0.0] * len(with_mem)
    for c in CATEGORIES:
        vals = [r["memory"][c] / 2**20 for r in with_mem]
        ax.bar(names, vals, bottom=bottom, label=c.replace("_", " "))
        bottom = [x + v for x, v in zip(bottom, vals)]
    ax.set_ylabel("MiB")
    ax.set_title("training memory breakdown")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend()
    paths.append(out / "memory_breakdown.png")
    fig.savefig(paths[-1], dpi=110)
    return paths


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="folder holding finished runs (searched recursively)")
    ap.add_argument("--out", default=None, help="where results.md and plots go (default: runs folder)")
    args = ap.parse_args(argv)
    rows = summarize(load_runs(args.runs))
    out = pathlib.Path(args.out or args.runs)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    r0 = rows[0]
    head = (f"Runs under `{args.runs}`: {r0['steps']} optimizer steps, batch {r0['batch']}, "
            f"seeds {sorted({s for r in rows for s in r['seeds']})}; memory = ledger of one "
            "measured step (MemoryMonitor), step time = median (StepTimer).\n\n")
    (out / "results.md").write_text(head + table + "\n")
    files = plots(rows, out)
    heat = [r["heatmap"] for r in rows if r.get("heatmap")]
    print(head + table)
    print(f"\nwrote {out / 'results.md'}, " + ", ".join(str(p) for p in files)
          + (f"; a freezing heatmap: {heat[0]}" if heat else ""))
    return table


if __name__ == "__main__":
    main()
