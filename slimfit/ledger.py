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
two can be compared. This module is plain PyTorch.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from slimfit.errors import SlimFitError
from slimfit.hooks import top_saved_tensors_hooks

__all__ = [
    "CATEGORIES",
    "CudaPeak",
    "MemoryReport",
    "ModuleBytes",
    "SavedTensorTracker",
    "count_gradients",
    "count_optimizer_state",
    "count_parameters",
    "format_bytes",
    "measure_step",
    "storage_identity",
    "storage_key",
]

#: The four categories that make up total training memory, in report order.
CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations")

ROOT_NAME = "(model)"


class LedgerError(SlimFitError):
    """A ledger measurement was asked of something it cannot measure."""


def format_bytes(n: float) -> str:
    """Human-readable binary size, e.g. ``format_bytes(3 * 2**20) == '3.00 MiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def storage_key(t: torch.Tensor) -> tuple[Any, int, int]:
    """Identity and size of the memory a tensor occupies: ``(key, nbytes)``.

    Views share their base's storage, so they map to the same key. Tensors
    without a plain storage (some subclasses) fall back to their own identity
    and ``nbytes``.
    """
    try:
        st = t.untyped_storage()
        return (str(t.device), st.data_ptr()), st.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return ("id", id(t)), t.numel() * t.element_size()


def storage_identity(t: torch.Tensor) -> Any:
    """The StorageImpl a tensor views: stable while that storage lives, even when
    it is resized in place (weight streaming), unlike its data pointer."""
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, TypeError):
        return ("id", id(t))


@dataclasses.dataclass
class ModuleBytes:
    """Bytes owned by one module (its direct parameters, not its children's)."""

    parameters: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations

    def __iadd__(self, other: "ModuleBytes") -> "ModuleBytes":
        for c in CATEGORIES:
            setattr(self, c, getattr(self, c) + getattr(other, c))
        return self


@dataclasses.dataclass(frozen=True)
class CudaPeak:
    """What the CUDA caching allocator saw during the measured step."""

    max_allocated: int
    max_reserved: int
    alloc_retries: int
    ooms: int


@dataclasses.dataclass
class MemoryReport:
    """The ledger's result for one training step. All sizes are bytes."""

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    buffers: int = 0
    per_module: dict[str, ModuleBytes] = dataclasses.field(default_factory=dict)
    cuda: CudaPeak | None = None
    #: optimizer state held in host memory (offloaded); not part of ``total``
    offloaded_optimizer_state: int = 0
    #: host master copies of streamed weights (``slimfit.stream``); not part of ``total``
    offloaded_parameters: int = 0

    @property
    def total(self) -> int:
        """Parameters + gradients + optimizer state + peak saved activations."""
        return self.parameters + self.gradients + self.optimizer_state + self.activations

    def scalars(self, prefix: str = "memory/") -> dict[str, float]:
        """Flat ``{name: bytes}`` for loggers (CUDA figures only when present)."""
        out = {f"{prefix}{c}": float(getattr(self, c)) for c in CATEGORIES}
        out[f"{prefix}total"] = float(self.total)
        if self.offloaded_optimizer_state:
            out[f"{prefix}offloaded_optimizer_state"] = float(self.offloaded_optimizer_state)
        if self.offloaded_parameters:
            out[f"{prefix}offloaded_parameters"] = float(self.offloaded_parameters)
        if self.cuda is not None:
            out[f"{prefix}cuda_max_allocated"] = float(self.cuda.max_allocated)
            out[f"{prefix}cuda_max_reserved"] = float(self.cuda.max_reserved)
            out[f"{prefix}cuda_alloc_retries"] = float(self.cuda.alloc_retries)
        return out

    def grouped(self, depth: int | None = None) -> dict[str, ModuleBytes]:
        """Per-module bytes summed up to the first ``depth`` name components.

        ``depth=None`` keeps every module; ``depth=3`` folds
        ``bert.encoder.layer.0.attention.self.query`` into ``bert.encoder.layer``
        ... use ``depth=4`` to see one row per BERT layer.
        """
        if depth is not None and depth < 1:
            raise ValueError(f"depth must be >= 1 or None, got {depth!r}")
        out: dict[str, ModuleBytes] = collections.OrderedDict()
        for name, mb in self.per_module.items():
            key = name if depth is None or name == ROOT_NAME else ".".join(name.split(".")[:depth])
            out.setdefault(key, ModuleBytes())
            out[key] += mb
        return out

    def summary_table(self, title: str = "") -> str:
        """Markdown table of the four categories and their total."""
        rows = [("parameters", self.parameters), ("gradients", self.gradients),
                ("optimizer state", self.optimizer_state),
                ("activations (peak saved)", self.activations), ("**total**", self.total)]
        if self.offloaded_optimizer_state:
            rows.append(("optimizer state in host memory (not in total)",
                         self.offloaded_optimizer_state))
        if self.offloaded_parameters:
            rows.append(("streamed weights' host copies (not in total)", self.offloaded_parameters))
        if self.cuda is not None:
            rows += [("cuda max_memory_allocated", self.cuda.max_allocated),
                     ("cuda reserved peak", self.cuda.max_reserved)]
        lines = [f"### {title}"] if title else []
        lines += ["| category | bytes | size |", "|---|---:|---:|"]
        lines += [f"| {k} | {v} | {format_bytes(v)} |" for k, v in rows]
        if self.cuda is not None:
            lines.append(f"| cuda alloc retries | {self.cuda.alloc_retries} | |")
        return "\n".join(lines)

    def module_table(self, depth: int | None = None) -> str:
        """Markdown table, one row per (grouped) module, sizes in MiB."""
        head = "| module | params MiB | grads MiB | optim MiB | activations MiB | total MiB |"
        lines = [head, "|---|---:|---:|---:|---:|---:|"]
        for name, mb in self.grouped(depth).items():
            cells = [getattr(mb, c) / 2**20 for c in CATEGORIES] + [mb.total / 2**20]
            lines.append(f"| {name} | " + " | ".join(f"{x:.2f}" for x in cells) + " |")
        return "\n".join(lines)

    def module_rows(self, depth: int | None = None) -> list[dict[str, Any]]:
        """Per-module rows as plain dicts (for CSV writers and W&B tables)."""
        return [{"module": n, **{c: getattr(mb, c) for c in CATEGORIES}, "total": mb.total}
                for n, mb in self.grouped(depth).items()]


# --------------------------------------------------------------------------
# Static counts: parameters, gradients, optimizer state
# --------------------------------------------------------------------------


def _module_names(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, mod in model.named_modules():
        yield (name or ROOT_NAME), mod


def _param_owners(model: nn.Module) -> dict[int, str]:
    """``id(param) -> qualified name of the module that owns it`` (first owner wins)."""
    owners: dict[int, str] = {}
    for name, mod in _module_names(model):
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
    for name, mod in _module_names(model):
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
    for name, mod in _module_names(model):
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
# Saved-for-backward activations
# --------------------------------------------------------------------------


class _Saved:
    """What the pack hook hands to autograd: the tensor plus a release callback.

    Autograd drops it when the node's saved variables are freed (after that
    node's backward, or when the graph is discarded); ``__del__`` then releases
    the storage's reference in the tracker.
    """

    __slots__ = ("tensor", "key", "tracker", "__weakref__")

    def __init__(self, tensor: torch.Tensor, key: Any, tracker: "SavedTensorTracker"):
        self.tensor = tensor
        self.key = key
        self.tracker = tracker

    def __del__(self):
        self.tracker._release(self.key)


class _Passed:
    """A saved tensor the tracker does not count: a parameter or buffer, or one
    the hooks outside it moved off the device (activation offload)."""

    __slots__ = ("packed",)

    def __init__(self, packed: Any):
        self.packed = packed


class SavedTensorTracker:
    """Counts the live bytes of tensors saved for backward, with their peak.

    Use as a context manager around forward (and backward); the module hooks
    and the saved-tensor hooks exist only inside it, so a model outside a
    measurement pays nothing. ``peak`` is the maximum over the context of the
    bytes of distinct storages held by autograd; ``peak_by_module`` is how that
    peak splits over the modules that saved them.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with SavedTensorTracker(m) as tr:
        ...     m(torch.randn(3, 4)).sum().backward()
        >>> tr.peak > 0
        True
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.peak = 0
        self.live = 0
        self.peak_by_module: dict[str, int] = {}
        self._refs: dict[Any, int] = {}
        self._sizes: dict[Any, int] = {}
        self._owner: dict[Any, str] = {}
        self._live_by_module: dict[str, int] = collections.defaultdict(int)
        self._snapshot_due = False
        self._stack: list[str] = []
        self._excluded: set = set()
        self._handles: list[Any] = []
        self._hooks_cm: contextlib.AbstractContextManager | None = None
        self._outer: tuple[Callable, Callable] | None = None

    # -- context -----------------------------------------------------------
    def __enter__(self) -> "SavedTensorTracker":
        if self._hooks_cm is not None:
            raise LedgerError("SavedTensorTracker is already active; it cannot be nested.")
        # Parameters and buffers are counted elsewhere; a Linear's saved
        # weight.t() is a view of the parameter's storage and maps to it here.
        # By StorageImpl identity, not address: a streamed weight's storage is
        # resized in place (slimfit.stream), and an activation may be allocated
        # at the address it just freed.
        self._excluded = {storage_identity(t) for t in self.model.parameters()}
        self._excluded |= {storage_identity(t) for t in self.model.buffers()}
        for name, mod in _module_names(self.model):
            self._handles.append(mod.register_forward_pre_hook(self._make_pre(name)))
            self._handles.append(mod.register_forward_hook(self._post, always_call=True))
        # hooks already active (activation offload entered first) keep working:
        # every saved tensor goes on to them, and what they move off the device
        # is not counted, whichever was entered first
        self._outer = top_saved_tensors_hooks()
        self._hooks_cm = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks_cm.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook (idempotent). Tensors already saved keep being tracked
        until autograd releases them, so a backward after ``close`` is still seen."""
        if self._hooks_cm is not None:
            self._hooks_cm.__exit__(None, None, None)
            self._hooks_cm = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()

    # -- module attribution -------------------------------------------------
    def _make_pre(self, name: str) -> Callable:
        def pre(_mod, _args):
            self._stack.append(name)
        return pre

    def _post(self, _mod, _args, _out):
        if self._stack:
            self._stack.pop()

    # -- saved tensor hooks -------------------------------------------------
    def _pack(self, t: torch.Tensor) -> Any:
        packed = self._outer[0](t) if self._outer else t
        sid = storage_identity(t)
        if sid in self._excluded or not torch.is_tensor(packed) or storage_identity(packed) != sid:
            return _Passed(packed.detach() if packed is t else packed)
        key, nbytes = storage_key(t)
        n = self._refs.get(key, 0)
        self._refs[key] = n + 1
        if n == 0:
            owner = self._stack[-1] if self._stack else ROOT_NAME
            self._sizes[key] = nbytes
            self._owner[key] = owner
            self.live += nbytes
            self._live_by_module[owner] += nbytes
            if self.live > self.peak:
                self.peak = self.live
                self._snapshot_due = True
        # detach: no cycle through grad_fn
        return _Saved(packed.detach() if packed is t else packed, key, self)

    def _unpack(self, obj: Any) -> torch.Tensor:
        inner = obj.packed if isinstance(obj, _Passed) else obj.tensor
        return self._outer[1](inner) if self._outer else inner

    def _release(self, key: Any) -> None:
        n = self._refs.get(key, 0) - 1
        if n > 0:
            self._refs[key] = n
            return
        if self._snapshot_due:  # the live set is at its peak: remember its split
            self.peak_by_module = {k: v for k, v in self._live_by_module.items() if v}
            self._snapshot_due = False
        self._refs.pop(key, None)
        nbytes = self._sizes.pop(key, 0)
        self.live -= nbytes
        self._live_by_module[self._owner.pop(key, ROOT_NAME)] -= nbytes

    def finalize(self) -> None:
        """Freeze ``peak_by_module`` if the peak was never followed by a release."""
        if self._snapshot_due:
            self.peak_by_module = {k: v for k, v in self._live_by_module.items() if v}
            self._snapshot_due = False


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
                 cuda: CudaPeak | None = None, streamer: Any = None) -> MemoryReport:
    """Assemble a :class:`MemoryReport` from the pieces a step produced.

    With a :class:`slimfit.stream.WeightStreamer`, ``parameters`` is the peak of
    weights on the device during the step (resident weights plus the streamed
    ones at their high-water mark, since ``streamer.reset_peak()``); the
    per-module split shows the weights resident at the end of the step.
    """
    tracker.finalize()
    p_total, b_total, p_per = count_parameters(model)
    host_params = 0
    if streamer is not None and streamer.installed:
        # count_parameters saw the streamed weights resident now; swap in their peak
        p_total += streamer.peak_resident_bytes - streamer.resident_bytes
        host_params = streamer.host_bytes()
    per: dict[str, ModuleBytes] = {}
    for name, _ in _module_names(model):
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


def measure_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                 step_fn: Callable[[], Any], offloaded: set | None = None,
                 streamer: Any = None) -> MemoryReport:
    """Run one real training step and count its memory.

    The ledger clears gradients (``set_to_none``), runs ``step_fn`` (which must
    do the forward and call ``backward``) under the saved-tensor hooks, counts
    the gradients as they are at the optimizer step, calls ``optimizer.step()``,
    counts the optimizer state, then clears gradients again. The model's
    weights are updated: this is a real step.

    Args:
        model: the module being trained.
        optimizer: an optimizer built from ``model``'s parameters.
        step_fn: zero-argument callable doing forward + backward.
        offloaded: storage keys of optimizer state kept in host memory (from
            ``OptimizerStateOffloader.host_storage_keys()``), reported apart.
        streamer: the :class:`slimfit.stream.WeightStreamer` of the model, if
            weights are streamed: parameters are then counted at their peak
            on the device during the step, their host copies apart.

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
    if streamer is not None and streamer.installed:
        streamer.reset_peak()
    with cuda_peak(model) as box:
        with SavedTensorTracker(model) as tracker:
            step_fn()
        grads = count_gradients(model)
        if grads[0] == 0:
            raise LedgerError(
                "step_fn produced no gradient on any parameter of "
                f"{type(model).__name__}: it must run the forward pass and call "
                "loss.backward() (and at least one parameter must require grad).")
        optimizer.step()
        optim = count_optimizer_state(model, optimizer, offloaded)
    optimizer.zero_grad(set_to_none=True)
    return build_report(model, tracker, grads, optim, cuda=box[0], streamer=streamer)
