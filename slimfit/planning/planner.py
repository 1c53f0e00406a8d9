"""Fit a memory budget: measure calibration steps with the ledger and pick the
configuration with the smallest accuracy price whose steady-state peak fits.

Why measure and not estimate: activation memory depends on the architecture,
the attention implementation, which layers are frozen and how well each kind
compresses; one real step per candidate, counted by the ledger, is exact on
any device. The one figure a single step cannot show, the steady-state
optimizer state (every unit gets its state the first time it is trained), is
extrapolated from the measured bytes of state per byte of trained parameters
(``slimfit.planning.calibration`` turns one measured step into the steady-state peak).

Why accuracy first: freezing is the lossy step (the fidelity study prices it,
``slimfit.evidence``); optimizer-state offload, weight streaming and
activation offload are exact and cost only time. So the search is:

1. full fine-tuning, if it fits;
2. without compression, and with it (compression alone first), the lowest
   freezing rate that fits with every exact technique on: a bisection over
   the number of frozen units, then a step down while one fewer fits, so any
   rate up to ``max_freeze_rate``, not only 0.8/0.9/0.95;
3. of the two, the smaller expected accuracy price (ties: no compression);
4. at that rate, the fastest exact techniques that still fit, in the order
   none, optimizer-state offload, + weight streaming (k blocks resident, the
   largest k that fits, k' = min(2, k - 1) prefetched), + activation offload
   (CUDA only).

The planner never changes the freezing policy. The policy study (issue 27,
docs/results.md) found SlimFit's score policy closest to full fine-tuning at
the same trainable fraction, several points ahead, while LISA and BAdam
saved about a tenth of the ledger total in the study's runs (no score
snapshot of the trained units), not enough to pay for the accuracy, so the
planner does not switch policy; a user's LISA or BAdam is kept, and
the plan's price says it was measured under the score policy.

``candidates=[...]`` instead tries a fixed list of :class:`slimfit.session.
SessionConfig` in the order given (the first that fits), for users who want to
decide the order themselves. A plan is a ``SessionConfig`` too, named by its
one label (``SessionConfig.label()``).
``activation_scale`` (and ``small_batch``) plan a larger batch than the
calibration batch: activations grow linearly with it, the rest does not.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from slimfit.compression.config import CompressionConfig
from slimfit.errors import SlimFitError
from slimfit.evidence import expected_price
from slimfit.freezing.config import SlimFitConfig
from slimfit.freezing.freezer import LayerFreezer
from slimfit.memory.report import format_bytes
from slimfit.offload.stream_config import StreamConfig, default_stream_units
from slimfit.planning.calibration import calibrate
from slimfit.session_config import SessionConfig

__all__ = ["BudgetError", "Plan", "optimizer_like", "parse_budget", "plan_for_budget"]

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
    if not 1 <= value < float("inf"):  # int(0.5) would be a budget of 0 bytes
        raise BudgetError(f"memory budget must be a positive, finite size of at least one byte "
                          f"such as '12GiB', got {budget!r}.")
    return int(value)


class _Knobs(NamedTuple):
    """The coordinates of the planner's search: which techniques are on (a
    hashable key for the calibrations; :func:`_config` turns it into the
    ``SessionConfig`` that runs)."""

    freeze_rate: float
    compression: bool = False
    offload_optimizer_state: bool = False
    stream_weights: bool = False
    offload_activations: bool = False

    @classmethod
    def of(cls, config: SessionConfig) -> "_Knobs":
        f = config.freezing
        return cls(f.freeze_rate if f is not None else 0.0, config.compression is not None,
                   config.offload_optimizer_state, config.stream is not None,
                   config.offload_activations)


def _config(knobs: _Knobs, base: SessionConfig, resident: int = 2) -> SessionConfig:
    """``base`` with the techniques of ``knobs`` switched on or off; every other
    option (selection, scores, compression settings, stream units) is the
    user's, carried by ``dataclasses.replace``. Streaming keeps ``resident``
    blocks, ``min(2, resident - 1)`` prefetched."""
    stream = None
    if knobs.stream_weights:
        stream = dataclasses.replace(base.stream or StreamConfig(), resident=resident,
                                     prefetch=min(2, resident - 1))
    # a user who releases frozen units' state keeps releasing it (nothing left to offload)
    release = base.optimizer_state == "release"
    return dataclasses.replace(
        base, freezing=dataclasses.replace(base.freezing or SlimFitConfig(),
                                           freeze_rate=knobs.freeze_rate),
        compression=(base.compression or CompressionConfig()) if knobs.compression else None,
        offload_optimizer_state=knobs.offload_optimizer_state and not release,
        optimizer_state="release" if release else
        "host" if knobs.offload_optimizer_state else "device",
        offload_activations=knobs.offload_activations, stream=stream)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The chosen configuration and its expected steady-state peak (bytes)."""

    #: what to build the session from: ``SlimFitSession(model, plan.config)``
    config: SessionConfig
    budget: int
    expected: dict[str, int]
    tried: tuple[tuple[str, int], ...]
    #: expected accuracy price in points (negative: below full fine-tuning) and its source
    price: tuple[float, str] = (0.0, "exact")

    @property
    def stream(self) -> tuple[int, int] | None:
        """(k, k') of weight streaming when the plan streams, else None."""
        s = self.config.stream
        return (s.resident, s.prefetch) if s is not None else None

    @property
    def expected_total(self) -> int:
        return self.expected["total"]

    def label(self) -> str:
        """The plan's configuration by its one name (``SessionConfig.label``)."""
        return self.config.label()

    def describe(self) -> str:
        c, e = self.config, self.expected
        gap, source = self.price
        lines = [f"SlimFit memory plan for a budget of {format_bytes(self.budget)}: {self.label()}",
                 f"  expected accuracy price {gap:+.2f} points vs full fine-tuning ({source})",
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


def _has_stream_units(model: nn.Module, stream: StreamConfig | None) -> bool:
    """Weight streaming can be offered: the user named units, or the model has a
    list of repeated blocks to stream."""
    return (stream is not None and stream.units is not None) or bool(default_stream_units(model))


def plan_for_budget(model: nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer],
                    loss_fn: Callable[[], torch.Tensor], budget: str | int,
                    candidates: Sequence[SessionConfig] | None = None,
                    base: SessionConfig | None = None, activation_margin: float = 0.1, *,
                    activation_scale: float = 1.0,
                    small_batch: tuple[Callable[[], torch.Tensor], float] | None = None,
                    max_freeze_rate: float = 0.95, stream: bool = True,
                    cuda: bool | None = None) -> Plan:
    """Measure calibration steps and return the plan with the smallest expected
    accuracy price that fits (the search is in the module docstring).

    The model's weights are restored after each calibration step (a host
    copy is kept meanwhile) and every calibration optimizer is discarded, so
    training starts from the same point.

    Args:
        model: the model to fine-tune.
        make_optimizer: builds the optimizer used in training from a parameter list.
        loss_fn: zero-argument forward pass returning the loss of one batch.
        budget: bytes or a size string (``"12GiB"``).
        candidates: a fixed list of session configs to try in the order given
            instead of the search (the first that fits; streaming's k is chosen). Weight streaming is dropped for a
            model with no repeated blocks (and no ``base.stream.units``).
        base: the user's options (freezing selection and scores, compression
            settings, stream units); each candidate switches techniques on or
            off in a copy of it, nothing else.
        activation_margin: headroom on measured activations (the trained set,
            hence the dynamic activations, changes from step to step).
        activation_scale: plan for a batch this many times the calibration
            batch, e.g. 32 to plan batch 128 from batch-4 steps (parameters and
            optimizer state do not grow with the batch). Alone, measured
            activations are multiplied by it: an upper bound, loose where part
            of them does not grow with the batch (under autocast the
            low-precision weight copies ops save).
        small_batch: ``(loss_fn at a smaller batch, its size / the calibration
            batch's)``, e.g. ``(loss_at_1, 0.5)`` beside ``loss_fn`` at batch
            2: every candidate is also measured there and activations are
            extrapolated on the line through both points (exact where they are
            linear in the batch, which the benchmarks' residuals show).
        max_freeze_rate: the search never freezes more than this.
        stream: weight streaming may be used (it needs a single process).
        cuda: activation offload may be used (default: CUDA is available).

    Raises:
        BudgetError: malformed budget or options, or nothing fits (the
            message gives the smallest reachable peak).
    """
    budget_b = parse_budget(budget)
    if not (isinstance(activation_scale, (int, float)) and 0 < activation_scale < float("inf")):
        raise BudgetError(f"activation_scale must be a positive number (the planned batch over "
                          f"the calibration batch), got {activation_scale!r}.")
    if small_batch is not None and not (
            isinstance(small_batch, tuple) and len(small_batch) == 2 and callable(small_batch[0])
            and isinstance(small_batch[1], (int, float)) and 0 < small_batch[1] < 1):
        raise BudgetError(f"small_batch must be (loss_fn, fraction) with fraction in (0, 1), the "
                          f"smaller batch over the calibration batch; got {small_batch!r}.")
    if not (isinstance(max_freeze_rate, (int, float)) and 0 <= max_freeze_rate < 1):
        raise BudgetError(f"max_freeze_rate must be in [0, 1), got {max_freeze_rate!r}.")
    base = base if base is not None else SessionConfig(freezing=SlimFitConfig())
    stream = stream and _has_stream_units(model, base.stream)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    saved = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    tried: list[tuple[str, int]] = []
    measured: dict[_Knobs, dict] = {}

    def evaluate(knobs: _Knobs) -> tuple[int | None, dict] | None:
        """(k, expected) of ``knobs`` if it fits, else None; each configuration
        is calibrated once and recorded in ``tried``."""
        fresh = knobs not in measured
        if fresh:
            measured[knobs] = calibrate(model, make_optimizer, loss_fn, _config(knobs, base),
                                        activation_margin, activation_scale, small_batch)
            model.load_state_dict(saved)
        by_k = measured[knobs]
        fits = [k for k, e in by_k.items() if e["total"] <= budget_b]
        k = max(fits) if fits else min(by_k)  # more blocks resident: fewer transfers
        if fresh:
            tried.append((_config(knobs, base).label() + (f" (k={k})" if knobs.stream_weights else ""),
                          by_k[k]["total"]))
        return (k, by_k[k]) if fits else None

    def plan(knobs: _Knobs, found: tuple[int | None, dict]) -> Plan:
        k, expected = found
        price = expected_price(knobs.freeze_rate, knobs.compression)
        policy = base.freezing.policy if base.freezing is not None else "slimfit"
        if base.freezing is not None and base.freezing.rate_of == "bytes" and knobs.freeze_rate:
            price = (price[0], f"{price[1]}; measured with the rate a fraction of the units, "
                     "not of the bytes")
        if policy != "slimfit" and knobs.freeze_rate > 0:  # the prices are the score policy's
            price = (price[0], f"{price[1]}; measured with policy='slimfit': the policy study "
                     f"(docs/results.md) found policy={policy!r} further from full fine-tuning "
                     "at the same rate, so read it as a lower bound")
        return Plan(_config(knobs, base, resident=k or 2), budget_b, expected, tuple(tried), price)

    try:
        if candidates is not None:
            for config in candidates:
                if not isinstance(config, SessionConfig):
                    raise BudgetError(f"candidates must be SessionConfig objects, got {config!r}.")
                knobs = _Knobs.of(config)
                if knobs.stream_weights and not stream:
                    continue
                found = evaluate(knobs)
                if found is not None:
                    return plan(knobs, found)
        else:
            found = _search(evaluate, plan, model, base, max_freeze_rate, stream, cuda)
            if found is not None:
                return found
    finally:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
    best = min(tried, key=lambda t: t[1])
    raise BudgetError(
        f"no SlimFit configuration fits a budget of {format_bytes(budget_b)}: the smallest "
        f"expected peak is {format_bytes(best[1])} ({best[0]}). Raise the budget, reduce the "
        "batch size or sequence length, or use a smaller model.")


