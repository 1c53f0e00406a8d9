"""Calibration for the budget planner: one measured step of a session and the
steady-state peak it implies.

Why a module of its own: the planner (``slimfit.planning.planner``) decides which
configurations to try and in what order; this module answers, for one
configuration, "what will the peak be once training runs for long", from
one step the ledger counts. A single step cannot show three things, each
bounded here: the optimizer state of units not yet trained (extrapolated
from the measured bytes of state per byte of trained parameters), the
trained set of a later step (gradients, resident state and dynamic
activations for the largest units a step may train), and, for a larger
batch than the calibration batch, the activations (linear in the batch).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import weakref
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from slimfit.freezing.freezer import LayerFreezer
from slimfit.memory.report import MemoryReport
from slimfit.session import SlimFitSession
from slimfit.session_config import SessionConfig
from slimfit.storage import storage_identity
from slimfit.offload.streaming import WeightStreamer

__all__ = ["calibrate"]


#: modules whose native backward saves the input for the bias gradient too
#: (convolutions did too; with a frozen weight the session reroutes them,
#: ``slimfit.compression.frozen_conv``, so they keep their input for dW alone, as Linears do)
_SAVES_INPUT_FOR_BIAS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
#: owners that save their input for dW alone: surely dynamic
_INPUT_FOR_DW_ONLY = (nn.Linear, nn.modules.conv._ConvNd)


@contextlib.contextmanager
def _unit_inputs(model: nn.Module, units: Sequence, compressor=None) -> Iterator[list]:
    """Record, per unit, ``(input storage, bytes, linear)`` of the floating-point
    input of the module that owns it: the dynamic activation its training may
    add, at the width compression stores it (``int8`` of fp32: a quarter). Q,
    K and V share one input storage. ``linear``: the owner is an
    ``nn.Linear`` or a convolution (rerouted by the session when its weight is
    frozen), which saves its input for dW alone, so the input is surely
    dynamic. A native norm with a trainable bias saves its input whether its
    weight trains or not (one backward formula serves input, weight and
    bias): recorded as ``(None, 0, False)``, static. Other
    owners are counted as if their input were dynamic (an upper bound)."""
    owner = {id(p): m for _, m in model.named_modules() for p in m.parameters(recurse=False)}
    ratio: dict[int, float] = {}
    for kind in ("ffn_down_input", "linear_input"):
        tr = getattr(compressor.config, kind) if compressor is not None else None
        for _, m in (compressor.targets.get(kind, []) if tr is not None and tr.bits else []):
            ratio[id(m)] = tr.bits / 32
    by_module: dict[int, tuple[nn.Module, list[int]]] = {}
    for i, u in enumerate(units):
        for p in u.params:
            by_module.setdefault(id(owner[id(p)]), (owner[id(p)], []))[1].append(i)
    seen: list = [(None, 0, False)] * len(units)
    # storage identity -> (weak reference to the tensor, unique id): an input not
    # saved (its module frozen) is freed, and the allocator may hand its address
    # to the next one; a dead reference means a new storage, not a shared one
    live: dict = {}
    fresh = itertools.count()

    def ident(x):
        key = storage_identity(x)
        ref, uid = live.get(key, (None, None))
        if ref is None or ref() is None:
            uid = next(fresh)
            live[key] = (weakref.ref(x), uid)
        return uid

    def static(mod):  # saves its input whether its weight trains or not
        bias = getattr(mod, "bias", None)
        return isinstance(mod, _SAVES_INPUT_FOR_BIAS) and isinstance(bias, torch.Tensor) \
            and bias.requires_grad

    def pre(mod, args, idx):
        x = next((a for a in args if torch.is_tensor(a) and a.is_floating_point()), None)
        if x is not None:
            b = int(x.numel() * x.element_size() * ratio.get(id(mod), 1.0))
            uid = ident(x)
            for i in idx:
                seen[i] = (uid, max(seen[i][1], b), isinstance(mod, _INPUT_FOR_DW_ONLY))

    handles = [m.register_forward_pre_hook(functools.partial(pre, idx=idx))
               for m, idx in by_module.values() if not static(m)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _worst_dynamic(inputs: Sequence, frozen: Sequence[int], n_train: int,
                   unit_bytes: Sequence[int] | None = None, budget: int | None = None) -> int:
    """Bytes by which the dynamic activations of the worst trained set may
    exceed the measured step's.

    A shared input is saved once, so n_train units cost at most the n_train
    largest *distinct* inputs (Q, K and V of one block share one; ranking
    units by bytes alone would pick them together on a tie and count one
    input where a step training one projection in each of three blocks saves
    three). Every recorded input counts towards the worst set, but only the
    Linears' towards the measured step's: a trained LayerNorm or embedding
    added nothing to it, and subtracting its input would make the bound too
    low.

    Under ``rate_of="bytes"`` (``budget``: the most weight bytes a step trains,
    ``unit_bytes``: each unit's) the trained units' inputs are also bounded by
    the fractional knapsack: distinct inputs taken by their bytes per weight
    byte of the lightest unit saving them, the last one in part, until those
    weights fill the budget (an upper bound on any set that fits; the count
    alone would allow every small unit at once)."""
    fz = set(frozen)
    measured = {uid: b for i, (uid, b, linear) in enumerate(inputs) if linear and i not in fz}
    largest: dict = {}  # input -> the most any unit sharing it records
    for uid, b, _ in inputs:
        if b:
            largest[uid] = max(largest.get(uid, 0), b)
    worst = sum(sorted(largest.values(), reverse=True)[:n_train])
    if budget is not None:
        # one item per distinct input: its bytes, for the lightest unit that saves it
        # (a unit saves one input, so any set within the budget covers inputs whose
        # lightest units fit in it too: the items' fractional knapsack bounds the set)
        cost: dict = {}
        for (uid, b, _), w in zip(inputs, unit_bytes):
            if b:
                cost[uid] = min(cost.get(uid, w), w)
        knapsack, left = 0.0, budget
        for uid in sorted(cost, key=lambda u: largest[u] / max(cost[u], 1), reverse=True):
            take = min(1.0, left / max(cost[uid], 1))
            knapsack, left = knapsack + take * largest[uid], left - take * cost[uid]
            if left <= 0:
                break
        worst = min(worst, math.ceil(knapsack))
    return max(0, worst - sum(measured.values()))


def _largest_trained(sizes: Sequence[int], freezer: LayerFreezer) -> int:
    """The most of ``sizes`` (one per unit) a step may train: the
    ``num_trained`` largest, and under ``rate_of="bytes"`` never above the
    step's byte budget (each size is at most its unit's bytes)."""
    top = sum(sorted(sizes, reverse=True)[:freezer.scheduler.num_trained])
    budget = freezer.scheduler.trained_bytes_budget
    return top if budget is None else min(top, budget)


def _expected(rep: MemoryReport, opt: torch.optim.Optimizer, freezer: LayerFreezer | None,
              config: SessionConfig, margin: float, streamer: WeightStreamer | None = None,
              k: int | None = None, activations: int | None = None) -> dict[str, int]:
    """Steady state from one calibration step, as upper bounds: gradients (and,
    with offload, resident optimizer state) for the largest set of units a step
    may train; optimizer state for every tensor once each has been trained;
    ``activations`` (as measured, or at the planned batch, with what the worst
    trained set may add; default: as measured), plus ``margin``; with weight
    streaming, the weights outside the streamed blocks, plus the k largest
    blocks whole, plus the largest trainable set (it stays resident)."""
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    with_state = [p for p in in_opt if opt.state.get(p)]
    per_byte = (rep.optimizer_state + rep.offloaded_optimizer_state) / max(nbytes(with_state), 1)
    all_bytes = nbytes(in_opt)
    if freezer is None:
        trainable = all_bytes
    else:
        unit_bytes = [u.nbytes for u in freezer.units]
        trainable = all_bytes - sum(unit_bytes) + _largest_trained(unit_bytes, freezer)
    resident = trainable if config.offload_optimizer_state else all_bytes
    grads = trainable  # gradients have their parameters' size
    acts = 0 if config.offload_activations else \
        int((rep.activations if activations is None else activations) * (1 + margin))
    opt_bytes = int(per_byte * resident)
    params, host_params = rep.parameters, 0
    if streamer is not None and freezer is not None:  # nothing frozen: nothing streamed out
        streamed = {id(t.param): t.nbytes for u in streamer.units for t in u.tensors}
        blocks = sorted((sum(t.nbytes for t in u.tensors) for u in streamer.units), reverse=True)
        outside = rep.parameters - streamer.peak_resident_bytes  # never streamed
        units = freezer.units
        candidates = {id(p) for u in units for p in u.params}
        # block tensors that always train (biases, ...) stay resident; so do the
        # largest set of candidate tensors a step may train
        always = sum(b for pid, b in streamed.items() if pid not in candidates)
        trained = _largest_trained([sum(streamed.get(id(p), 0) for p in u.params)
                                    for u in units], freezer)
        params = min(outside + sum(streamed.values()),  # never above no streaming
                     outside + sum(blocks[:k]) + always + trained)
        host_params = streamer.host_bytes()
    return {"parameters": params, "gradients": grads, "optimizer_state": opt_bytes,
            "activations": acts, "total": params + grads + opt_bytes + acts,
            "host_optimizer_state": int(per_byte * (all_bytes - resident)),
            "host_parameters": host_params}


def calibrate(model: nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer],
              loss_fn: Callable[[], torch.Tensor], config: SessionConfig, margin: float,
              scale: float = 1.0, small_batch: tuple[Callable, float] | None = None
              ) -> dict[int | None, dict[str, int]]:
    """Expected steady-state peaks of a session built from ``config``:
    ``{None: ...}``, or ``{k: ...}`` for every k (blocks resident) when it
    streams weights (one step measured at the config's k). ``margin``,
    ``scale`` and ``small_batch`` are :func:`slimfit.planning.planner.plan_for_budget`'s
    ``activation_margin``, ``activation_scale`` and ``small_batch``. The model's
    weights move (one optimizer step): the caller restores them."""
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad])
    session = SlimFitSession(model, config)
    try:
        frozen = session.start(opt).decide()
        with _unit_inputs(model, session.units, session.compressor) as inputs:
            rep = session.step(loss_fn, measure=True, frozen=frozen)
        freezes = config.freezing is not None and config.freezing.freeze_rate > 0
        freezer = session.freezer if freezes else None
        extra = _worst_dynamic(
            inputs, frozen, session.freezer.scheduler.num_trained,
            [u.nbytes for u in session.units],
            session.freezer.scheduler.trained_bytes_budget) if freezer is not None else 0
        # activations at the planned batch: proportional (an upper bound), or on
        # the line through this batch and a smaller one (same frozen set); the
        # worst trained set's extra inputs are proportional to the batch
        acts = rep.activations * scale
        if small_batch is not None and scale != 1:
            small = session.step(small_batch[0], measure=True, frozen=frozen).activations
            per_batch = (rep.activations - small) / (1 - small_batch[1])
            acts = rep.activations + per_batch * (scale - 1)
        acts = int(acts + extra * scale)
        if session.streamer is None:
            return {None: _expected(rep, opt, freezer, config, margin, activations=acts)}
        return {k: _expected(rep, opt, freezer, config, margin, session.streamer, k, acts)
                for k in range(1, len(session.streamer.units) + 1)}
    finally:
        session.stop()
        opt.state.clear()
