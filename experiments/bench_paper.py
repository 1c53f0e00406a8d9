"""The paper's two headline scenarios, with the planner's plan at each budget.

The paper (arXiv 2305.18513) says full fine-tuning of ViT-B/16 on ImageNet
(384 px, batch 128) needs three 32 GB GPUs and BERT-base on SQuAD 2.0 (seq 384,
batch 128) two, and that SlimFit fits each on one. This script measures both
shapes with the project's ledger against full fine-tuning as a GPU user runs
it (SDPA attention, bf16 autocast), then asks the budget planner for a plan at
each budget (default 32, 24 and 16 GiB) for batch 128.

    python -m slimfit.experiments.bench_paper --scenario bert-squad
    python -m slimfit.experiments.bench_paper --scenario vit-imagenet
    python -m slimfit.experiments.bench_paper --scenario bert-squad --batch-sizes 1 2 4 --target 128

Why extrapolate: a batch-128 step of either model does not fit this
machine's RAM on a CPU. Activations are measured at the small batches given
and fitted as a + b * batch on the first and last (the residual at the others
is printed, 0 by construction with two); parameters, gradients and optimizer
state do not depend on the batch. The planner measures every candidate at
the smallest and largest batch given and extrapolates its activations on the
same line (``plan_for_budget(activation_scale=target / batch,
small_batch=(loss at the small batch, small / batch))``). Scaling one batch
proportionally would be far off here: under bf16 autocast the bf16 weight
copies that matmuls save (~160 MiB for BERT-base) do not grow with the batch. On a GPU the same script measures
``torch.cuda.max_memory_allocated`` nowhere: use ``gpu_check`` for that.

Rows: full fine-tuning (baseline), SlimFit r=0.9 + compression, + the
optimizer state of frozen units in host memory, + weight streaming (k=2
blocks resident, k'=1 prefetched). Models are random-init (the bytes do not
depend on the weights); every arm's initial pass trains every unit once so
that all optimizer state exists, as in a long run.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc

import torch

from slimfit import BudgetError, format_bytes, parse_budget, plan_for_budget
from slimfit.experiments.bench_cases import extrapolation_table, measure_method
from slimfit.experiments.runs import RUNS, Run
from slimfit.experiments.zoo import build_case, case_batch


@dataclasses.dataclass(frozen=True)
class Scenario:
    model: str
    seq_len: int
    image_size: int
    paper: str       # what the paper says full fine-tuning needs
    paper_rate: float  # the freezing rate the paper's reference code used


SCENARIOS = {
    "vit-imagenet": Scenario("vit-b16", 128, 384, "three 32 GB GPUs", 0.95),
    "bert-squad": Scenario("bert-base-squad", 384, 224, "two 32 GB GPUs", 0.80),
}


def arms() -> list[Run]:
    return [RUNS[n] for n in ("full", "slimfit", "slimfit_offload", "slimfit_stream")]


def plan_table(sc: Scenario, small: int, batch: int, target: int, budgets: list[str],
               precision: str, attention_dropout: float | None) -> str:
    """The planner's plan for batch ``target`` at each budget (every candidate
    measured at ``small`` and ``batch``, activations on the line through both)."""
    lines = [f"| budget | plan for batch {target} | expected peak | parameters | gradients | "
             "optimizer state | activations | host memory | expected accuracy price |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    details = []
    for budget in budgets:
        case = build_case(sc.model, batch, sc.seq_len, sc.image_size, precision=precision,
                          attention_dropout=attention_dropout)
        adamw = lambda ps: torch.optim.AdamW(ps, lr=5e-5)  # noqa: E731
        # the same model at the small batch: a second Case sharing it
        at_small = dataclasses.replace(case, batch=case_batch(
            sc.model, small, sc.seq_len, sc.image_size, seed=case.seed))
        try:
            plan = plan_for_budget(case.model, adamw, case.loss, budget,
                                   activation_scale=target / batch,
                                   small_batch=(at_small.loss, small / batch))
        except BudgetError as err:
            lines.append(f"| {budget} | does not fit: {err} | | | | | | | |")
            continue
        e = plan.expected
        host = e["host_optimizer_state"] + e["host_parameters"]
        gap, source = plan.price
        lines.append(f"| {budget} | {plan.label()} | {format_bytes(e['total'])} | "
                     f"{format_bytes(e['parameters'])} | {format_bytes(e['gradients'])} | "
                     f"{format_bytes(e['optimizer_state'])} | {format_bytes(e['activations'])} | "
                     f"{format_bytes(host)} | {gap:+.2f} points ({source}) |")
        details.append(plan.describe())
        print(plan.describe(), flush=True)
        del case, plan
        gc.collect()
    return "\n".join(lines) + "\n\n```\n" + "\n\n".join(details) + "\n```"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=list(SCENARIOS), default="bert-squad")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--target", type=int, default=128, help="batch the paper uses")
    ap.add_argument("--budgets", nargs="+", default=["32GiB", "24GiB", "16GiB"])
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                    help="bf16: forward under bf16 autocast (bf16-mixed), as on a GPU")
    ap.add_argument("--attention-dropout", type=float, default=0.0,
                    help="BERT's attention dropout (its default 0.1 makes SDPA on a CPU fall "
                         "back to the math kernel, which stores the T x T probabilities; a "
                         "GPU's fused kernels take dropout and store none: 0 measures what "
                         "they store)")
    ap.add_argument("--timed-steps", type=int, default=1)
    ap.add_argument("--skip-arms", action="store_true", help="only the planner's plans")
    args = ap.parse_args(argv)
    for b in args.budgets:
        parse_budget(b)  # a bad budget fails before any measurement
    sc = SCENARIOS[args.scenario]
    bsz = sorted(set(args.batch_sizes))
    out = [f"# {args.scenario}: the paper says full fine-tuning needs {sc.paper} "
           f"(batch {args.target})\n"]
    if not args.skip_arms:
        runs = [measure_method(sc.model, m, bsz, seq_len=sc.seq_len, image_size=sc.image_size,
                               timed=args.timed_steps, label=f"{m.name}: {m.label()}",
                               precision=args.precision,
                               attention_dropout=args.attention_dropout)
                for m in arms()]
        out.append(f"{runs[0].describe}; ledger at batches {bsz}, extrapolated to batch "
                   f"{args.target} (activations linear in batch; baseline: full fine-tuning "
                   f"as loaded, SDPA, {args.precision}):\n")
        out.append(extrapolation_table(runs, bsz, args.target))
    out.append(f"\nThe planner at each budget (every candidate measured at batches {bsz[0]} and "
               f"{bsz[-1]}, activations extrapolated to {args.target} on the line through both; "
               f"the paper's own rate for this task: r={sc.paper_rate:g}):\n")
    out.append(plan_table(sc, bsz[0], bsz[-1], args.target, args.budgets, args.precision,
                          args.attention_dropout))
    text = "\n".join(out)
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()
