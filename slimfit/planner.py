"""Fit a memory budget: measure calibration steps with the ledger and pick the
least aggressive SlimFit configuration whose steady-state peak fits.

Why measure and not estimate: activation memory depends on the architecture,
the attention implementation, which layers are frozen and how well each kind
compresses; one real step per candidate, counted by the ledger, is exact on
any device. The one figure a single step cannot show, the steady-state
optimizer state (every unit gets its state the first time it is trained), is
extrapolated from the measured bytes of state per byte of trained parameters.

Candidates are tried from the least to the most aggressive: full
fine-tuning; freezing at r = 0.8, 0.9, 0.95; then offloading the optimizer
state of frozen units (exact, overlapped on CUDA); then compressing static
activations (approximate, ~0.99 gradient cosine); then streaming the
weights of frozen tensors (exact; ``slimfit.stream``), with k, the number of
blocks resident, chosen as the largest that fits (fewer transfers) and k' =
min(2, k - 1) prefetched; then, on CUDA, also moving saved activations to
host memory (the slowest). The first that fits is the plan: the least
accuracy risk and slowdown for the memory.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import torch
from torch import nn

from slimfit.compress import ActivationCompressor, CompressionConfig
from slimfit.errors import SlimFitError
from slimfit.freezer import LayerFreezer
from slimfit.ledger import MemoryReport, format_bytes, measure_step
from slimfit.offload import OptimizerStateOffloader, activation_offload
from slimfit.stream import StreamConfig, WeightStreamer

__all__ = ["parse_budget", "Candidate", "Plan", "BudgetError", "default_candidates",
           "plan_for_budget", "build_plan", "optimizer_like"]

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


class BudgetError(SlimFitError):
    """No configuration fits the memory budget, or the budget is malformed."""


def parse_budget(budget: str | int | float) -> int:
    """Bytes from ``"12GiB"``, ``"12 GB"``, ``"800MiB"``, ``"1.5G"`` or a number of bytes.

    Example:
        >>> parse_budget("1.5 GiB")
        1610612736
    """
    if isinstance(budget, bool):
        raise BudgetError(f"memory budget must be a size such as '12GiB', got {budget!r}.")
    if isinstance(budget, (int, float)):
        value = float(budget)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(budget))
        if not m or m.group(2).lower() not in _UNITS:
            raise BudgetError(f"cannot parse memory budget {budget!r}: write a number and a unit, "
                              "e.g. '12GiB', '800MiB', '16GB' or a number of bytes.")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not value > 0:
        raise BudgetError(f"memory budget must be positive, got {budget!r}.")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Candidate:
    freeze_rate: float
    offload_optimizer_state: bool = False
    compression: bool = False
    offload_activations: bool = False
    #: stream frozen weights; k and k' are chosen by the planner (``Plan.stream``)
    stream_weights: bool = False

    def label(self) -> str:
        parts = ["full fine-tuning" if self.freeze_rate == 0 else f"SlimFit r={self.freeze_rate:g}"]
        parts += [n for n, on in (("optimizer-state offload", self.offload_optimizer_state),
                                  ("compression", self.compression),
                                  ("weight streaming", self.stream_weights),
                                  ("activation offload", self.offload_activations)) if on]
        return " + ".join(parts)


def default_candidates(cuda: bool | None = None, stream: bool = True) -> list[Candidate]:
    """Least to most aggressive (activation offload only where there is a GPU;
    weight streaming only when ``stream``: it needs a single process)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    out = [Candidate(0.0), Candidate(0.8), Candidate(0.9), Candidate(0.95),
           Candidate(0.9, offload_optimizer_state=True), Candidate(0.95, offload_optimizer_state=True),
           Candidate(0.9, True, True), Candidate(0.95, True, True)]
    if stream:
        out.append(Candidate(0.95, True, True, stream_weights=True))
    if cuda:
        out.append(Candidate(0.95, True, True, offload_activations=True, stream_weights=stream))
    return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """The chosen configuration and its expected steady-state peak (bytes)."""

    candidate: Candidate
    budget: int
    expected: dict[str, int]
    tried: tuple[tuple[str, int], ...]
    #: (k, k') of weight streaming when the candidate streams, else None
    stream: tuple[int, int] | None = None

    @property
    def expected_total(self) -> int:
        return self.expected["total"]

    def describe(self) -> str:
        c, e = self.candidate, self.expected
        lines = [f"SlimFit memory plan for a budget of {format_bytes(self.budget)}: {c.label()}",
                 f"  expected peak {format_bytes(e['total'])} = parameters {format_bytes(e['parameters'])}"
                 f" + gradients {format_bytes(e['gradients'])} + optimizer state "
                 f"{format_bytes(e['optimizer_state'])} + activations {format_bytes(e['activations'])}"]
        if c.offload_optimizer_state:
            lines.append(f"  optimizer state of frozen units in host memory: "
                         f"{format_bytes(e['host_optimizer_state'])}")
        if self.stream is not None:
            lines.append(f"  weights streamed from host memory ({format_bytes(e['host_parameters'])}"
                         f"): k={self.stream[0]} blocks resident, k'={self.stream[1]} prefetched")
        lines.append("  tried: " + "; ".join(f"{n}: {format_bytes(b)}" for n, b in self.tried))
        return "\n".join(lines)


