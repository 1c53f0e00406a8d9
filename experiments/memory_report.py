"""Print the ledger's training-memory breakdown of full fine-tuning.

Examples:
    python experiments/memory_report.py --model minilm --batch-size 8
    python experiments/memory_report.py --model bert-base vit-b16 --batch-size 8 --crosscheck
    python experiments/memory_report.py --model bert-base --batch-size 32 --device cuda

One real training step per model (after ``--warmup`` steps, so Adam state
exists and the CUDA allocator is warm), counted by ``slimfit.memory.ledger``. With
``--crosscheck`` the saved activations are also counted independently with a
bare ``saved_tensors_hooks`` pass, and with CUDA the allocator's peak is
printed beside the ledger total.
"""

from __future__ import annotations

import argparse
import time

import torch

from slimfit.experiments.bench_cases import make_optimizer
from slimfit.experiments.zoo import CASES, build_case
from slimfit import measure_step
from slimfit import format_bytes


def independent_saved_bytes(case) -> int:
    """Unique storages saved for backward in one forward, parameters excluded."""
    excluded = {t.untyped_storage().data_ptr() for t in [*case.model.parameters(),
                                                         *case.model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = case.loss()
    del loss
    return sum(seen.values())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["minilm"], choices=CASES)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "adamw8bit"])
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured steps before the measured one")
    ap.add_argument("--depth", type=int, default=4, help="fold module names to this many parts")
    ap.add_argument("--crosscheck", action="store_true",
                    help="also count saved activations with a bare saved_tensors_hooks pass")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device} requested but CUDA is not available on this machine")

    for name in args.model:
        case = build_case(name, args.batch_size, args.seq_len, args.image_size, args.device, args.attn)
        opt = make_optimizer(args.optimizer, case.model)
        n = sum(p.numel() for p in case.model.parameters())
        print(f"\n## {case.describe}, optimizer {args.optimizer}, {n:,} parameters")
        for _ in range(args.warmup):
            measure_step(case.model, opt, lambda: case.loss().backward())
        t0 = time.perf_counter()
        report = measure_step(case.model, opt, lambda: case.loss().backward())
        dt = time.perf_counter() - t0
        print(report.summary_table())
        print(f"\nparameters == 4 bytes x {n:,}: {report.parameters == 4 * n}; measured step {dt:.2f} s")
        if args.crosscheck:
            ind = independent_saved_bytes(case)
            case.model.zero_grad(set_to_none=True)
            print(f"independent saved-tensor count: {format_bytes(ind)}; ledger/independent = "
                  f"{report.activations / ind:.4f}")
        if report.cuda is not None:
            print(f"ledger total / cuda max_memory_allocated = "
                  f"{report.total / report.cuda.max_allocated:.3f}")
        print(f"\nper module (depth {args.depth}):\n")
        print(report.module_table(args.depth))


if __name__ == "__main__":
    main()
