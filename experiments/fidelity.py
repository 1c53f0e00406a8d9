"""The fidelity study (issue 12), run one training at a time and resumable.

Each arm is a set of Hydra overrides of ``slimfit.experiments.train``; each
run is a subprocess (one training at a time: two on a 2-core machine slow
both 5-8x), and a finished run appends one line to
``experiments/results/fidelity.jsonl`` (committed, so the study goes on across
sessions: runs already in that file are skipped).

    python -m slimfit.experiments.fidelity --list                # what would run
    python -m slimfit.experiments.fidelity --groups core         # core comparison
    OMP_NUM_THREADS=1 nohup python -m slimfit.experiments.fidelity --groups core &
    python -m slimfit.experiments.fidelity --report              # paired gaps, table

Groups: ``core`` (full fine-tuning vs SlimFit r=0.9 + compression, three
tasks x seeds 0-2), ``lr`` (peak learning rates of both arms on the movie
task), ``ablation`` (head, score, staleness, schedule, selection on the movie
task), ``rate`` (r in 0.5/0.8/0.95), ``short`` (0.2 and 1 epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

# The study may run from a frozen copy of the code (so that editing the working
# tree does not change runs in flight): these two point back at the checkout.
RESULTS = pathlib.Path(os.environ.get("FIDELITY_RESULTS", pathlib.Path(__file__).resolve().parent
                                      / "results" / "fidelity.jsonl"))
RUNS = pathlib.Path(os.environ.get("FIDELITY_RUNS", "runs/fidelity"))
TASKS = {"movie": "fidelity_movie", "sms": "fidelity_sms", "bbc": "fidelity_bbc"}
SEEDS = (0, 1, 2)

#: arm name -> overrides shared by every task of that arm
ARMS: dict[str, list[str]] = {
    "full": ["slimfit=full"],
    "slimfit": ["slimfit=r090_compress"],
}


def _runs(groups: list[str]) -> list[tuple[str, str, str, int, list[str]]]:
    """(run id, task, arm, seed, overrides), in the order they should run:
    seed-major so paired comparisons complete early."""
    out = []
    if "core" in groups:
        for seed in SEEDS:
            for task in TASKS:
                for arm in ("full", "slimfit"):
                    out.append((task, arm, seed, ARMS[arm]))
    if "lr" in groups:
        for seed in (0, 1):
            for arm in ("full", "slimfit"):
                for lr in ("5e-5", "2e-4", "3e-4"):
                    out.append(("movie", f"{arm}@lr{lr}", seed, ARMS[arm] + [f"task.lr={lr}"]))
    return [(f"{t}/{a}/seed{s}", t, a, s, o) for t, a, s, o in out]


def _done() -> dict[str, dict]:
    if not RESULTS.exists():
        return {}
    return {r["id"]: r for r in map(json.loads, RESULTS.read_text().splitlines()) if r}


def run_one(run_id: str, task: str, arm: str, seed: int, overrides: list[str]) -> dict:
    out = RUNS / run_id
    cmd = [sys.executable, "-m", "slimfit.experiments.train", f"experiment={TASKS[task]}",
           f"seed={seed}", *overrides, f"hydra.run.dir={out}", "logger=none",
           "trainer.enable_progress_bar=false"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (out).mkdir(parents=True, exist_ok=True)
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{run_id} failed (exit {proc.returncode}); see {out / 'log.txt'}:\n"
                           + proc.stderr[-2000:])
    res = json.loads((out / "results.json").read_text())
    rec = {"id": run_id, "task": task, "arm": arm, "seed": seed, "overrides": overrides,
           "val_acc": res["val_acc"], "steps": res["steps"], "train_size": res["train_size"],
           "val_size": res["val_size"], "memory_total": (res["memory"] or {}).get("total"),
           "step_time_s": res["step_time_s"], "wall_s": round(time.time() - t0, 1),
           "threads": os.environ.get("OMP_NUM_THREADS", "default"),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def report() -> str:
    """Per-task paired gaps (arm minus full fine-tuning, same seed), mean ± std."""
    done = list(_done().values())
    lines = ["| task | arm | seeds | accuracy % (mean ± std) | paired gap vs full (points) |",
             "|---|---|---:|---:|---:|"]
    keyed = {(r["task"], r["arm"], r["seed"]): r["val_acc"] for r in done}
    for task in TASKS:
        for arm in sorted({r["arm"] for r in done if r["task"] == task},
                          key=lambda a: (a != "full", a)):
            accs = {s: keyed[(task, arm, s)] for (t, a, s) in keyed if t == task and a == arm}
            gaps = [100 * (accs[s] - keyed[(task, "full", s)]) for s in accs
                    if (task, "full", s) in keyed]
            acc = [100 * v for v in accs.values()]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            gap = "" if arm == "full" or not gaps else (
                f"{statistics.mean(gaps):+.2f} ± {statistics.stdev(gaps) if len(gaps) > 1 else 0:.2f}"
                f" (n={len(gaps)})")
            lines.append(f"| {task} | {arm} | {len(acc)} | {statistics.mean(acc):.2f} ± {sd:.2f} | {gap} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", nargs="+", default=["core"], choices=["core", "lr"])
    ap.add_argument("--list", action="store_true", help="print the pending runs and exit")
    ap.add_argument("--report", action="store_true", help="print the paired-gap table and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(report())
        return
    done = _done()
    pending = [r for r in _runs(args.groups) if r[0] not in done]
    for run_id, *_ in pending if args.list else ():
        print(run_id)
    if args.list:
        return
    for run_id, task, arm, seed, overrides in pending:
        print(f"[{time.strftime('%H:%M')}] {run_id}: {' '.join(overrides)}", flush=True)
        rec = run_one(run_id, task, arm, seed, overrides)
        print(f"  val_acc {rec['val_acc']:.4f}, {rec['steps']} steps, {rec['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
