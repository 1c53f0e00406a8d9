"""``python -m slimfit.experiments.fidelity``: the study's command line (see
the package docstring)."""

from __future__ import annotations

import argparse
import time

from slimfit.experiments import fidelity
from slimfit.experiments.fidelity import evidence, policies
from slimfit.experiments.fidelity.arms import ARMS, GROUPS, TASKS
from slimfit.experiments.fidelity.report import lr_sweep, plot, report
from slimfit.experiments.fidelity.runner import load, queue, run_one


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=fidelity.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", nargs="+", default=["core"], choices=list(GROUPS))
    ap.add_argument("--only", nargs="+", metavar="RUN_ID",
                    help="run these run ids (task/arm/seedN) in this order instead of --groups")
    ap.add_argument("--list", action="store_true", help="print the pending runs and exit")
    ap.add_argument("--report", action="store_true", help="print the paired-gap table and exit")
    ap.add_argument("--plot", metavar="PNG", help="with --report: also write the accuracy-vs-"
                                                  "memory frontier of the movie task there")
    ap.add_argument("--policy-plot", metavar="PNG", help="with --report: also write the policy "
                                                         "study's frontier (three tasks) there")
    ap.add_argument("--evidence", action="store_true",
                    help=f"write the figures the library reads to {evidence.EVIDENCE} and exit")
    args = ap.parse_args(argv)
    runs = load()
    if args.evidence:
        print(f"evidence: {evidence.write(runs)}")
        return
    if args.report:
        print(report(runs))
        sweep = lr_sweep(runs)
        if sweep:
            print("\nLearning-rate sweep, movie reviews (3 epochs):\n" + sweep)
        if args.plot:
            print(f"frontier plot: {plot(runs, args.plot)}")
        pol = policies.report(runs)
        if pol:
            print("\nPolicy study (test split; choices on validation):\n" + pol)
        if args.policy_plot:
            print(f"policy frontier plot: {policies.plot(runs, args.policy_plot)}")
        return
    done = {r["id"] for r in runs}
    pending = queue(args.groups)
    if args.only:
        pending = []
        for run_id in args.only:
            task, arm, seed = (run_id.split("/") + ["", "", ""])[:3]
            seed = seed.removeprefix("seed")
            if task not in TASKS or arm not in ARMS or not seed.isdigit():
                raise SystemExit(f"--only: unknown run id {run_id!r}; expected task/arm/seedN with "
                                 f"task in {sorted(TASKS)} and arm in {sorted(ARMS)}")
            pending.append((run_id, task, arm, int(seed), ARMS[arm].overrides))
    pending = [r for r in pending if r[0] not in done]
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
