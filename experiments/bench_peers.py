"""SlimFit against what a user would otherwise run, in one table: ledger memory
and step time of the runs of :mod:`slimfit.experiments.runs` (full
fine-tuning, AdamW8bit, activation checkpointing, LoRA, LoRA + checkpointing,
SlimFit r=0.9 + compression, SlimFit r=0.9 + checkpointing, LoRA + compression).

Examples:
    python -m slimfit.experiments.bench_peers --model minilm --batch-sizes 32 --seq-len 64
    python -m slimfit.experiments.bench_peers --model bert-base --batch-sizes 4 8 16 --extrapolate 128
    python -m slimfit.experiments.bench_peers --model vit-b16 --batch-sizes 2 4 8 --extrapolate 128

The baseline (first row, every ratio is against it) is full fine-tuning of the
model as loaded by default: SDPA attention (transformers'
``attn_implementation="sdpa"``, timm's ``fused_attn``). Rows marked "eager
attention" are the same methods on the eager model, secondary: eager
attention stores the T x T probabilities (and SlimFit compresses them), which
no user runs on a GPU. What SDPA stores depends on the kernel: on a CPU with
attention dropout (BERT's default 0.1) it falls back to the math kernel and
stores the probabilities; without dropout (``--attention-dropout 0``, and
ViT's default) the flash kernel stores q, k, v, the output and a logsumexp.
SlimFit's compression leaves fused attention uncompressed today (the notes
say how many modules it left alone).

Every method: a fresh model (same seed), AdamW (8-bit where named), its
initial pass at batch 2 (every trained tensor gets optimizer state), then per
batch a warm-up step, ``--timed-steps`` timed steps (median) and one step
under the ledger. Under checkpointing (activations marked ``*``) the ledger
sees the blocks' inputs that checkpoint keeps but not the saved tensors of the
block being recomputed; those are measured apart and added (an upper bound).
``--extrapolate`` fits activations = a + b * batch on the first and last batch
(residual at the others shown) and reports the figure at that batch as an
extrapolation.
"""

from __future__ import annotations

import argparse
import dataclasses

from slimfit.experiments.bench_cases import extrapolation_table, measure_method, memory_table
from slimfit.experiments.runs import RUNS
from slimfit.experiments.zoo import CASES

#: the registry's runs this benchmark compares by default: full fine-tuning, the peers a
#: user would otherwise run, SlimFit, and their combinations
PEERS = ("full", "full_8bit", "checkpointing", "lora", "lora_checkpointing", "slimfit",
         "slimfit_checkpointing", "lora_compress")


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bert-base", choices=CASES)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--extrapolate", type=int, default=None, help="batch to extrapolate to")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--methods", nargs="+", default=list(PEERS), choices=list(RUNS),
                    help="'full' is measured first whatever the order: it is the baseline")
    ap.add_argument("--eager-methods", nargs="*", default=["full", "slimfit"],
                    choices=list(RUNS), help="secondary rows on the eager-attention model")
    ap.add_argument("--attention-dropout", type=float, default=None,
                    help="override the HF models' attention dropout (default: theirs)")
    ap.add_argument("--lora-dropout", type=float, default=None,
                    help="override LoRA's dropout (default 0.1, peers.LoraSpec)")
    ap.add_argument("--timed-steps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    def method(name):
        m = RUNS[name]
        if m.lora is not None and args.lora_dropout is not None:
            m = dataclasses.replace(m, lora=dataclasses.replace(m.lora, dropout=args.lora_dropout))
        return m

    common = dict(seq_len=args.seq_len, image_size=args.image_size, device=args.device,
                  attention_dropout=args.attention_dropout, timed=args.timed_steps)
    bsz = sorted(set(args.batch_sizes))
    runs = []
    for name in ["full", *(n for n in dict.fromkeys(args.methods) if n != "full")]:
        m = method(name)
        runs.append(measure_method(args.model, m, bsz, attn="sdpa", label=f"{name}: {m.label()}",
                                   **common))
    for name in dict.fromkeys(args.eager_methods):
        m = method(name)
        runs.append(measure_method(args.model, m, bsz, attn="eager",
                                   label=f"{name}: {m.label()}, eager attention", **common))

    print(f"\n## {runs[0].describe}: fine-tuning methods, ledger memory and step time, "
          f"baseline = first row (full fine-tuning as loaded, SDPA)\n")
    print("\n".join(f"- {n}" for r in runs for n in r.notes))
    if any(m.recompute for r in runs for m in r.by_batch.values()):
        print("- `*`: under checkpointing, one block's recomputed saved tensors (measured apart) "
              "are added to the ledger's peak: an upper bound")
    print("\n" + memory_table(runs, bsz))
    if args.extrapolate and len(bsz) >= 2:
        print(f"\nExtrapolation to batch {args.extrapolate} (activations linear in batch: fit on "
              f"batches {bsz[0]} and {bsz[-1]}, residual at the other points shown):\n")
        print(extrapolation_table(runs, bsz, args.extrapolate))
    return runs


if __name__ == "__main__":
    main()
