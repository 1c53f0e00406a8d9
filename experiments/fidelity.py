"""The fidelity study (issue 12), run one training at a time and resumable.

Each arm is a set of Hydra overrides of ``slimfit.experiments.train``; each
run is a subprocess (one training at a time: two on a 2-core machine slow
both 5-8x), and a finished run appends one line to
``experiments/results/fidelity.jsonl`` (committed, so the study goes on across
sessions: runs already in that file are skipped).

    python -m slimfit.experiments.fidelity --list                # what would run
    python -m slimfit.experiments.fidelity --groups core         # core comparison
    OMP_NUM_THREADS=1 nohup python -m slimfit.experiments.fidelity --groups core &
    python -m slimfit.experiments.fidelity --report              # paired gaps, lr sweep

Groups (``GROUPS``): ``core`` (full fine-tuning vs SlimFit r=0.9 +
compression, three tasks x seeds 0-2; ``core0``: seed 0 only), ``ablation``
(head, score, staleness, schedule, selection on the movie task; ``ablation0``:
seed 0), ``lr`` (peak learning rates of full fine-tuning, SlimFit and
LoRA), ``rate`` (r in 0.5/0.8/0.95), ``short`` (0.2 and 1 epoch), ``peers``
(LoRA and 8-bit AdamW on the movie task), ``trec`` (full fine-tuning vs the
defaults on TREC questions: held out, the check a new user makes, until its
gap chose ``reserve_fraction``, which the three study tasks then checked at 3
seeds). Each run
records the code version it ran (``FIDELITY_CODE``, set by whoever starts
the study from a snapshot). ``--only`` runs given run ids. A short-budget
arm, and one without warm-up or at another peak lr, is paired with full
fine-tuning under the same setting (:func:`reference`);
the ``lr`` arms are also tabled by peak lr (:func:`lr_sweep`), each family
paired with full fine-tuning at the same lr and shown at its own best lr.

When a default changes, the runs recorded before it keep their results but
are relabelled with the old setting made explicit in their overrides and arm
name, and a ``relabelled`` field records the old id and why: the inputs of
trained Linears became int8, so the earlier ``slimfit`` runs are
``slimfit-fp32-linear`` (and ``...@fp32-linear``), and the earlier
``slimfit-int8-linear`` runs are ``slimfit``; then a quarter of the trained
slots became reserved for the least recently trained units, so the earlier
``slimfit`` runs are ``slimfit-topk`` (every slot by score), the earlier
freezing ablations carry ``@topk``, and the ``slimfit-reserve0.25`` runs are
``slimfit``; then LoRA's method file moved from lr 5e-4 to the sweep's best,
1e-3, so the earlier ``lora`` runs are ``lora@lr5e-4`` and the
``lora@lr1e-3`` runs are ``lora``.
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
TASKS = {"movie": "fidelity_movie", "sms": "fidelity_sms", "bbc": "fidelity_bbc",
         "trec": "fidelity_trec"}
#: the tasks the groups choose defaults on; TREC was held out until its gap chose
#: ``reserve_fraction`` (which these three then checked, docs/results.md)
STUDY_TASKS = ("movie", "sms", "bbc")
SEEDS = (0, 1, 2)

#: arm name -> overrides shared by every task of that arm
ARMS: dict[str, list[str]] = {
    "full": ["slimfit=full"],
    # SlimFit r=0.9 + compression at the project's defaults (int8 Linear inputs
    # since the study measured them; the runs before are "slimfit-fp32-linear")
    "slimfit": ["slimfit=r090_compress"],
    # ablations, each one change from "slimfit"
    "slimfit-head-candidate": ["slimfit=r090_compress", "+slimfit.train_new_heads=false"],
    # the paper's choices: head a candidate, step scale 1, eager attention
    "slimfit-paper-eager": ["slimfit=r090_compress", "+slimfit.train_new_heads=false",
                            "+slimfit.trained_lr_scale=1.0", "model.attn_implementation=eager",
                            "slimfit.compression.linear_input=none"],
    "slimfit-nocompress": ["slimfit=r090"],
    # compression alone, nothing frozen (every Linear trained, so every Linear input
    # int8): the planner's first lossy plan
    "compress-only": ["slimfit=r090_compress", "slimfit.freeze_rate=0.0"],
    # trained Linears' inputs kept as they are (the default until the study showed int8
    # costs no accuracy; its runs until then were the "slimfit" arm)
    "slimfit-fp32-linear": ["slimfit=r090_compress", "slimfit.compression.linear_input=none"],
    # a peer at the same budget: PEFT LoRA r=8 (its method file sets lr 1e-3, its best in the
    # lr sweep; the runs at the usual 5e-4 are "lora@lr5e-4")
    "lora": ["slimfit=full", "method=lora"],
    # a peer: full fine-tuning with bitsandbytes AdamW8bit (block-quantized state)
    "full-8bit": ["slimfit=full", "method=full_8bit"],
    # the paper's step size for trained units (the default before trained_lr_scale="auto")
    "slimfit-lrscale1": ["slimfit=r090_compress", "+slimfit.trained_lr_scale=1.0"],
    "slimfit-update_norm": ["slimfit=r090_compress", "+slimfit.score=update_norm"],
    "slimfit-grad_norm": ["slimfit=r090_compress", "+slimfit.score=grad_norm"],
    "slimfit-decay0.99": ["slimfit=r090_compress", "+slimfit.frozen_score_decay=0.99"],
    "slimfit-age20": ["slimfit=r090_compress", "slimfit.max_frozen_age=20"],
    "slimfit-sample": ["slimfit=r090_compress", "+slimfit.selection=sample"],
    # every trained slot by score (the paper's top-k; the default until the study)
    "slimfit-topk": ["slimfit=r090_compress", "+slimfit.reserve_fraction=0.0"],
}
for _lr in ("5e-5", "2e-4", "3e-4"):
    ARMS[f"full@lr{_lr}"] = ["slimfit=full", f"task.lr={_lr}"]
    ARMS[f"slimfit@lr{_lr}"] = ["slimfit=r090_compress", f"task.lr={_lr}"]
    ARMS[f"slimfit-lrscale1@lr{_lr}"] = [*ARMS["slimfit-lrscale1"], f"task.lr={_lr}"]
# LoRA's own sweep (the plain "lora" arm at its method file's 1e-3): a peer judged at a
# rate that handicaps it would flatter SlimFit
for _lr in ("2e-4", "5e-4", "2e-3"):
    ARMS[f"lora@lr{_lr}"] = [*ARMS["lora"], f"task.lr={_lr}"]
# ablations first run before int8 Linear inputs became the default, kept apart
for _arm in ("slimfit-lrscale1", "slimfit-lrscale1@lr3e-4"):
    ARMS[f"{_arm}@fp32-linear"] = [*ARMS[_arm], "slimfit.compression.linear_input=none"]
for _r in ("0.5", "0.8", "0.95"):
    ARMS[f"slimfit-r{_r}"] = ["slimfit=r090_compress", f"slimfit.freeze_rate={_r}"]
#: training settings both arms run under, each a ``full-<name>`` and a
#: ``slimfit-<name>`` arm: SlimFit's run under one is paired with full
#: fine-tuning's under the same (:func:`reference`), so the gap is SlimFit's own.
#: Short budgets are a fraction of each task's own epoch (the schedule's length
#: follows: tasks.py sizes warm-up and decay from ``estimated_stepping_batches``).
SHARED_SETTINGS = {"0.2ep": ["trainer.max_epochs=1", "+trainer.limit_train_batches=0.2"],
                   "1ep": ["trainer.max_epochs=1"],
                   # the reference code's schedule: linear decay from the peak, no warm-up
                   "nowarmup": ["task.warmup_fraction=0.0"]}
for _name, _setting in SHARED_SETTINGS.items():
    ARMS[f"full-{_name}"] = ["slimfit=full", *_setting]
    ARMS[f"slimfit-{_name}"] = ["slimfit=r090_compress", *_setting]
# freezing runs recorded before reserve_fraction=0.25 became the default, kept apart
for _arm in ("slimfit-paper-eager", "slimfit-lrscale1@fp32-linear",
             "slimfit-lrscale1@lr3e-4@fp32-linear", "slimfit-fp32-linear", "slimfit-nocompress",
             "slimfit-decay0.99", "slimfit-0.2ep"):
    ARMS[f"{_arm}@topk"] = [*ARMS[_arm], "+slimfit.reserve_fraction=0.0"]

ABLATIONS = ("slimfit-head-candidate", "slimfit-nocompress", "slimfit-fp32-linear", "compress-only",
             "slimfit-lrscale1", "slimfit-update_norm", "slimfit-grad_norm",
             "slimfit-decay0.99", "slimfit-age20", "slimfit-sample", "slimfit-topk",
             "slimfit-nowarmup", "full-nowarmup")

#: group -> (tasks, arms, seeds); the queue runs groups in the order given
GROUPS = {
    "core0": (STUDY_TASKS, ("full", "slimfit"), (0,)),
    "ablation0": (("movie",), ABLATIONS, (0,)),
    "core": (STUDY_TASKS, ("full", "slimfit"), SEEDS),
    # the held-out check (another task, the Hydra entry point, every option
    # default); TREC's gap chose reserve_fraction, so it is held out no longer
    "trec": (("trec",), ("full", "slimfit", "slimfit-topk"), SEEDS),
    "ablation": (("movie",), ABLATIONS, (0, 1)),
    "lr": (("movie",), tuple(a for a in ARMS if "@lr" in a), (0, 1)),
    "rate": (("movie",), ("slimfit-r0.5", "slimfit-r0.8", "slimfit-r0.95"), (0, 1)),
    "short": (STUDY_TASKS, ("full-0.2ep", "slimfit-0.2ep", "full-1ep", "slimfit-1ep"), SEEDS),
    "peers": (("movie",), ("lora", "full-8bit"), SEEDS),
}


def _runs(groups: list[str]) -> list[tuple[str, str, str, int, list[str]]]:
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
                        out.append((run_id, task, arm, seed, ARMS[arm]))
    return out


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
           "code": os.environ.get("FIDELITY_CODE", "working tree"),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def setting(arm: str) -> str:
    """The training setting ``arm`` runs under, from its name: a peak lr
    (``"lr2e-4"`` for ``slimfit@lr2e-4@topk``), a :data:`SHARED_SETTINGS` name
    (``"0.2ep"`` for ``slimfit-0.2ep@topk``, ``"nowarmup"``), or ``""`` for the
    default setting (``slimfit-r0.8``, ``lora``)."""
    base, _, rest = arm.partition("@")
    lr = rest.split("@", 1)[0]
    if lr.startswith("lr"):
        return lr
    name = base.rsplit("-", 1)[1] if "-" in base else ""
    return name if name in SHARED_SETTINGS else ""


def reference(arm: str) -> str:
    """The full fine-tuning arm ``arm`` is paired with: the one under the same
    training setting (:func:`setting`: ``slimfit-0.2ep@topk`` -> ``full-0.2ep``,
    ``slimfit-nowarmup`` -> ``full-nowarmup``, ``slimfit@lr2e-4`` ->
    ``full@lr2e-4``), else ``full`` (a peak lr full fine-tuning never ran at,
    LoRA's 5e-4, is paired with full fine-tuning at its own)."""
    name = setting(arm)
    if name.startswith("lr"):
        return f"full@{name}" if f"full@{name}" in ARMS else "full"
    return f"full-{name}" if name else "full"


def _summary(vals: list[float], sign: str = "") -> str:
    """``mean ± std (n=k)`` of ``vals`` to 2 decimals (``sign="+"``: signed, as
    gaps are written); empty for no values."""
    if not vals:
        return ""
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    mean = round(statistics.mean(vals), 2) + 0.0  # + 0.0: no "-0.00"
    return f"{mean:{sign}.2f} ± {sd:.2f} (n={len(vals)})"


def report() -> str:
    """Per-task paired gaps (arm minus full fine-tuning at the same seed and
    training setting: :func:`reference`), mean ± std."""
    done = list(_done().values())
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
            gap = "" if arm == ref else _summary(gaps, "+")
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
                                          *ARMS[arm]])
    return float(cfg.task.lr)