def _expected(rep: MemoryReport, opt: torch.optim.Optimizer, freezer: LayerFreezer | None,
              cand: Candidate, margin: float, streamer: WeightStreamer | None = None,
              k: int | None = None) -> dict[str, int]:
    """Steady state from one calibration step, as upper bounds: gradients (and,
    with offload, resident optimizer state) for the largest set of units a step
    may train; optimizer state for every tensor once each has been trained;
    activations as measured plus ``margin`` (the trained set changes which
    dynamic activations are saved); with weight streaming, the weights outside
    the streamed blocks, plus the k largest blocks whole, plus the largest
    trainable set (it stays resident)."""
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    with_state = [p for p in in_opt if opt.state.get(p)]
    per_byte = (rep.optimizer_state + rep.offloaded_optimizer_state) / max(nbytes(with_state), 1)
    all_bytes = nbytes(in_opt)
    if freezer is None:
        trainable = all_bytes
    else:
        n_train = len(freezer.units) - freezer.num_frozen
        unit_bytes = sorted((nbytes(u.params) for u in freezer.units), reverse=True)
        trainable = all_bytes - sum(unit_bytes) + sum(unit_bytes[:n_train])
    resident = trainable if cand.offload_optimizer_state else all_bytes
    grads = trainable  # gradients have their parameters' size
    acts = 0 if cand.offload_activations else int(rep.activations * (1 + margin))
    opt_bytes = int(per_byte * resident)
    params, host_params = rep.parameters, 0
    if streamer is not None:
        streamed = {id(t.param): t.nbytes for u in streamer.units for t in u.tensors}
        blocks = sorted((sum(t.nbytes for t in u.tensors) for u in streamer.units), reverse=True)
        outside = rep.parameters - streamer.peak_resident_bytes  # never streamed
        units = freezer.units if freezer is not None else ()
        candidates = {id(p) for u in units for p in u.params}
        # block tensors that always train (biases, ...) stay resident; so do the
        # largest set of candidate tensors a step may train
        always = sum(b for pid, b in streamed.items() if pid not in candidates)
        trained = sorted((sum(streamed.get(id(p), 0) for p in u.params) for u in units),
                         reverse=True)[:len(units) - (freezer.num_frozen if freezer else 0)]
        params = min(outside + sum(streamed.values()),  # never above no streaming
                     outside + sum(blocks[:k]) + always + sum(trained))
        host_params = streamer.host_bytes()
    return {"parameters": params, "gradients": grads, "optimizer_state": opt_bytes,
            "activations": acts, "total": params + grads + opt_bytes + acts,
            "host_optimizer_state": int(per_byte * (all_bytes - resident)),
            "host_parameters": host_params}


