"""Running the fidelity study: one training at a time (two on a 2-core machine
slow both 5-8x), each a subprocess of ``slimfit.experiments.train``; a
finished run appends one line to the results file (committed, so the study
goes on across sessions: runs already in that file are skipped).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

from slimfit.experiments.fidelity.arms import ARMS, GROUPS, TASKS

__all__ = ["RESULTS", "RUNS", "load", "queue", "run_one"]

# The study may run from a frozen copy of the code (so that editing the working
# tree does not change runs in flight): these two point back at the checkout.
RESULTS = pathlib.Path(os.environ.get("FIDELITY_RESULTS", pathlib.Path(__file__).resolve().parents[1]
                                      / "results" / "fidelity.jsonl"))
RUNS = pathlib.Path(os.environ.get("FIDELITY_RUNS", "runs/fidelity"))


def load(path: pathlib.Path | None = None) -> list[dict]:
    """Every recorded run of the results file (``RESULTS`` by default)."""
    path = RESULTS if path is None else pathlib.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def queue(groups: list[str]) -> list[tuple[str, str, str, int, list[str]]]:
    """(run id, task, arm, seed, overrides) in queue order, seed-major within a
    group so that paired comparisons complete early; duplicates dropped."""
    out, seen = [], set()
    for g in groups:
        tasks, arms, seeds = GROUPS[g]
        for seed in seeds:
            for task in tasks:
                for arm in arms:
                    run_id = f"{task}/{arm}/seed{seed}"
                    if run_id not in seen:
                        seen.add(run_id)
                        out.append((run_id, task, arm, seed, ARMS[arm].overrides))
    return out


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
           "val_acc": res["val_acc"], "test_acc": res.get("test_acc"), "steps": res["steps"],
           "train_size": res["train_size"], "val_size": res["val_size"],
           "test_size": res.get("test_size", 0), "memory_total": (res["memory"] or {}).get("total"),
           "step_time_s": res["step_time_s"], "wall_s": round(time.time() - t0, 1),
           "threads": os.environ.get("OMP_NUM_THREADS", "default"),
           "code": os.environ.get("FIDELITY_CODE", "working tree"),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec
