"""GPU check of the memory modes, in one go (a few minutes on one H100):
``torch.cuda.max_memory_allocated`` and step time for BERT-base (seq 128) and
ViT-B/16 (224 px) at batch 32 and 128, under bf16 autocast by default, for

* full fine-tuning of the model as loaded (SDPA attention, AdamW): the baseline,
* the peers a user would otherwise run (``slimfit.experiments.runs``):
  AdamW8bit, gradient checkpointing, LoRA r=8, LoRA + checkpointing,
  LoRA + compression,
* SlimFit r=0.9 + static-activation compression (fused attention compressed),
  also with AdamW8bit,
* the same with optimizer-state offload of frozen units and activation offload,
* the same plus Superpipeline-style weight streaming of frozen weights
  (k=2 blocks resident, k'=1 prefetched on a side stream; the prefetch hit
  rate and late copies are printed),
* the budget planner at ``--budget-fraction`` of full fine-tuning's peak,
* full fine-tuning with eager attention, a secondary row,

with ratios against the baseline, and the ledger total beside the
allocator's peak. An arm whose package is missing (bitsandbytes, peft) is
skipped with the reason printed.

    python -m slimfit.experiments.gpu_check            # needs CUDA
    python -m slimfit.experiments.gpu_check --models bert-base --batch-sizes 32
    # the paper's scenarios, measured at batch 128 (bench_paper extrapolates on CPU)
    python -m slimfit.experiments.gpu_check --models bert-base-squad --seq-len 384 \
        --batch-sizes 128 --arms full slimfit planner
    python -m slimfit.experiments.gpu_check --models vit-b16 --image-size 384 \
        --batch-sizes 128 --arms full slimfit planner

On the lent device machine (its own torch/transformers/peft, no network; see
shared/reference/gpu-device.md), one command installs the project without
dependencies and runs everything, writing ``$OUT/gpu_check.md``::

    python3 -m pip install -q --no-deps --no-build-isolation -e . && \
        HF_HUB_OFFLINE=1 timeout 470 python3 -m slimfit.experiments.gpu_check

Each arm: a fresh model, the SlimFit initial pass at batch 2 (every tensor
gets optimizer state, as in a long run), one warm-up step at the measured
shape, then ``reset_peak_memory_stats`` and ``--steps`` timed steps.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback

import torch

from slimfit import BudgetError, SessionConfig, SlimFitSession, format_bytes, plan_for_budget
from slimfit.experiments.bench_cases import make_optimizer
from slimfit.experiments.runs import RUNS, Run
from slimfit.experiments.zoo import build_case
from slimfit.planning.planner import optimizer_like

#: this check's arms: registry runs (experiments/runs.py), full fine-tuning first
#: (the baseline), and the planner's choice at --budget-fraction of its peak
ARMS = ("full", "full_8bit", "checkpointing", "lora", "lora_checkpointing", "lora_compress",
        "slimfit", "slimfit_8bit", "slimfit_offload_act", "slimfit_stream_act", "full_eager",
        "planner")


DEVICE = "cuda"


def missing_package(method: Run) -> str | None:
    """The package an arm needs that this machine lacks (the GPU image has no
    bitsandbytes), or None."""
    import importlib.util
    needs = (["bitsandbytes"] if method.optimizer == "adamw8bit" else []) + \
        (["peft"] if method.lora is not None else [])
    return next((n for n in needs if importlib.util.find_spec(n) is None), None)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run_arm(args, model_name, bs, arm, full_peak):
    method = RUNS.get(arm, RUNS["full"])  # the planner starts from full fine-tuning's model
    # bf16 autocast by default (Case.loss): how a GPU user fine-tunes
    case = build_case(model_name, 2, args.seq_len, args.image_size, device=DEVICE,
                      attn=method.attention or "sdpa", precision=args.precision)
    case.model = method.apply(case.model)
    opt = make_optimizer(method.optimizer, case.model)
    plan_txt = ""
    loss = case.loss

    if arm == "planner":
        case.rebatch(bs)
        budget = int(full_peak * args.budget_fraction)
        plan = plan_for_budget(case.model, optimizer_like(opt), loss, budget)
        plan_txt = plan.describe()
        config = plan.config
        case.rebatch(2)
    else:
        config = method.session or SessionConfig()
    session = SlimFitSession(case.model, config).start(opt)
    session.run_initial_pass(loss)  # every tensor trained once, at batch 2
    case.rebatch(bs)
    session.step(loss)  # warm-up at this shape
    _sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    streamer = session.streamer
    if streamer is not None:
        streamer.stats = dict.fromkeys(streamer.stats, 0)  # count the timed steps only
    t0 = time.perf_counter()
    for _ in range(args.steps):
        session.step(loss)
    _sync()
    dt = (time.perf_counter() - t0) / args.steps
    if streamer is not None:
        st = streamer.stats
        plan_txt = (plan_txt + "\n" if plan_txt else "") + (
            f"streaming: {st['hits']} prefetched uses, {st['late']} of them still copying, "
            f"{st['on_demand']} on demand; {format_bytes(st['bytes_in'] / args.steps)} in and "
            f"{format_bytes(st['bytes_out'] / args.steps)} written back per step")
    rep = session.step(loss, measure=True)
    # --device cpu (a smoke test of this script): the ledger stands in for the allocator
    peak = torch.cuda.max_memory_allocated() if DEVICE == "cuda" else rep.total
    session.stop()
    return peak, dt, rep, plan_txt  # the arm's model and state are freed by the caller


class _Tee:
    """Write to the console and to a file (the device machine returns files)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for st in self.streams:
            st.write(text)
            st.flush()

    def flush(self):
        for st in self.streams:
            st.flush()

    def isatty(self) -> bool:  # libraries ask before colouring output
        return False


def _release_memory() -> None:
    """Free the last arm's model, state and cached blocks before the next arm."""
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["bert-base", "vit-b16"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--seq-len", type=int, default=128, help="text models' sequence length")
    ap.add_argument("--image-size", type=int, default=224, help="ViT's image size")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--budget-fraction", type=float, default=1 / 6)
    ap.add_argument("--out", default=os.environ.get("OUT"),
                    help="folder for a copy of everything printed (gpu_check.md); default $OUT")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                    help="bf16: every arm's forward under bf16 autocast (bf16-mixed)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                    help="'full' is the baseline (ratios and the planner's budget need it)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a smoke test of the script, ledger figures only")
    args = ap.parse_args(argv)
    if args.out:  # the device machine returns only what is written under $OUT
        os.makedirs(args.out, exist_ok=True)
        sys.stdout = _Tee(sys.stdout, open(os.path.join(args.out, "gpu_check.md"), "w"))
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
            for arm in args.arms:
                if arm == "planner" and rows.get("full") is None:
                    continue  # the budget is a fraction of full fine-tuning's peak
                full_peak = rows["full"][0] if rows.get("full") else None
                missing = missing_package(RUNS.get(arm, RUNS["full"]))
                if missing:
                    print(f"  {model_name} b{bs} {arm}: skipped, {missing} is not installed here")
                    rows[arm] = None
                    continue
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
