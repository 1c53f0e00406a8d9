"""Full fine-tuning vs SlimFit freezing, same process, same batch: ledger
memory and step time side by side.

Example (the issue's configuration):
    python experiments/bench_freezing.py --model bert-base --batch-size 8 --freeze-rate 0.9

The SlimFit arm first runs its initial pass (every unit trained once, so every
tensor has AdamW state, as in a long run), then both arms are timed over
``--timed-steps`` steps and one step each is measured with the ledger. The
score snapshot SlimFit takes before each optimizer step (a copy of the trained
units only) is transient and reported on its own row.
"""

from __future__ import annotations

import argparse
import dataclasses

from slimfit import SessionConfig, format_bytes
from slimfit.experiments.bench_cases import make_optimizer, start_session, timed_steps
from slimfit.experiments.runs import RUNS
from slimfit.experiments.zoo import CASES, build_case


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bert-base", choices=CASES)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--freeze-rate", type=float, default=0.9)
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "adamw8bit"])
    ap.add_argument("--timed-steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rows = {}
    for arm, name in (("full", "full"), ("slimfit", "slimfit_nocompress")):
        case = build_case(args.model, args.batch_size, args.seq_len, args.image_size, args.device)
        opt = make_optimizer(args.optimizer, case.model)
        cfg = RUNS[name].session or SessionConfig()
        if cfg.freezing is not None:  # freezing alone, at the command line's rate and seed
            cfg = dataclasses.replace(cfg, freezing=dataclasses.replace(
                cfg.freezing, freeze_rate=args.freeze_rate, seed=args.seed))
        session = start_session(case, opt, cfg)  # every tensor trained once: AdamW state exists
        freezer = session.freezer
        if freezer is not None:
            print(f"SlimFit initial pass done after {freezer.scheduler.step} steps, "
                  f"{len(freezer.units)} units, {freezer.num_frozen} frozen per step")
        t = timed_steps(case, session, args.timed_steps)
        rep = session.step(case.loss, measure=True)
        snap = 0
        if freezer is not None:
            fz = set(freezer.history.matrix()[:, -1].nonzero()[0])
            snap = sum(4 * u.numel for i, u in enumerate(freezer.units) if i not in fz)
        rows[arm] = (rep, t, snap)
        print(f"{arm}: median step {t:.3f} s")

    (full, tf, _), (sf, ts, snap) = rows["full"], rows["slimfit"]
    print(f"\n## {case.describe}, optimizer {args.optimizer}, SlimFit r={args.freeze_rate}\n")
    print("| quantity | full fine-tuning | SlimFit | SlimFit / full |")
    print("|---|---:|---:|---:|")
    for label, a, b in [("parameters", full.parameters, sf.parameters),
                        ("gradients", full.gradients, sf.gradients),
                        ("optimizer state", full.optimizer_state, sf.optimizer_state),
                        ("saved activations (peak)", full.activations, sf.activations),
                        ("**ledger total**", full.total, sf.total)]:
        print(f"| {label} | {format_bytes(a)} | {format_bytes(b)} | {b / a:.3f} |")
    print(f"| score snapshot (transient, at the step) | - | {format_bytes(snap)} | |")
    print(f"| step time (median of {args.timed_steps}) | {tf:.3f} s | {ts:.3f} s | {ts / tf:.3f} |")


if __name__ == "__main__":
    main()