def lr_sweep(task: str = "movie") -> str:
    """The learning-rate sweep as a table: each family (``full``, ``slimfit``,
    ...) at each peak lr it ran at (its plain arm at its own default: the
    task's, or what its method sets, LoRA's 1e-3), the
    paired gap to full fine-tuning at the same lr and seed, and each family at
    its own best lr, so that no arm is judged at a rate that handicaps it.
    Empty when no ``@lr`` arm of ``task`` has run."""
    # (family, "2e-4" or "" for the default lr, run); another setting after the lr: not the sweep's
    runs = [(fam, lr, r) for r in _done().values() if r["task"] == task
            for fam, _, lr in [r["arm"].partition("@lr")] if "@" not in lr]
    swept = {fam for fam, lr, _ in runs if lr}
    if not swept:
        return ""
    # each family's plain arm ran at its own default (the task's; LoRA's method sets its own)
    defaults = {fam: _default_lr(task, fam) for fam in swept | {"full"}}
    acc: dict[tuple[str, float], dict[int, float]] = {}  # (family, lr) -> seed -> accuracy %
    for fam, lr, r in runs:
        if fam in defaults:
            acc.setdefault((fam, float(lr) if lr else defaults[fam]), {})[r["seed"]] = 100 * r["val_acc"]
    families = sorted({fam for fam, _ in acc}, key=lambda f: (f != "full", f))
    others = [f for f in families if f != "full"]
    lrs = sorted({lr for _, lr in acc})

    def name(lr: float) -> str:  # 1e-4, as the arms spell it
        return f"{lr:.0e}".replace("e-0", "e-")

    def gap(a: dict[int, float], b: dict[int, float]) -> str:
        return _summary([a[s] - b[s] for s in sorted(a) if s in b], "+")

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
        row += [_summary(list(acc.get((f, lr), {}).values())) for f in families]
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


