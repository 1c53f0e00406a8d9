"""Memory of the three freezing policies (SlimFit's scores, LISA, BAdam) at the
same trainable fraction, for each place the frozen units' optimizer state can
live (``optimizer_state``: ``device``, ``host``, ``release``), beside full
fine-tuning, in one process on one batch: the ledger of one real step.

Why: LISA's users report that the optimizer state of every layer stays on the
GPU (LMFlow #729/#768) and BAdam resets it on every switch; which of the three
places a user picks decides the optimizer-state share of memory, whatever the
policy. Every arm first takes one full fine-tuning step (so every tensor has
AdamW state, as in a long run) and then ``--steps`` steps of its own, each
measured; the median step and the step with the most memory are reported
(a unit's bytes are not uniform: MiniLM's word embedding is half its weights,
so a step that trains it holds half the model's optimizer state).

    python -m slimfit.experiments.bench_policies --model minilm --batch-size 16 --seq-len 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from slimfit import SessionConfig, format_bytes
from slimfit.experiments.bench_cases import make_optimizer, start_session
from slimfit.experiments.runs import RUNS
from slimfit.experiments.zoo import CASES, build_case

POLICIES = ("slimfit", "lisa", "badam")
PLACES = ("device", "host", "release")


def measure(model: str, batch: int, seq: int, rate: float, steps: int,
            policy: str | None, place: str = "device") -> dict:
    case = build_case(model, batch, seq)
    opt = make_optimizer("adamw", case.model)
    cfg = SessionConfig()
    if policy is not None:
        base = RUNS["slimfit"].session
        # LISA and BAdam switch every 2 steps here (their K changes which units train
        # when, not the bytes of a step), so the window sees many samples / blocks
        cfg = dataclasses.replace(base, optimizer_state=place, freezing=dataclasses.replace(
            base.freezing, freeze_rate=rate, policy=policy,
            interval=None if policy == "slimfit" else 2))
    # one full step first: every tensor has AdamW state, as in a long run (each policy's
    # own initial pass differs: BAdam's visits every block for K steps)
    opt.zero_grad(set_to_none=True)
    case.loss().backward()
    opt.step()
    session = start_session(case, opt, cfg, initial_pass=False)
    reports = [session.step(case.loss, measure=True) for _ in range(steps)]
    session.stop()
    med = sorted(reports, key=lambda r: r.total)[len(reports) // 2]
    peak = max(reports, key=lambda r: r.total)
    return {f"{k}_{name}": getattr(r, attr) for name, r in (("median", med), ("peak", peak))
            for k, attr in (("optimizer_state", "optimizer_state"),
                            ("on_host", "offloaded_optimizer_state"), ("gradients", "gradients"),
                            ("activations", "activations"), ("total", "total"))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", choices=CASES)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--freeze-rate", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=20, help="measured steps per arm")
    ap.add_argument("--out", default=None, help="write the figures here as JSON")
    args = ap.parse_args(argv)
    shape = (args.model, args.batch_size, args.seq_len, args.freeze_rate, args.steps)
    rows = {"full": measure(*shape, policy=None)}
    for policy in POLICIES:
        for place in PLACES:
            rows[f"{policy} {place}"] = measure(*shape, policy=policy, place=place)
    full = rows["full"]["optimizer_state_median"]
    print(f"{args.model}, batch {args.batch_size} x {args.seq_len}, r = {args.freeze_rate}, AdamW, "
          f"ledger of each of {args.steps} steps: the median step (and the step with the most "
          "memory)\n")
    print("| arm | optimizer state on the device | vs full | on the host | gradients | "
          "saved activations | total on the device |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        cell = lambda k: (f"{format_bytes(r[k + '_median'])} ({format_bytes(r[k + '_peak'])})")
        share = (f"{100 * r['optimizer_state_median'] / full:.1f}% "
                 f"({100 * r['optimizer_state_peak'] / full:.1f}%)")
        print(f"| {name} | {cell('optimizer_state')} | {share} | {cell('on_host')} | "
              f"{cell('gradients')} | {cell('activations')} | {cell('total')} |")
    if args.out:
        path = pathlib.Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
