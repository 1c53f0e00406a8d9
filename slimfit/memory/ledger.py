"""An exact byte ledger of one training step: parameters, gradients, optimizer
state and the peak of tensors saved for backward, in total and per module.

Why: every SlimFit claim is a memory claim, and most of our machines have no
GPU. ``torch.cuda.max_memory_allocated`` exists only on CUDA and mixes in
allocator slack and temporaries, so the ledger counts the tensors a GPU would
*have* to hold, on any device, by storage (two views of one storage count once):

* parameters and buffers, as held by the model;
* gradients, as held at the optimizer step (``p.grad`` of the model's
  parameters; a frozen parameter whose grad is ``None`` costs nothing);
* optimizer state: every tensor in ``optimizer.state`` whatever its dtype
  (fp32 AdamW moments, bitsandbytes' uint8 states with their absmax and code
  tables), shared tables counted once;
* activations: the peak over the step of the live tensors saved for backward,
  observed with ``torch.autograd.graph.saved_tensors_hooks``. A saved tensor is
  live from its pack until autograd drops it after the node's backward; each is
  attributed to the innermost module whose forward was running when it was
  saved. Parameter and buffer storages are excluded (already counted).

On CUDA the report also carries the allocator's own peak for the step, so the
two can be compared. This module holds the static counts and the one-step
driver :func:`measure_step`; the saved-tensor tracker is in
``slimfit.memory.tracker``, the report and its tables in ``slimfit.memory.report``, storage
identity in ``slimfit.storage``. Plain PyTorch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from slimfit.errors import LedgerError
from slimfit.memory.report import CudaPeak, MemoryReport, ModuleBytes, report_modules
from slimfit.memory.tracker import SavedTensorTracker
from slimfit.parts import MemoryAdjustment
from slimfit.storage import storage_key

__all__ = ["MeasuredStep", "build_report", "check_optimizer_owns", "count_gradients",
           "count_optimizer_state", "count_parameters", "cuda_peak", "measure_step"]


# --------------------------------------------------------------------------
# Static counts: parameters, gradients, optimizer state
# --------------------------------------------------------------------------


def _param_owners(model: nn.Module) -> dict[int, str]:
    """``id(param) -> qualified name of the module that owns it`` (first owner wins)."""
    owners: dict[int, str] = {}
    for name, mod in report_modules(model):
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), name)
    return owners


def _unique_bytes(tensors: Iterable[torch.Tensor], seen: set) -> int:
    total = 0
    for t in tensors:
        key, nbytes = storage_key(t)
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


def count_parameters(model: nn.Module) -> tuple[int, int, dict[str, int]]:
    """Bytes of parameters and buffers, and parameter bytes per owning module.

    Returns:
        ``(parameter_bytes, buffer_bytes, {module_name: parameter_bytes})``.

    Raises:
        LedgerError: if the model has no parameters.
    """
    params = list(model.parameters())
    if not params:
        raise LedgerError(
            f"{type(model).__name__} has no parameters: there is no training memory to "
            "measure. Pass the model you train (with its weights), not a wrapper or a "
            "parameter-free module.")
    seen: set = set()
    per: dict[str, int] = {}
    total = 0
    for name, mod in report_modules(model):
        b = _unique_bytes(mod.parameters(recurse=False), seen)
        if b:
            per[name] = per.get(name, 0) + b
            total += b
    buffers = _unique_bytes(model.buffers(), seen)
    return total, buffers, per


def count_gradients(model: nn.Module) -> tuple[int, dict[str, int]]:
    """Bytes of ``p.grad`` over the model's parameters (frozen ones hold none)."""
    seen: set = set()
    per: dict[str, int] = {}
    total = 0
    for name, mod in report_modules(model):
        b = _unique_bytes((p.grad for p in mod.parameters(recurse=False)
                           if p.grad is not None), seen)
        if b:
            per[name] = per.get(name, 0) + b
            total += b
    return total, per


def _state_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _state_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _state_tensors(v)