def _frontier_runs(task: str) -> list[dict]:
    """The runs of ``task`` the frontier plot draws: those with a memory figure, at the
    default training setting (:func:`setting`); a budget, schedule or lr of its own is
    another frontier (the lr table has the sweep)."""
    return [r for r in _done().values() if r["task"] == task and r.get("memory_total")
            and setting(r["arm"]) == ""]


def plot(path: str, task: str = "movie") -> pathlib.Path:
    """Accuracy against ledger memory, one point per arm of ``task`` at the default setting
    (mean over seeds, error bar: std), full fine-tuning marked: the study's frontier."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = _frontier_runs(task)
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", nargs="+", default=["core"], choices=list(GROUPS))
    ap.add_argument("--only", nargs="+", metavar="RUN_ID",
                    help="run these run ids (task/arm/seedN) in this order instead of --groups")
    ap.add_argument("--list", action="store_true", help="print the pending runs and exit")
    ap.add_argument("--report", action="store_true", help="print the paired-gap table and exit")
    ap.add_argument("--plot", metavar="PNG", help="with --report: also write the accuracy-vs-"
                                                  "memory frontier of the movie task there")
    args = ap.parse_args(argv)
    if args.report:
        print(report())
        sweep = lr_sweep()
        if sweep:
            print("\nLearning-rate sweep, movie reviews (3 epochs):\n" + sweep)
        if args.plot:
            print(f"frontier plot: {plot(args.plot)}")
        return
    done = _done()
    queue = _runs(args.groups)
    if args.only:
        queue = []
        for run_id in args.only:
            task, arm, seed = (run_id.split("/") + ["", "", ""])[:3]
            seed = seed.removeprefix("seed")
            if task not in TASKS or arm not in ARMS or not seed.isdigit():
                raise SystemExit(f"--only: unknown run id {run_id!r}; expected task/arm/seedN with "
                                 f"task in {sorted(TASKS)} and arm in {sorted(ARMS)}")
            queue.append((run_id, task, arm, int(seed), ARMS[arm]))
    pending = [r for r in queue if r[0] not in done]
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
