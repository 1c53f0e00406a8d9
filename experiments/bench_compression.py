"""Full fine-tuning vs SlimFit (freezing) vs SlimFit + static-activation
compression (and, with ``--arms``, + optimizer-state offload of frozen units,
+ weight streaming): ledger memory and step time in one run, and gradient
fidelity.

Examples:
    python experiments/bench_compression.py --model bert-base --batch-sizes 8 16 32 --extrapolate 128
    python experiments/bench_compression.py --model vit-b16 --batch-sizes 8 16 32 --extrapolate 128
    python experiments/bench_compression.py --model bert-base --fidelity --batch-sizes 8
    python -m slimfit.experiments.bench_compression --model bert-base --batch-sizes 8 32 \
        --extrapolate 128 --arms full slimfit slimfit_offload slimfit_stream
    python -m slimfit.experiments.bench_compression --model vit-b16 --batch-sizes 2 4 8 \
        --extrapolate 128 --arms full slimfit slimfit_offload slimfit_stream --linear-input none

Each arm uses a fresh model (same seed), loaded with SDPA attention as
transformers and timm do by default (``--attn eager`` for the eager model,
whose probabilities compression can see), and AdamW. The SlimFit arms first run
their initial pass at batch 2 (every unit trained once, so AdamW state exists
for every tensor, as in a long run; state size does not depend on the batch),
then are timed at each batch size. Saved activations are exactly linear in
the batch size, so ``--extrapolate`` fits bytes = a + b * batch on the
measured points (the residual on the third point is printed) and reports the
figure at that batch *as an extrapolation*.

``--fidelity``: one batch, every tensor trainable, dropout off; cosine
similarity between the exact and the compressed-path gradient of every
trainable tensor whose exact gradient is not numerically zero (norm above
1e-4 of the largest: e.g. key biases have an exactly zero gradient).
"""

from __future__ import annotations

import argparse

import dataclasses

from slimfit import ActivationCompressor, CompressionConfig, Treatment
from slimfit.experiments.bench_cases import extrapolation_table, measure_method, memory_table
from slimfit.experiments.runs import RUNS
from slimfit.experiments.zoo import build_case

#: the registry's runs this benchmark compares: full fine-tuning and SlimFit's
#: own (AdamW, no peer), each at the command line's rate and compression
ARMS = tuple(n for n, r in RUNS.items() if r.lora is None and not r.checkpointing
             and r.optimizer == "adamw")


def run_arm(args, arm, batch_sizes, comp_cfg):
    """Registry run ``arm`` at the command line's freezing rate and compression
    settings, at every batch size: a :class:`RunResult`."""
    run = RUNS[arm]
    if run.session is not None:
        run = run.variant(arm, session=dataclasses.replace(
            run.session, freezing=dataclasses.replace(run.session.freezing,
                                                      freeze_rate=args.freeze_rate),
            compression=comp_cfg if run.session.compression is not None else None))
    return measure_method(args.model, run, batch_sizes, seq_len=args.seq_len,
                          image_size=args.image_size, device=args.device, attn=args.attn,
                          timed=args.timed_steps, label=arm)


def fidelity(args, comp_cfg):
    from torch.nn.functional import cosine_similarity
    bs = args.batch_sizes[0]
    case = build_case(args.model, bs, args.seq_len, args.image_size, args.device, args.attn)
    case.model.eval()  # no dropout: the two passes must see the same function

    def grads():
        case.model.zero_grad(set_to_none=True)
        case.loss().backward()
        return {n: p.grad.detach().double().flatten().clone()
                for n, p in case.model.named_parameters() if p.grad is not None}

    exact = grads()
    with ActivationCompressor(case.model, comp_cfg):
        approx = grads()
    big = max(g.norm().item() for g in exact.values())
    cos = {n: cosine_similarity(exact[n], approx[n], dim=0).item()
           for n in exact if exact[n].norm().item() > 1e-4 * big}
    worst = sorted(cos, key=cos.get)[:5]
    print(f"\n## gradient fidelity, {case.describe}")
    print(f"{len(cos)} of {len(exact)} tensors with a non-zero exact gradient; "
          f"minimum cosine similarity {cos[worst[0]]:.5f} ({worst[0]})")
    for n in worst[1:]:
        print(f"  {cos[n]:.5f} {n}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bert-base", choices=["bert-base", "vit-b16", "minilm"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--extrapolate", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--freeze-rate", type=float, default=0.9)
    ap.add_argument("--timed-steps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                    help="sdpa: as transformers/timm load models by default (compression "
                         "saves q, k, v int8 and recomputes attention in backward); eager: the "
                         "model stores the probabilities, compressed")
    ap.add_argument("--layernorm", default="int8", choices=["int8", "topk", "none"])
    ap.add_argument("--gelu-bits", default="int4", choices=["int4", "int8"])
    ap.add_argument("--linear-input", default="int8", choices=["none", "int8"],
                    help="inputs saved by trained Linears other than the FFN down-projection "
                         "(dynamic activations): int8 per token (the default) or kept")
    ap.add_argument("--fidelity", action="store_true")
    ap.add_argument("--arms", nargs="+", default=["full", "slimfit_nocompress", "slimfit"],
                    choices=ARMS, help="registry runs (experiments/runs.py); 'full' is required "
                                       "(ratios are against it)")
    args = ap.parse_args(argv)
    cfg = CompressionConfig(layernorm=Treatment(method=args.layernorm),
                            gelu=Treatment(method=args.gelu_bits, group_size=64),
                            linear_input=Treatment(method=args.linear_input))
    if args.fidelity:
        fidelity(args, cfg)
        return
    if "full" not in args.arms:
        ap.error("--arms must include 'full': every ratio is against full fine-tuning")
    arms = list(dict.fromkeys(args.arms))
    arms.remove("full")
    runs = [run_arm(args, arm, args.batch_sizes, cfg) for arm in ["full", *arms]]
    print(f"\n## {runs[0].describe}, AdamW, SlimFit r={args.freeze_rate}; compression: attention "
          f"int8, GELU {args.gelu_bits} (groups of 64), LayerNorm {args.layernorm}, FFN down input "
          f"int8, other Linear inputs {args.linear_input}, dropout masks bit-packed\n")
    print("\n".join(f"- {n}" for r in runs for n in r.notes) + "\n")
    print(memory_table(runs, args.batch_sizes))
    if args.extrapolate and len(args.batch_sizes) >= 2:
        bsz = args.batch_sizes
        print(f"\nExtrapolation to batch {args.extrapolate} (activations linear in batch: fit on "
              f"batches {bsz[0]} and {bsz[-1]}, residual at the other points shown):\n")
        print(extrapolation_table(runs, bsz, args.extrapolate))


if __name__ == "__main__":
    main()