def plan_for_budget(model: nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer],
                    loss_fn: Callable[[], torch.Tensor], budget: str | int,
                    candidates: Sequence[Candidate] | None = None, seed: int = 0,
                    compression: CompressionConfig | None = None, activation_margin: float = 0.1,
                    **freezer_options) -> Plan:
    """Measure calibration steps and return the first candidate that fits.

    The model's weights are restored after each calibration step (a host
    copy is kept meanwhile) and every calibration optimizer is discarded, so
    training starts from the same point.

    Args:
        model: the model to fine-tune.
        make_optimizer: builds the optimizer used in training from a parameter list.
        loss_fn: zero-argument forward pass returning the loss of one batch.
        budget: bytes or a size string (``"12GiB"``).
        candidates: configurations to try, least aggressive first.
        compression: the compression settings for candidates that compress.
        activation_margin: headroom on measured activations (the trained set,
            hence the dynamic activations, changes from step to step).
        **freezer_options: :class:`slimfit.config.SlimFitConfig` options
            (``include``, ``exclude``, ``always_train`` ...).

    Raises:
        BudgetError: malformed budget, or no candidate fits (the message
            gives the smallest reachable peak).
    """
    budget_b = parse_budget(budget)
    candidates = list(candidates or default_candidates())
    saved = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    tried: list[tuple[str, int]] = []
    try:
        for cand in candidates:
            by_k = _calibrate(model, make_optimizer, loss_fn, cand, seed, compression,
                              activation_margin, freezer_options)
            model.load_state_dict(saved)
            fits = [k for k, e in by_k.items() if e["total"] <= budget_b]
            k = max(fits) if fits else min(by_k)  # more blocks resident: fewer transfers
            expected = by_k[k]
            label = cand.label() + (f" (k={k})" if cand.stream_weights else "")
            tried.append((label, expected["total"]))
            if fits:
                stream = (k, min(2, k - 1)) if cand.stream_weights else None
                return Plan(cand, budget_b, expected, tuple(tried), stream)
    finally:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
    best = min(tried, key=lambda t: t[1])
    raise BudgetError(
        f"no SlimFit configuration fits a budget of {format_bytes(budget_b)}: the smallest "
        f"expected peak is {format_bytes(best[1])} ({best[0]}). Raise the budget, reduce the "
        "batch size or sequence length, or use a smaller model.")


def _calibrate(model, make_optimizer, loss_fn, cand: Candidate, seed, compression, margin,
               options) -> dict[int | None, dict]:
    """Expected peaks of ``cand``: ``{None: ...}``, or ``{k: ...}`` for every k
    (blocks resident) when it streams weights (one step measured at k=2, k'=1)."""
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad])
    freezer = LayerFreezer(model, freeze_rate=cand.freeze_rate, seed=seed, **options) \
        if cand.freeze_rate > 0 else None
    comp = ActivationCompressor(model, compression or CompressionConfig()).install() \
        if cand.compression else None
    off = streamer = None
    try:
        if freezer is not None:
            frozen = freezer.decide()
            freezer.apply(frozen)
            if cand.offload_optimizer_state:
                off = OptimizerStateOffloader(opt, [u.params for u in freezer.units])
                off.sync(frozen)
        if cand.stream_weights:
            streamer = WeightStreamer(model, StreamConfig(resident=2, prefetch=1)).install()

        def step():
            if cand.offload_activations:
                with activation_offload(model):
                    loss_fn().backward()
            else:
                loss_fn().backward()

        rep = measure_step(model, opt, step, off.host_storage_keys() if off else None,
                           streamer=streamer)
        if streamer is None:
            return {None: _expected(rep, opt, freezer, cand, margin)}
        return {k: _expected(rep, opt, freezer, cand, margin, streamer, k)
                for k in range(1, len(streamer.units) + 1)}
    finally:
        if streamer is not None:
            streamer.remove()
        if comp is not None:
            comp.remove()
        if freezer is not None:
            freezer.restore()
        opt.state.clear()


def optimizer_like(optimizer: torch.optim.Optimizer) -> Callable[[list], torch.optim.Optimizer]:
    """A factory for fresh optimizers of the same class and defaults (calibration)."""
    import inspect
    opt = getattr(optimizer, "optimizer", optimizer)  # unwrap Lightning's LightningOptimizer
    accepted = inspect.signature(type(opt).__init__).parameters
    kwargs = {k: v for k, v in opt.defaults.items() if k in accepted}
    return lambda params: type(opt)(params, **kwargs)


def build_plan(plan: Plan, model: nn.Module, optimizer: torch.optim.Optimizer,
               compression: CompressionConfig | None = None, seed: int = 0, **freezer_options
               ) -> tuple[LayerFreezer, ActivationCompressor | None, OptimizerStateOffloader | None,
                          StreamConfig | None]:
    """The components that train ``model`` as ``plan`` says (compressor
    installed), and the :class:`StreamConfig` to stream weights with, if any
    (install a :class:`WeightStreamer` with it once the model is placed)."""
    c = plan.candidate
    freezer = LayerFreezer(model, freeze_rate=c.freeze_rate, seed=seed, **freezer_options)
    comp = ActivationCompressor(model, compression or CompressionConfig()).install() \
        if c.compression else None
    off = OptimizerStateOffloader(optimizer, [u.params for u in freezer.units]) \
        if c.offload_optimizer_state else None
    stream = StreamConfig(resident=plan.stream[0], prefetch=plan.stream[1]) \
        if plan.stream is not None else None
    return freezer, comp, off, stream
