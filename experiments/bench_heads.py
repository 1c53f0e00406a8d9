"""What keeping the new head always trained costs in memory (issue 12).

SlimFit r=0.9 + compression with ``train_new_heads=True`` (the default)
against ``False`` (the head is a freezing candidate, as in the paper's BERT
scripts), the ledger's maximum over three steps after the initial pass, on
BERT-base (2 classes) and ViT-B/16 (1,000 classes):

    python -m slimfit.experiments.bench_heads
    python -m slimfit.experiments.bench_heads --steps 5 --batch-sizes 16 8

The difference also carries the step-to-step variation of which units
train (the head frees or takes a trained slot); read it as "within a few
percent", not to the byte.
"""

from __future__ import annotations

import argparse

from slimfit import CompressionConfig, SessionConfig, SlimFitConfig, format_bytes
from slimfit.experiments.bench_cases import make_optimizer, start_session
from slimfit.experiments.zoo import build_case


def measure(name: str, batch: int, heads: bool, steps: int) -> tuple[int, int, int]:
    """(total, gradients, activations), each the maximum over ``steps`` steps."""
    case = build_case(name, batch)
    config = SessionConfig(freezing=SlimFitConfig(freeze_rate=0.9, train_new_heads=heads),
                           compression=CompressionConfig())
    session = start_session(case, make_optimizer("adamw", case.model), config)
    reps = [session.step(case.loss, measure=True) for _ in range(steps)]
    session.stop()
    return (max(r.total for r in reps), max(r.gradients for r in reps),
            max(r.activations for r in reps))


def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-sizes", type=int, nargs=2, default=[16, 8],
                    metavar=("BERT", "VIT"))
    args = ap.parse_args(argv)
    lines = ["| model | batch | head | total | gradients | activations |",
             "|---|---:|---|---:|---:|---:|"]
    for name, batch in zip(("bert-base", "vit-b16"), args.batch_sizes):
        got = {h: measure(name, batch, h, args.steps) for h in (True, False)}
        for h, (tot, grads, acts) in got.items():
            lines.append(f"| {name} | {batch} | {'always trained' if h else 'a candidate'} | "
                         f"{format_bytes(tot)} | {format_bytes(grads)} | {format_bytes(acts)} |")
        d = got[True][0] - got[False][0]
        lines.append(f"| {name} | {batch} | difference | {'+' if d >= 0 else '-'}"
                     f"{format_bytes(abs(d))} ({100 * d / got[False][0]:+.2f}%) | | |")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
