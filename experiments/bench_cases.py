"""What the benchmark scripts share: one measured run of a :class:`Run` on a
case of the model zoo (:func:`measure_method`: the ledger's step and the
median step time at each batch size) and the tables they print.

The cases (models and fixed batches) are :mod:`slimfit.experiments.zoo`'s,
the runs :mod:`slimfit.experiments.runs`'s; each run drives a
:class:`slimfit.SlimFitSession`, so a benchmark measures exactly what
training runs.
"""

from __future__ import annotations

import dataclasses
import gc
import time

import torch
from torch import nn

from slimfit import MemoryReport, SessionConfig, SlimFitSession, format_bytes
from slimfit.experiments.peers import checkpointed_blocks, set_checkpointing
from slimfit.experiments.runs import Run, build_optimizer
from slimfit.experiments.zoo import Case, build_case
from slimfit.memory.tracker import SavedTensorTracker

__all__ = ["Measured", "RunResult", "extrapolation_table", "make_optimizer", "measure_method",
           "memory_table", "recompute_bytes", "start_session", "timed_steps"]


def make_optimizer(name: str, model: nn.Module, lr: float = 2e-5) -> torch.optim.Optimizer:
    """``adamw`` (torch, fp32 state), ``sgd`` (momentum 0.9), ``adamw8bit``
    (bitsandbytes) over the model's trainable parameters."""
    return build_optimizer(name, [p for p in model.parameters() if p.requires_grad], lr)


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
class RunResult:
    """What :func:`measure_method` measured: ``{batch: Measured}`` and what ran."""

    method: Run
    label: str
    describe: str
    by_batch: dict[int, Measured]
    notes: list[str]


def measure_method(model_name: str, method: Run, batch_sizes: list[int], *,
                   seq_len: int = 128, image_size: int = 224, device: str = "cpu",
                   attn: str = "sdpa", attention_dropout: float | None = None,
                   timed: int = 2, label: str | None = None, precision: str = "fp32") -> RunResult:
    """Measure ``method`` on a fresh ``model_name`` (same seed for every method).

    The model is built at batch 2, transformed (:meth:`Run.apply`), and its
    session started with the initial pass (every unit trained once, so every
    trained tensor has optimizer state, as in a long run; state does not depend
    on the batch). Then, at each batch size: one warm-up step, ``timed`` timed
    steps (median) and one step under the ledger.
    """
    case = build_case(model_name, 2, seq_len, image_size, device, method.attention or attn,
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
    return RunResult(method, label, desc, out, notes)


def _ratio(base: float, x: float) -> str:
    """``base / x`` as "N.NNx smaller" (or "N.NNx larger" when ``x`` exceeds ``base``)."""
    return f"{base / x:.2f}x smaller" if x <= base else f"{x / base:.2f}x larger"


def memory_table(runs: list[RunResult], batch_sizes: list[int]) -> str:
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


def extrapolation_table(runs: list[RunResult], batch_sizes: list[int], target: int) -> str:
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
