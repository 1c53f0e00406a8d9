"""Decoder LLMs on the ledger, peers in the same run.

    # the issue's check: Llama-style and GPT-2 at BERT-base width, 12 layers, batch 4 x 256,
    # fp32, SDPA, the causal-LM loss from labels: saved activations and gradient cosine
    python -m slimfit.experiments.bench_decoders saved --shapes llama-bert-width gpt2
    # whole-step memory at real LLM width, a few layers measured, extrapolated to full depth
    python -m slimfit.experiments.bench_decoders step --shape llama-3.2-1b --batch 4 --seq 2048
    python -m slimfit.experiments.bench_decoders step --shape llama-3-8b --batch 1 --seq 2048 \\
        --runs full slimfit_stream
    # the rate a fraction of the bytes: shallow models at the full-depth budget
    python -m slimfit.experiments.bench_decoders step --shape llama-3-8b --batch 1 --seq 2048 \\
        --runs slimfit_stream_bytes slimfit_stream_bytes_8bit --layers 6 8
    # the extrapolation checked against a full-depth run at a smaller shape
    python -m slimfit.experiments.bench_decoders validate

``saved``: one training step of each model as loaded (SDPA attention) under
the ledger, full fine-tuning against SlimFit r=0.9 + compression + the chunked
LM loss; the largest tensors still saved at the peak are listed; and the
cosine between every trainable tensor's gradient with compression and
without (dropout off, every tensor trainable, the same batch).

``step``: the whole step (weights + gradients + optimizer state + peak saved
activations), in bf16 (weights, gradients and AdamW state in bf16, as the
full fine-tuning baseline runs), of each registry run at ``--layers`` depths,
then a + b * layers at the model's depth. Each figure is the planner's
steady-state bound from one measured step (``slimfit.planning.calibration``:
every unit's optimizer state once trained, the largest trained set's
gradients), so a rotating run is not flattered by its first steps; under
checkpointing one block's recomputed saves are added (the ledger cannot see
them). Under ``rate_of="bytes"`` each shallow model is measured at the rate
that gives it the full-depth model's byte budget, so the trained set is the
deep model's at every depth (measure where the streamed blocks outweigh one
block plus that budget, else the resident weights are every block's and the
line through them overstates).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics

import torch

from slimfit import (CompressionConfig, LayerFreezer, SessionConfig, SlimFitConfig, SlimFitSession,
                     format_bytes)
from slimfit.compression.config import Treatment
from slimfit.experiments.bench_cases import recompute_bytes
from slimfit.experiments.peers import LoraSpec
from slimfit.experiments.runs import RUNS, Run, build_optimizer
from slimfit.experiments.zoo import SHAPES, decoder, llm, lm_batch
from slimfit.memory.tracker import SavedTensorTracker
from slimfit.planning.calibration import calibrate

#: the decoder runs: the issue's peers and SlimFit's own, each a registry run or a variant
DECODER_RUNS = {
    "full": RUNS["full"],
    "checkpointing": RUNS["checkpointing"],
    "full_8bit": RUNS["full_8bit"],
    "lora16": Run(name="lora16", lora=LoraSpec(r=16, alpha=32, dropout=0.0, train_head=False)),
    "lora16_compress": Run(name="lora16_compress",
                           lora=LoraSpec(r=16, alpha=32, dropout=0.0, train_head=False),
                           session=SessionConfig(compression=CompressionConfig(), chunked_loss=True)),
    "slimfit": RUNS["slimfit"].variant("slimfit", session=dataclasses.replace(
        RUNS["slimfit"].session, chunked_loss=True)),
    "slimfit_stream": RUNS["slimfit_stream"].variant("slimfit_stream", session=dataclasses.replace(
        RUNS["slimfit_stream"].session, chunked_loss=True)),
}
#: every tensor rotating (the LM head too: it is pretrained, not a new head), the rate a
#: fraction of the bytes: a step trains at most 7% of them (at Llama-3-8B width the
#: embedding and the head are 6.5% each: the highest rate at which they still train is 0.934)
DECODER_RUNS["slimfit_stream_bytes"] = DECODER_RUNS["slimfit_stream"].variant(
    "slimfit_stream_bytes", session=dataclasses.replace(
        DECODER_RUNS["slimfit_stream"].session, freezing=dataclasses.replace(
            DECODER_RUNS["slimfit_stream"].session.freezing, freeze_rate=0.93, rate_of="bytes",
            train_new_heads=False)))
DECODER_RUNS["slimfit_stream_bytes_8bit"] = DECODER_RUNS["slimfit_stream_bytes"].variant(
    "slimfit_stream_bytes_8bit", optimizer="adamw8bit")
#: the least device memory short of activation offload: the same with the gated MLPs'
#: operands in 4 bits (groups of 32; gradient cosine >= 0.99, docs/results.md)
DECODER_RUNS["slimfit_lean"] = DECODER_RUNS["slimfit_stream_bytes_8bit"].variant(
    "slimfit_lean", session=dataclasses.replace(
        DECODER_RUNS["slimfit_stream_bytes_8bit"].session,
        compression=CompressionConfig(mlp=Treatment(method="int4", group_size=32))))
#: ... with the (tied) embedding kept frozen by the user, as many LLM recipes do
#: (:data:`FROZEN_EMBEDDING`)
DECODER_RUNS["slimfit_lean_frozen_embedding"] = DECODER_RUNS["slimfit_lean"].variant(
    "slimfit_lean_frozen_embedding")
#: ... the rate counted in units: at many tokens per step the byte rule's worst trained set
#: is every small projection at once, each keeping a large input (docs/results.md)
DECODER_RUNS["slimfit_lean_frozen_embedding_units"] = DECODER_RUNS["slimfit_lean"].variant(
    "slimfit_lean_frozen_embedding_units", session=dataclasses.replace(
        DECODER_RUNS["slimfit_lean"].session, freezing=dataclasses.replace(
            DECODER_RUNS["slimfit_lean"].session.freezing, rate_of="units")))
#: runs whose model has its input embedding frozen (requires_grad off) before SlimFit sees it
FROZEN_EMBEDDING = {"slimfit_lean_frozen_embedding", "slimfit_lean_frozen_embedding_units"}


def build(shape: str, run: Run, layers: int | None = None) -> torch.nn.Module:
    """``run``'s bf16 model of ``shape`` at ``layers`` blocks (its embedding frozen
    for the :data:`FROZEN_EMBEDDING` runs)."""
    model = run.apply(llm(shape, layers=layers, dtype=torch.bfloat16))
    if run.name in FROZEN_EMBEDDING:
        model.get_input_embeddings().weight.requires_grad_(False)
    return model


def with_rate(run: Run, rate: float) -> Run:
    """``run`` at freezing rate ``rate`` (runs without freezing as they are)."""
    if run.session is None or run.session.freezing is None:
        return run
    return run.variant(run.name, session=dataclasses.replace(run.session, freezing=dataclasses.replace(
        run.session.freezing, freeze_rate=rate)))


def prepared(name: str, rate: float | None, shape: str, depth: int | None = None
             ) -> tuple[Run, int | None]:
    """Run ``name`` (at ``rate`` if given) and, under a byte rate, the byte budget
    of its model at ``depth`` (default: the shape's) that every depth measures at."""
    run = DECODER_RUNS[name] if rate is None else with_rate(DECODER_RUNS[name], rate)
    f = run.session.freezing if run.session is not None else None
    return run, (full_depth_budget(shape, run, depth) if f is not None and f.rate_of == "bytes"
                 else None)


# -- saved activations at BERT-base width ----------------------------------------------------

def saved(shape: str, batch: int, seq: int, top: int = 8) -> list[str]:
    s = SHAPES[shape]
    lines = [f"### {shape}: {s.family}, {s.layers} layers, width {s.hidden}, vocab {s.vocab}, "
             f"batch {batch} x {seq}, fp32, SDPA, loss from labels\n"]
    torch.manual_seed(0)
    model = llm(shape, dropout=0.1 if s.family == "gpt2" else 0.0)  # GPT-2's own dropout
    b = lm_batch(model, n=batch, seq=seq)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    rows = {}
    for name, config in (("full fine-tuning (SDPA, as loaded)", SessionConfig()),
                         ("SlimFit r=0.9 + compression + chunked loss", SessionConfig(
                             freezing=SlimFitConfig(freeze_rate=0.9),
                             compression=CompressionConfig(), chunked_loss=True))):
        model.load_state_dict(init)
        session = SlimFitSession(model, config).start(torch.optim.AdamW(model.parameters(), lr=0))
        session.begin_step()
        with SavedTensorTracker(model, top=top) as tracker:
            loss = model(**b).loss
            session.record_loss(loss)
            loss.backward()
        tracker.finalize()
        session.before_optimizer_step()
        session.end_step()
        session.stop()
        model.zero_grad(set_to_none=True)
        rows[name] = tracker
    full, sf = rows.values()
    lines += ["| run | saved activations (peak) | vs full |", "|---|---:|---:|"]
    lines += [f"| {n} | {format_bytes(t.peak)} | {full.peak / t.peak:.2f}x smaller |"
              for n, t in rows.items()]
    lines += ["", "Largest tensors still saved at SlimFit's peak:", "",
              "| bytes | module | shape | dtype |", "|---:|---|---|---|"]
    lines += [f"| {format_bytes(nb)} | {mod} | {tuple(sh)} | {dt} |"
              for nb, mod, sh, dt in sf.peak_tensors]
    model.load_state_dict(init)
    lines += ["", cosine_line(model.eval(), b)]
    return lines


def cosine_line(model, batch) -> str:
    """The lowest cosine between compressed and exact gradients over the tensors
    with a non-negligible gradient (every tensor trainable, dropout off)."""
    def grads(config):
        model.zero_grad(set_to_none=True)
        session = SlimFitSession(model, config).start(torch.optim.SGD(model.parameters(), lr=0))
        model(**batch).loss.backward()
        session.stop()
        return {n: p.grad.double().flatten() for n, p in model.named_parameters() if p.grad is not None}
    ref = grads(SessionConfig())
    got = grads(SessionConfig(compression=CompressionConfig(), chunked_loss=True))
    big = max(g.norm() for g in ref.values())
    cos = {n: float(torch.nn.functional.cosine_similarity(ref[n], got[n], dim=0))
           for n in ref if ref[n].norm() > 1e-4 * big}
    worst = min(cos, key=cos.get)
    return (f"Gradient cosine, compressed vs exact, every tensor trainable: min {cos[worst]:.4f} "
            f"({worst}), median {statistics.median(cos.values()):.4f}, over {len(cos)} tensors.")


# -- the whole step at LLM width --------------------------------------------------------------

def candidate_bytes(model: torch.nn.Module, freezing: SlimFitConfig) -> int:
    """The bytes of ``freezing``'s candidate units in ``model``."""
    units = LayerFreezer(model, dataclasses.replace(freezing, freeze_rate=0.0)).units
    return sum(u.nbytes for u in units)


def full_depth_budget(shape: str, run: Run, depth: int | None = None) -> int:
    """Under ``rate_of="bytes"``, the most bytes a step of ``run``'s model at
    ``depth`` (default: the shape's) trains (its candidates counted on the meta
    device: no memory)."""
    with torch.device("meta"):
        model = build(shape, run, depth)
    # refuses a rate at which a unit could never train
    return LayerFreezer(model, run.session.freezing).scheduler.trained_bytes_budget


def step_bytes(shape: str, run: Run, layers: int, batch: int, seq: int,
               budget: int | None = None) -> dict[str, int]:
    """The planner's steady-state bound of ``run`` on ``shape`` with ``layers``
    blocks; ``budget`` (``rate_of="bytes"``): the trained bytes per step to keep
    (the full-depth model's), the rate of the shallow model set to match."""
    torch.manual_seed(0)
    model = build(shape, run, layers)
    b = lm_batch(model, n=batch, seq=seq)
    loss = lambda: model(**b).loss  # noqa: E731
    make = lambda ps: build_optimizer(run.optimizer, ps, lr=1e-5)  # noqa: E731
    config = run.session or SessionConfig()
    if budget is not None:
        rate = 1.0 - budget / candidate_bytes(model, config.freezing)
        if rate < 0:
            raise SystemExit(f"{layers} layers of {shape} hold fewer candidate bytes than the "
                             f"full-depth budget ({budget}); measure at more layers (--layers).")
        config = dataclasses.replace(config, freezing=dataclasses.replace(config.freezing,
                                                                          freeze_rate=rate))
    if config.stream is not None:  # one block resident: the least weight memory streaming allows
        config = dataclasses.replace(config, stream=dataclasses.replace(config.stream, resident=2,
                                                                        prefetch=1))
    by_k = calibrate(model, make, loss, config, margin=0.0)
    e = by_k[min(by_k, key=lambda k: by_k[k]["total"])]
    if run.checkpointing:  # one block's recomputed saves, unseen by the ledger
        from slimfit.experiments.zoo import Case
        e = dict(e, activations=e["activations"] + recompute_bytes(Case("llm", model, b, "")))
        e["total"] = sum(e[c] for c in ("parameters", "gradients", "optimizer_state", "activations"))
    del model
    gc.collect()
    return e


def extrapolate(points: dict[int, dict[str, int]], depth: int) -> dict[str, int]:
    """Each category on the line through the two measured depths, at ``depth``."""
    (l0, a), (l1, b) = sorted(points.items())[:1] + sorted(points.items())[-1:]
    return {c: int(a[c] + (b[c] - a[c]) * (depth - l0) / (l1 - l0))
            for c in ("parameters", "gradients", "optimizer_state", "activations", "total")}


def step_table(shape: str, runs: list[str], layers: list[int], batch: int, seq: int,
               rate: float | None = None) -> list[str]:
    s = SHAPES[shape]
    lines = [f"### {shape} at full depth ({s.layers} layers) from {layers} layers measured: "
             f"batch {batch} x {seq}, bf16, SDPA, loss from labels\n",
             "| run | weights | gradients | optimizer | activations | total | vs full |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    totals = {}
    for name in runs:
        run, budget = prepared(name, rate, shape)
        points = {n: step_bytes(shape, run, n, batch, seq, budget) for n in layers}
        e = extrapolate(points, s.layers)
        totals[name] = e["total"]
        base = totals.get("full")  # None: full fine-tuning not in this run
        lines.append(f"| {name}: {run.label()} | " + " | ".join(
            format_bytes(e[c]) for c in ("parameters", "gradients", "optimizer_state", "activations",
                                         "total"))
            + (f" | {base / e['total']:.2f}x smaller |" if base else " | (full not run) |"))
        print(lines[-1], flush=True)
    return lines


def validate(family_shape: str = "llama-bert-width", depth: int = 16, batch: int = 2,
             seq: int = 128, layers: tuple[int, int] = (2, 4),
             runs: tuple[str, ...] = ("full", "slimfit"), rate: float | None = None) -> list[str]:
    """Extrapolation from ``layers`` against a real ``depth``-layer model. From 1
    and 2 layers it is 4.8% low for SlimFit at depth 8: with so few units the
    trained set is the embedding and the head whatever the depth, so gradients
    and activations do not grow yet; from 2 and 4 it is within 0.1%. A byte-rate
    run is measured at ``depth``'s budget at every depth, as ``step`` does."""
    lines = [f"### extrapolation check: {family_shape} at {depth} layers from {layers}, "
             f"batch {batch} x {seq}\n",
             "| run | extrapolated total | measured total | error |", "|---|---:|---:|---:|"]
    for name in runs:
        run, budget = prepared(name, rate, family_shape, depth)
        est = extrapolate({n: step_bytes(family_shape, run, n, batch, seq, budget)
                           for n in layers}, depth)
        real = step_bytes(family_shape, run, depth, batch, seq, budget)
        err = (est["total"] - real["total"]) / real["total"]
        lines.append(f"| {name} | {format_bytes(est['total'])} | {format_bytes(real['total'])} | "
                     f"{100 * err:+.2f}% |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("saved")
    a.add_argument("--shapes", nargs="+", default=["llama-bert-width", "gpt2"], choices=list(SHAPES))
    a.add_argument("--batch", type=int, default=4)
    a.add_argument("--seq", type=int, default=256)
    b = sub.add_parser("step")
    b.add_argument("--shape", default="llama-3.2-1b", choices=list(SHAPES))
    b.add_argument("--runs", nargs="+", default=list(DECODER_RUNS), choices=list(DECODER_RUNS))
    b.add_argument("--layers", type=int, nargs=2, default=[2, 4])
    b.add_argument("--batch", type=int, default=4)
    b.add_argument("--seq", type=int, default=2048)
    b.add_argument("--freeze-rate", type=float, default=None,
                   help="every SlimFit run at this rate instead of its own")
    v = sub.add_parser("validate")
    v.add_argument("--shape", default="llama-bert-width", choices=list(SHAPES))
    v.add_argument("--depth", type=int, default=16)
    v.add_argument("--runs", nargs="+", default=["full", "slimfit"], choices=list(DECODER_RUNS))
    v.add_argument("--layers", type=int, nargs=2, default=[2, 4])
    v.add_argument("--freeze-rate", type=float, default=None)
    v.add_argument("--batch", type=int, default=2)
    v.add_argument("--seq", type=int, default=128)
    args = ap.parse_args(argv)
    if args.what == "saved":
        lines = [ln for shape in args.shapes for ln in saved(shape, args.batch, args.seq) + [""]]
    elif args.what == "step":
        if "full" in args.runs:
            args.runs = ["full", *(r for r in args.runs if r != "full")]
        lines = step_table(args.shape, args.runs, args.layers, args.batch, args.seq,
                           args.freeze_rate)
    else:
        lines = validate(args.shape, args.depth, args.batch, args.seq, tuple(args.layers),
                         tuple(args.runs), args.freeze_rate)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
