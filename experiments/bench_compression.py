"""Full fine-tuning vs SlimFit (freezing) vs SlimFit + static-activation
compression (and, with ``--arms``, + optimizer-state offload of frozen units,
+ weight streaming): ledger memory and step time in one run, and gradient
fidelity.

Examples:
    python experiments/bench_compression.py --model bert-base --batch-sizes 8 16 32 --extrapolate 128
    python experiments/bench_compression.py --model vit-b16 --batch-sizes 8 16 32 --extrapolate 128
    python experiments/bench_compression.py --model bert-base --fidelity --batch-sizes 8
    python -m slimfit.experiments.bench_compression --model bert-base --batch-sizes 8 32 \
        --extrapolate 128 --arms full slimfit+compress +offload +stream

Each arm uses a fresh model (same seed) and AdamW. The SlimFit arms first run
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
import gc

from slimfit.experiments.bench_cases import build_case, make_optimizer, timed_steps, train_step
from slimfit.compress import ActivationCompressor, CompressionConfig, Treatment
from slimfit.freezer import LayerFreezer
from slimfit.ledger import format_bytes
from slimfit.offload import OptimizerStateOffloader
from slimfit.stream import StreamConfig, WeightStreamer

ARMS = ("full", "slimfit", "slimfit+compress", "+offload", "+stream")
# "+offload": slimfit+compress with the optimizer state of frozen units in host memory;
# "+stream": that plus weight streaming (k=2 blocks resident, k'=1 prefetched)


def run_arm(args, arm, batch_sizes, comp_cfg):
    case = build_case(args.model, 2, args.seq_len, args.image_size, args.device)
    opt = make_optimizer("adamw", case.model)
    freezer = comp = None
    extra: dict = {}  # offloader / streamer for train_step
    if arm != "full":
        freezer = LayerFreezer(case.model, freeze_rate=args.freeze_rate, seed=0)
    if arm in ("slimfit+compress", "+offload", "+stream"):
        comp = ActivationCompressor(case.model, comp_cfg).install()
    if arm in ("+offload", "+stream"):
        extra["offloader"] = OptimizerStateOffloader(opt, [u.params for u in freezer.units])
    if arm == "+stream":
        extra["streamer"] = WeightStreamer(case.model, StreamConfig(resident=2, prefetch=1)).install()
    while freezer is not None and not freezer.scheduler.initial_pass_done:
        train_step(case, opt, freezer, **extra)
    if freezer is None:
        train_step(case, opt)  # AdamW state for every tensor
    out = {}
    for bs in batch_sizes:
        big = build_case(args.model, bs, args.seq_len, args.image_size, args.device)
        case.batch = big.batch
        del big
        train_step(case, opt, freezer, **extra)  # warm-up at this shape
        t = timed_steps(case, opt, freezer, args.timed_steps, **extra)
        out[bs] = (train_step(case, opt, freezer, measure=True, **extra), t)
        print(f"  {arm:17s} batch {bs:4d}: total {format_bytes(out[bs][0].total):>11s}, activations "
              f"{format_bytes(out[bs][0].activations):>11s}, step {out[bs][1]:.2f} s", flush=True)
    desc = case.describe.rsplit(", batch", 1)[0]
    if "streamer" in extra:
        extra["streamer"].remove()
    if comp is not None:
        comp.remove()
    del case, opt, freezer, extra
    gc.collect()
    return out, desc


def fidelity(args, comp_cfg):
    from torch.nn.functional import cosine_similarity
    bs = args.batch_sizes[0]
    case = build_case(args.model, bs, args.seq_len, args.image_size, args.device)
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
    ap.add_argument("--layernorm", default="int8", choices=["int8", "topk", "none"])
    ap.add_argument("--gelu-bits", default="int4", choices=["int4", "int8"])
    ap.add_argument("--fidelity", action="store_true")
    ap.add_argument("--arms", nargs="+", default=["full", "slimfit", "slimfit+compress"],
                    choices=ARMS, help="'full' is required (ratios are against it)")
    args = ap.parse_args(argv)
    cfg = CompressionConfig(layernorm=Treatment(method=args.layernorm),
                            gelu=Treatment(method=args.gelu_bits, group_size=64))
    if args.fidelity:
        fidelity(args, cfg)
        return
    if "full" not in args.arms:
        ap.error("--arms must include 'full': every ratio is against full fine-tuning")
    arms = list(dict.fromkeys(args.arms))
    results = {}
    for arm in arms:
        results[arm], desc = run_arm(args, arm, args.batch_sizes, cfg)
    print(f"\n## {desc}, AdamW, SlimFit r={args.freeze_rate}; compression: attention int8, "
          f"GELU {args.gelu_bits} (groups of 64), LayerNorm {args.layernorm}, FFN down input int8, "
          "dropout masks bit-packed\n")
    print("| batch | arm | params | grads | optimizer | activations | total | total vs full | "
          "activations vs full | step time | time vs full |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for bs in args.batch_sizes:
        f, tf = results["full"][bs]
        for arm in arms:
            r, t = results[arm][bs]
            print(f"| {bs} | {arm} | {format_bytes(r.parameters)} | {format_bytes(r.gradients)} | "
                  f"{format_bytes(r.optimizer_state)} | {format_bytes(r.activations)} | "
                  f"{format_bytes(r.total)} | {f.total / r.total:.2f}x smaller | "
                  f"{f.activations / r.activations:.2f}x smaller | {t:.2f} s | {t / tf:.2f} |")
    if args.extrapolate and len(args.batch_sizes) >= 2:
        bsz = args.batch_sizes
        print(f"\nExtrapolation to batch {args.extrapolate} (activations linear in batch: fit on "
              f"batches {bsz[0]} and {bsz[-1]}, residual at the other points shown):\n")
        print("| arm | activations @%d | total @%d | total vs full | activations vs full | max residual |"
              % (args.extrapolate, args.extrapolate))
        print("|---|---:|---:|---:|---:|---:|")
        ext = {}
        for arm in arms:
            pts = {b: results[arm][b][0] for b in bsz}
            slope = (pts[bsz[-1]].activations - pts[bsz[0]].activations) / (bsz[-1] - bsz[0])
            icpt = pts[bsz[0]].activations - slope * bsz[0]
            resid = max(abs(icpt + slope * b - pts[b].activations) / pts[b].activations for b in bsz)
            act = icpt + slope * args.extrapolate
            r = pts[bsz[-1]]
            ext[arm] = (act, r.parameters + r.gradients + r.optimizer_state + act, resid)
        for arm in arms:
            act, tot, resid = ext[arm]
            print(f"| {arm} | {format_bytes(act)} | {format_bytes(tot)} | "
                  f"{ext['full'][1] / tot:.2f}x smaller | {ext['full'][0] / act:.2f}x smaller | "
                  f"{100 * resid:.3f}% |")


if __name__ == "__main__":
    main()