def _search(evaluate, plan, model, base: SessionConfig, max_rate: float, stream: bool,
            cuda: bool) -> Plan | None:
    """The accuracy-first search of the module docstring; None if nothing fits."""
    full = _Knobs(0.0)
    found = evaluate(full)
    if found is not None:
        return plan(full, found)
    if base.freezing is None:  # the user switched freezing off: compression alone, or nothing
        alone = _Knobs(0.0, compression=True)
        found = evaluate(alone)
        return plan(alone, found) if found is not None else None
    # the user's candidates (at rate 0: a bytes rate too high for one unit is refused)
    units = LayerFreezer(model, dataclasses.replace(base.freezing, freeze_rate=0.0)).units
    n_units = len(units)
    if base.freezing.rate_of == "bytes":  # no rate at which the largest unit could never train
        sizes = [u.nbytes for u in units]
        max_rate = min(max_rate, 1.0 - max(sizes) / sum(sizes) - 1e-6)
    k_max = int(max_rate * n_units)  # frozen units at the highest rate allowed
    # exact techniques, fastest first; the last is the most capable (offload and
    # streaming act on frozen units only: nothing to move at rate 0)
    ladders = [{}, dict(offload_optimizer_state=True)]
    if stream:
        ladders.append(dict(ladders[-1], stream_weights=True))
    if cuda:
        ladders.append(dict(ladders[-1], offload_activations=True))

    def rate(k: int) -> float:  # floor(rate * n_units) == k: (k / n) * n may round below k
        return (k + 1e-6) / n_units if k else 0.0

    best: tuple[float, int, bool] | None = None  # (price, frozen units, compression)
    for compression in (False, True):
        if compression and evaluate(_Knobs(0.0, compression=True)) is not None:
            hi = 0  # compression alone fits
        else:  # rate 0 without compression is full fine-tuning: it did not fit
            if evaluate(_Knobs(rate(k_max), compression=compression, **ladders[-1])) is None:
                continue
            # bisection for the fewest frozen units that fit with every exact technique on
            lo, hi = 0, k_max  # lo: does not fit, hi: fits
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if evaluate(_Knobs(rate(mid), compression=compression, **ladders[-1])) is None:
                    lo = mid
                else:
                    hi = mid
            # the peak is monotone in the frozen count only up to which units the
            # first step happens to freeze: step down while one unit fewer fits
            while hi > 1 and evaluate(_Knobs(rate(hi - 1), compression=compression,
                                                **ladders[-1])) is not None:
                hi -= 1
        price = -expected_price(rate(hi), compression)[0]
        if best is None or price < best[0] - 1e-9:
            best = (price, hi, compression)
    if best is None:
        return None
    _, k, compression = best
    if k == 0:  # compression alone (the exact techniques act on frozen units)
        return plan(_Knobs(0.0, compression=True), evaluate(_Knobs(0.0, compression=True)))
    for ladder in ladders:  # the fastest exact techniques that fit at that rate
        cand = _Knobs(rate(k), compression=compression, **ladder)
        found = evaluate(cand)
        if found is not None:
            return plan(cand, found)
    return None  # unreachable: the last ladder fitted during the bisection


def optimizer_like(optimizer: torch.optim.Optimizer) -> Callable[[list], torch.optim.Optimizer]:
    """A factory for fresh optimizers of the same class and defaults (calibration)."""
    import inspect
    opt = getattr(optimizer, "optimizer", optimizer)  # unwrap Lightning's LightningOptimizer
    accepted = inspect.signature(type(opt).__init__).parameters
    kwargs = {k: v for k, v in opt.defaults.items() if k in accepted}
    return lambda params: type(opt)(params, **kwargs)
