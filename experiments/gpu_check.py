"""GPU check of the memory modes, in one go (a few minutes on one H100):
``torch.cuda.max_memory_allocated`` and step time for BERT-base (seq 128) and
ViT-B/16 (224 px) at batch 32 and 128, for

* full fine-tuning (AdamW),
* SlimFit r=0.9 + static-activation compression,
* the same with bitsandbytes AdamW8bit,
* the same with optimizer-state offload of frozen units and activation offload,
* the same plus Superpipeline-style weight streaming of frozen weights
  (k=2 blocks resident, k'=1 prefetched on a side stream; the prefetch hit
  rate and late copies are printed),
* the budget planner at ``--budget-fraction`` of full fine-tuning's peak,

with ratios against full fine-tuning, and the ledger total beside the
allocator's peak.

    python -m slimfit.experiments.gpu_check            # needs CUDA
    python -m slimfit.experiments.gpu_check --models bert-base --batch-sizes 32

Each arm: a fresh model, the SlimFit initial pass at batch 2 (every tensor
gets optimizer state, as in a long run), one warm-up step at the measured
shape, then ``reset_peak_memory_stats`` and ``--steps`` timed steps.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback

import torch

from slimfit.experiments.bench_cases import arm_config, build_case, make_optimizer, start_session
from slimfit.report import format_bytes
from slimfit.planner import BudgetError, optimizer_like, plan_for_budget

#: this check's arms -> the shared benchmark arms they run (``planner``: the plan's config)
ARM_CONFIG = {"full": "full", "slimfit": "slimfit+compress", "slimfit+8bit": "slimfit+compress",
              "slimfit+offload": "+offload+act", "slimfit+stream": "+stream+act"}
ARMS = (*ARM_CONFIG, "planner")


DEVICE = "cuda"


def cuda_batch(model_name: str, bs: int) -> dict:
    """The case's fixed batch at ``bs`` (its throwaway model is built on the CPU)."""
    return {k: v.to(DEVICE) for k, v in build_case(model_name, bs).batch.items()}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run_arm(args, model_name, bs, arm, full_peak):
    case = build_case(model_name, 2, device=DEVICE)
    opt = make_optimizer("adamw8bit" if arm == "slimfit+8bit" else "adamw", case.model)
    plan_txt = ""
    if arm == "planner":
        small = case.batch
        case.batch = cuda_batch(model_name, bs)
        budget = int(full_peak * args.budget_fraction)
        plan = plan_for_budget(case.model, optimizer_like(opt), case.loss, budget)
        plan_txt = plan.describe()
        config = plan.config
        case.batch = small
    else:
        config = arm_config(ARM_CONFIG[arm])
    session = start_session(case, opt, config)  # every tensor trained once, at batch 2
    case.batch = cuda_batch(model_name, bs)
    session.step(case.loss)  # warm-up at this shape
    _sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    streamer = session.streamer
    if streamer is not None:
        streamer.stats = dict.fromkeys(streamer.stats, 0)  # count the timed steps only
    t0 = time.perf_counter()
    for _ in range(args.steps):
        session.step(case.loss)
    _sync()
    dt = (time.perf_counter() - t0) / args.steps
    if streamer is not None:
        st = streamer.stats
        plan_txt = (plan_txt + "\n" if plan_txt else "") + (
            f"streaming: {st['hits']} prefetched uses, {st['late']} of them still copying, "
            f"{st['on_demand']} on demand; {format_bytes(st['bytes_in'] / args.steps)} in and "
            f"{format_bytes(st['bytes_out'] / args.steps)} written back per step")
    rep = session.step(case.loss, measure=True)
    # --device cpu (a smoke test of this script): the ledger stands in for the allocator
    peak = torch.cuda.max_memory_allocated() if DEVICE == "cuda" else rep.total
    session.stop()
    return peak, dt, rep, plan_txt  # the arm's model and state are freed by the caller


def _release_memory() -> None:
    """Free the last arm's model, state and cached blocks before the next arm."""
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["bert-base", "vit-b16"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--budget-fraction", type=float, default=1 / 6)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a smoke test of the script, ledger figures only")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device; on CPU use bench_compression.py (ledger) "
                         "or --device cpu for a smoke test.")
    print(f"device: {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}")
    failures = 0
    for model_name in args.models:
        for bs in args.batch_sizes:
            rows = {}
            for arm in ARMS:
                if arm == "planner" and rows.get("full") is None:
                    continue  # the budget is a fraction of full fine-tuning's peak
                full_peak = rows["full"][0] if rows.get("full") else None
                try:
                    rows[arm] = run_arm(args, model_name, bs, arm, full_peak)
                except torch.OutOfMemoryError:
                    rows[arm] = None
                except BudgetError as e:  # the planner's own refusal, reported as such
                    print(f"  {model_name} b{bs} planner: {e}")
                    rows[arm] = None
                    continue
                except Exception:  # one broken arm must not cost the rest of a GPU session
                    print(f"  {model_name} b{bs} {arm}: FAILED\n{traceback.format_exc()}", flush=True)
                    rows[arm] = None
                    failures += 1
                    continue
                finally:
                    _release_memory()  # after the except: its traceback no longer pins the arm
                r = rows[arm]
                print(f"  {model_name} b{bs} {arm}: " + (
                    f"peak {format_bytes(r[0])}, step {r[1]:.3f} s, ledger {format_bytes(r[2].total)}"
                    if r else "out of memory"), flush=True)
                if r and r[3]:
                    print("    " + r[3].replace("\n", "\n    "))
            f = rows.get("full")
            if f is None:
                print(f"\n### {model_name}, batch {bs}: full fine-tuning ran out of memory\n")
                continue
            print(f"\n### {model_name}, batch {bs}\n")
            print("| arm | max_memory_allocated | vs full | step s | vs full | ledger total | ledger / allocator |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for arm, r in rows.items():
                if r is None:
                    print(f"| {arm} | OOM, no plan or failed (see above) | | | | | |")
                    continue
                print(f"| {arm} | {format_bytes(r[0])} | {f[0] / r[0]:.2f}x smaller | {r[1]:.3f} | "
                      f"{r[1] / f[1]:.2f} | {format_bytes(r[2].total)} | {r[2].total / r[0]:.2f} |")
            print()
    if failures:
        sys.exit(f"{failures} arm(s) failed; their tracebacks are above.")


if __name__ == "__main__":
    main()