def check_optimizer_owns(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise if the optimizer updates tensors that are not this model's parameters.

    Raises:
        LedgerError: the optimizer holds no parameter of the model, or holds
            parameters that the model does not have.
    """
    model_ids = {id(p) for p in model.parameters()}
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    foreign = [p for p in opt_params if id(p) not in model_ids]
    if not opt_params or len(foreign) == len(opt_params):
        raise LedgerError(
            f"{type(optimizer).__name__} does not own any parameter of "
            f"{type(model).__name__} ({len(opt_params)} optimizer tensors, none of them in "
            "the model). Build the optimizer from this model's parameters, e.g. "
            "torch.optim.AdamW(model.parameters()).")
    if foreign:
        raise LedgerError(
            f"{type(optimizer).__name__} holds {len(foreign)} tensor(s) that are not "
            f"parameters of {type(model).__name__} (first shape {tuple(foreign[0].shape)}); "
            "their state would be counted against the wrong model. Build the optimizer "
            "from this model's parameters only.")


def count_optimizer_state(model: nn.Module,
                          optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
                          offloaded: set | None = None) -> tuple[int, dict[str, int], int]:
    """Bytes of every tensor in the optimizers' ``state``, attributed to the owner module.

    Tables shared between parameters (bitsandbytes' quantization maps) count once,
    against the first parameter that holds them. State held in host memory
    (on another device than its parameter, or whose storage key is in
    ``offloaded``: see :class:`slimfit.offload.OptimizerStateOffloader`) is
    returned apart and not attributed to modules.

    Returns:
        ``(resident_bytes, {module: resident_bytes}, offloaded_bytes)``.
    """
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    offloaded = offloaded or set()
    owners = _param_owners(model)
    seen: set = set()
    per: dict[str, int] = {}
    total = host = 0
    for p, st in (item for opt in optimizers for item in opt.state.items()):
        resident, away = [], []
        for t in _state_tensors(st):
            in_host = t.numel() > 1 and (t.device != p.device or storage_key(t)[0] in offloaded)
            (away if in_host else resident).append(t)
        host += _unique_bytes(away, seen)
        b = _unique_bytes(resident, seen)
        if b:
            name = owners.get(id(p), "(not in model)")
            per[name] = per.get(name, 0) + b
            total += b
    return total, per, host


# --------------------------------------------------------------------------
# One measured step
# --------------------------------------------------------------------------


def _cuda_devices(model: nn.Module) -> list[torch.device]:
    if not torch.cuda.is_available():
        return []
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"},
                  key=lambda d: d.index or 0)


@contextlib.contextmanager
def cuda_peak(model: nn.Module) -> Iterator[list[CudaPeak | None]]:
    """Reset and read the allocator's peak around a block (no-op without CUDA)."""
    devices = _cuda_devices(model)
    box: list[CudaPeak | None] = [None]
    if devices:
        dev = devices[0]
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_stats(dev)
    yield box
    if devices:
        torch.cuda.synchronize(dev)
        stats = torch.cuda.memory_stats(dev)
        box[0] = CudaPeak(
            max_allocated=torch.cuda.max_memory_allocated(dev),
            max_reserved=stats.get("reserved_bytes.all.peak", 0),
            alloc_retries=stats.get("num_alloc_retries", 0) - before.get("num_alloc_retries", 0),
            ooms=stats.get("num_ooms", 0) - before.get("num_ooms", 0),
        )


def build_report(model: nn.Module, tracker: SavedTensorTracker,
                 grads: tuple[int, dict[str, int]], optim: tuple[int, dict[str, int], int],
                 cuda: CudaPeak | None = None,
                 adjustments: Sequence[MemoryAdjustment] = ()) -> MemoryReport:
    """Assemble a :class:`MemoryReport` from the pieces a step produced.

    ``adjustments`` come from the session's parts: with weight streaming,
    ``parameters`` is the peak of weights on the device during the step
    (resident weights plus the streamed ones at their high-water mark); the
    per-module split shows the weights resident at the end of the step.
    """
    tracker.finalize()
    p_total, b_total, p_per = count_parameters(model)
    p_total += sum(a.parameter_peak_extra for a in adjustments)
    host_params = sum(a.host_parameters for a in adjustments)
    per: dict[str, ModuleBytes] = {}
    for name, _ in report_modules(model):
        mb = ModuleBytes(parameters=p_per.get(name, 0), gradients=grads[1].get(name, 0),
                         optimizer_state=optim[1].get(name, 0),
                         activations=tracker.peak_by_module.get(name, 0))
        if mb.total:
            per[name] = mb
    for name, b in optim[1].items():  # state of tensors outside the model, if any
        if name not in per:
            per[name] = ModuleBytes(optimizer_state=b)
    return MemoryReport(parameters=p_total, gradients=grads[0], optimizer_state=optim[0],
                        activations=tracker.peak, buffers=b_total, per_module=per, cuda=cuda,
                        offloaded_optimizer_state=optim[2], offloaded_parameters=host_params)


class MeasuredStep:
    """One training step under the ledger, opened and closed in three calls, so
    that a loop (:func:`measure_step`) and a callback spread over hooks
    (``slimfit.callbacks.MemoryMonitor``) measure the same way::

        m = MeasuredStep(model, parts=session.parts).open()   # before the first forward
        ... forward and backward of every micro-batch ...
        m.gradients_ready()                                    # before optimizer.step()
        optimizer.step()
        report = m.close(optimizer)                            # after the step

    Args:
        model: the module being trained.
        parts: the session's parts (:mod:`slimfit.parts`): what they hold in host
            memory (offloaded optimizer state, streamed weights) is reported apart.

    Raises:
        LedgerError: (at ``open``) a model without parameters; (at
            ``gradients_ready``) a step that produced no gradient.
    """

    def __init__(self, model: nn.Module, parts: Sequence[Any] = ()):
        self.model, self.parts = model, list(parts)
        self._tracker: SavedTensorTracker | None = None
        self._cuda: Any = None
        self._box: list[CudaPeak | None] = [None]
        self._grads: tuple[int, dict[str, int]] | None = None

    @property
    def is_open(self) -> bool:
        return self._tracker is not None

    def open(self) -> "MeasuredStep":
        count_parameters(self.model)  # raises on a parameter-free model
        self._cuda = cuda_peak(self.model)
        self._box = self._cuda.__enter__()
        self._tracker = SavedTensorTracker(self.model).__enter__()
        self._grads = None
        return self

    def gradients_ready(self) -> None:
        """Backward is done: stop observing saves, count the gradients as held at
        the optimizer step (unscaled under AMP)."""
        self._tracker.close()  # saved tensors already packed stay tracked until released
        self._grads = count_gradients(self.model)
        if self._grads[0] == 0:
            self.abort()
            raise LedgerError(
                "the measured step produced no gradient on any parameter of "
                f"{type(self.model).__name__}: it must run the forward pass and call "
                "loss.backward() (and at least one parameter must require grad).")

    @property
    def counted_gradients(self) -> bool:
        """:meth:`gradients_ready` ran (a micro-batch inside an accumulation window: not yet)."""
        return self._grads is not None

    def close(self, optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer]
              ) -> MemoryReport:
        """After the optimizer step: count its state and return the report."""
        adjustments = [a for p in self.parts if (a := p.memory_adjustment()) is not None]
        host = frozenset().union(*(a.host_state_keys for a in adjustments))
        optim = count_optimizer_state(self.model, optimizers, set(host))
        self._cuda.__exit__(None, None, None)
        report = build_report(self.model, self._tracker, self._grads, optim, cuda=self._box[0],
                              adjustments=adjustments)
        self._tracker = self._cuda = self._grads = None
        return report

    def abort(self) -> None:
        """Drop the measurement (an exception, the end of training). Idempotent."""
        if self._tracker is not None:
            self._tracker.close()
        if self._cuda is not None:
            self._cuda.__exit__(None, None, None)
        self._tracker = self._cuda = self._grads = None


def measure_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                 step_fn: Callable[[], Any], *, parts: Sequence[Any] = ()) -> MemoryReport:
    """Run one real training step and count its memory.

    The ledger clears gradients (``set_to_none``), runs ``step_fn`` (which must
    do the forward and call ``backward``) under the saved-tensor hooks, counts
    the gradients as they are at the optimizer step, calls ``optimizer.step()``,
    counts the optimizer state, then clears gradients again. The model's
    weights are updated: this is a real step. A session measures its own steps
    with ``session.step(loss_fn, measure=True)``, which passes its parts.

    Args:
        model: the module being trained.
        optimizer: an optimizer built from ``model``'s parameters.
        step_fn: zero-argument callable doing forward + backward.
        parts: the session's parts, whose host-held bytes are reported apart
            (:class:`MeasuredStep`).

    Returns:
        The :class:`MemoryReport` of that step.

    Raises:
        LedgerError: the model has no parameters, the optimizer does not own
            the model's parameters, or ``step_fn`` produced no gradient.

    Example:
        >>> m = nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(m.parameters(), lr=0.1)
        >>> r = measure_step(m, opt, lambda: m(torch.randn(3, 4)).sum().backward())
        >>> r.parameters, r.gradients
        (40, 40)
    """
    count_parameters(model)  # raises on a parameter-free model
    check_optimizer_owns(model, optimizer)
    optimizer.zero_grad(set_to_none=True)
    measured = MeasuredStep(model, parts).open()
    try:
        step_fn()
        measured.gradients_ready()
        optimizer.step()
        report = measured.close(optimizer)
    finally:
        measured.abort()
    optimizer.zero_grad(set_to_none=True)
    return report
