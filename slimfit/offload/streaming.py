"""Weight streaming, Superpipeline style (arXiv 2410.08791; method notes section 6):
the weights of frozen tensors live in (pinned) host memory and only ``resident``
layer units (k) hold theirs on the device at once; the next ``prefetch`` units
(k') are copied in on a side CUDA stream while the current unit computes, in
forward order during forward and in reverse order during backward.

Why this shape. Under SlimFit 80-95% of the weight tensors are frozen in any
step: they need no gradient and no optimizer step, only their values, and
only while their block runs forward and while autograd reads them back in
backward. So a tensor is streamed exactly when ``requires_grad`` is False;
everything that may receive a gradient (the trained tensors of the step,
biases, a new head) stays resident, so the optimizer never sees a streamed
weight. The freezer changes ``requires_grad`` every step and the streamer
follows it with no extra call.

Mechanism (the one FSDP uses for sharded weights; one tensor's eviction and
refill are in ``slimfit.offload.streamed_tensor``): a streamed parameter keeps
its tensor object and storage, resized to 0 bytes when evicted and refilled
from a host master copy, so autograd's saved references to the weight see the
refilled bytes. Saved-tensor hooks scoped to each unit
replace a saved weight by a small reference; unpacking it in backward fetches
the unit (if a prefetch has not already), which is the exact moment the weight
is needed, whatever op saved it. Other saved tensors (compressed by SlimFit's
compression scopes inside a block, or not) go on to the hooks outside (the
ledger, activation offload). A weight changed on the device (trained last step,
or written by ``load_state_dict``) is copied back to its master before it is
evicted: detected by its version counter, or because it required grad since the
last write-back (bitsandbytes' optimizers write through raw pointers and bump
no version), so nothing stale is ever fetched.

Limits: one process (no DDP: the strategy's hooks and broadcasts expect
resident weights); no ``torch.compile`` (of the model or of a module in it);
the model must not be moved (``.to``) once streaming; a block may use only its
own frozen weights in its forward (a use seen from another block is refused
with an error); code that reads a streamed weight outside a forward pass must
do so inside :meth:`WeightStreamer.gathered` (``state_dict`` and
``load_state_dict`` are handled: an evicted weight appears in the state dict as
its host copy). On a machine without CUDA the copies are host-to-host and
synchronous: the bookkeeping, residency limits and exactness are the same, the
memory is not saved. The options, the choice of units and of the weights in
them that can stream are in ``slimfit.offload.stream_config``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from slimfit.errors import SlimFitError, UnsupportedSetupError
from slimfit.hooks import ScopedHooks
from slimfit.memory.report import format_bytes
from slimfit.parts import Context, MemoryAdjustment, Part, Step
from slimfit.selection import refuse_compiled
from slimfit.storage import storage_identity
from slimfit.offload.stream_config import (StreamConfig, default_stream_units, select_stream_units,
                                   streamable_parameters)
from slimfit.offload.streamed_tensor import StreamedTensor

__all__ = ["WeightStreamer"]


class _Unit:
    __slots__ = ("index", "name", "module", "tensors", "ready", "last_use")

    def __init__(self, index: int, name: str, module: nn.Module, tensors: list[StreamedTensor]):
        self.index, self.name, self.module, self.tensors = index, name, module, tensors
        self.ready: Any = None  # CUDA event: the unit's H2D copies are done
        self.last_use = -1


class _Ref:
    """What autograd stores for a saved streamed weight (or a view of it)."""

    __slots__ = ("unit", "tensor")

    def __init__(self, unit: int, tensor: torch.Tensor):
        self.unit, self.tensor = unit, tensor


class _Scope(ScopedHooks):
    """Saved-tensor hooks pushed while one unit's forward runs."""

    def __init__(self, streamer: "WeightStreamer", unit: int):
        self.streamer, self.unit = streamer, unit

    def pack(self, t: torch.Tensor) -> Any:
        hit = self.streamer._by_storage.get(storage_identity(t))
        if hit is not None:
            if hit[0] != self.unit and not hit[1].param.requires_grad:
                units = self.streamer.units
                raise SlimFitError(
                    f"weight streaming: {hit[1].name} (unit {units[hit[0]].name}) was used inside "
                    f"the forward of {units[self.unit].name}; a streamed block may only use its "
                    "own weights. Stream coarser units (StreamConfig(units=...)) so both are in "
                    "one, or leave these modules out of the units.")
            return _Ref(hit[0], t.detach())  # no bytes held: the storage is resized in place
        return ("o", self.pack_outer(t))

    def unpack(self, obj: Any) -> torch.Tensor:
        if isinstance(obj, _Ref):
            self.streamer._use(obj.unit, direction=-1)
            return obj.tensor
        return self.unpack_outer(obj[1])


class WeightStreamer(Part):
    """Keep at most k units of frozen weights on the device; stream the rest.

    Args:
        model: the model, already on its training device.
        config: a :class:`StreamConfig` (default: k=2, k'=1, default units).

    Raises:
        SelectionError: ``units`` matched no module, the model has no stream
            units, or units nest.
        SlimFitError: the model, or a module inside it, is ``torch.compile``-d.
        UnsupportedSetupError: (at ``install``) a process group of more than
            one process is running.

    Example:
        >>> m = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
        >>> m.requires_grad_(False)  # doctest: +ELLIPSIS
        Sequential(...)
        >>> s = WeightStreamer(m, StreamConfig(units=r"\\d", resident=2, prefetch=1)).install()
        >>> y = m(torch.randn(1, 4)); s.resident_units() <= 2
        True
        >>> s.remove()
    """

    name = "weight_streaming"

    def __init__(self, model: nn.Module, config: StreamConfig | None = None):
        refuse_compiled(model, "weight streaming fetches a block's weights back for backward "
                        "through saved-tensor hooks, which torch.compile runs all at once at the "
                        "end of the forward (pytorch #148222): backward would read evicted "
                        "weights. Stream the uncompiled model, or drop stream_weights under "
                        "torch.compile.")
        if config is not None and not isinstance(config, StreamConfig):
            raise SlimFitError(f"config must be a StreamConfig or None, got {config!r}.")
        self.model = model
        self.config = config or StreamConfig()
        units = select_stream_units(model, self.config.units)
        # kept: unit parameters that cannot be streamed, with why
        self._specs, self.kept = streamable_parameters(model, units)
        self.units: list[_Unit] = []
        self._by_storage: dict[Any, tuple[int, StreamedTensor]] = {}
        self._handles: list[Any] = []
        self._stream: Any = None
        self._cuda = False
        self._clock = 0
        self._current: tuple[int, int] | None = None  # (unit, direction) last used
        self.resident_bytes = 0  # streamed bytes on the device now
        self.peak_resident_bytes = 0
        self.stats = {"fetches": 0, "on_demand": 0, "late": 0, "hits": 0, "write_backs": 0,
                      "bytes_in": 0, "bytes_out": 0}

    @classmethod
    def from_config(cls, model: nn.Module, config: Any) -> "WeightStreamer | None":
        return cls(model, config.stream) if config.stream is not None else None

    # -- the step protocol (slimfit.parts) ----------------------------------------
    def attach(self, ctx: Context) -> None:
        self.install()

    def on_step_start(self, step: Step) -> None:
        # after the freezer applied the step's frozen set: weights frozen from now on
        # may leave the device, so the step starts within k units; its peak starts here
        self.sync()
        self.reset_peak()

    def after_optimizer_step(self, step: Step) -> dict[str, float]:
        out = {f"stream_{k}": float(v) for k, v in self.stats.items()}
        out["stream_prefetch_hit_rate"] = self.overlap()
        return out

    def detach(self) -> None:
        self.remove()

    def memory_adjustment(self) -> MemoryAdjustment | None:
        if not self.installed:
            return None
        return MemoryAdjustment(parameter_peak_extra=self.peak_resident_bytes - self.resident_bytes,
                                host_parameters=self.host_bytes())

    # -- life cycle ----------------------------------------------------------------
    def install(self) -> "WeightStreamer":
        """Copy every streamable weight to its host master, evict the frozen ones,
        and hook the units. Idempotent."""
        if self._handles:
            return self
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise UnsupportedSetupError(
                "weight streaming runs in one process; this one is rank "
                f"{torch.distributed.get_rank()} of {torch.distributed.get_world_size()}. DDP "
                "reads and broadcasts weights outside forward: stream in single-device runs, "
                "or use optimizer-state offload and compression, which work with DDP.")
        self.units, self._clock, self._current = [], 0, None
        self.resident_bytes = self.peak_resident_bytes = 0
        self._cuda = any(p.is_cuda for _, _, ps in self._specs for _, p in ps)
        pin = self._cuda if self.config.pin_memory is None else self.config.pin_memory
        if pin and not torch.cuda.is_available():
            raise SlimFitError("StreamConfig.pin_memory=True needs CUDA (page-locked memory is a "
                               "CUDA facility); leave it None on this machine.")
        self._stream = torch.cuda.Stream() if self._cuda else None
        for i, (name, mod, params) in enumerate(self._specs):
            tensors = []
            for full, p in params:
                t = StreamedTensor(p, full, pin)
                tensors.append(t)
                self._by_storage[storage_identity(p)] = (i, t)
                self.resident_bytes += t.nbytes
            unit = _Unit(i, name, mod, tensors)
            self.units.append(unit)
            self._handles.append(mod.register_forward_pre_hook(
                lambda _m, _a, i=i: self._enter(i)))
            self._handles.append(mod.register_forward_hook(
                lambda _m, _a, _o, i=i: self._exit(i), always_call=True))
            self._handles.append(mod.register_state_dict_post_hook(
                lambda _m, sd, prefix, _meta, i=i: self._state_dict_hook(i, sd, prefix)))
            self._handles.append(mod.register_load_state_dict_pre_hook(
                lambda *_a, i=i, **_k: self._fetch(i, ready=True)))
            self._handles.append(mod.register_load_state_dict_post_hook(
                lambda _m, _keys, i=i: self._evict(i)))
        self._scopes = [_Scope(self, u.index) for u in self.units]
        self.peak_resident_bytes = self.resident_bytes
        for u in self.units:
            self._evict(u.index)
        return self

    def remove(self) -> None:
        """Bring every weight back to the device for good and remove the hooks."""
        for u in self.units:
            self._fetch(u.index, ready=True, bounded=False)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._by_storage.clear()
        self.units.clear()

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """All weights on the device inside the context (e.g. to read or edit them),
        evicted again on exit (written back first if changed)."""
        for u in self.units:
            self._fetch(u.index, ready=True, bounded=False)
        try:
            yield
        finally:
            for u in self.units:
                self._evict(u.index)

    # -- hooks ----------------------------------------------------------------------
    def _enter(self, i: int) -> None:
        self._use(i, direction=+1)
        self._scopes[i].push()  # after the fetch: its copies save nothing

    def _exit(self, i: int) -> None:
        self._scopes[i].pop()

    def _use(self, i: int, direction: int) -> None:
        """Unit ``i`` is about to compute: make it resident, prefetch ahead, and
        trim the window back to k units."""
        unit = self.units[i]
        if self._current == (i, direction):
            return  # same unit again (another saved weight of it): nothing to do
        if all(t.resident for t in unit.tensors):
            self.stats["hits"] += 1
            if self._cuda and unit.ready is not None and not unit.ready.query():
                self.stats["late"] += 1  # prefetched, copy still in flight: a partial stall
        else:
            self.stats["on_demand"] += 1
        ahead = [i + direction * d for d in range(1, self.config.prefetch + 1)]
        protect = {i, *(j for j in ahead if 0 <= j < len(self.units))}
        self._fetch(i, protect, ready=True)
        for t in unit.tensors:
            if t.param.requires_grad:
                t.trained = True
        self._clock += 1
        unit.last_use = self._clock
        self._current = (i, direction)
        for j in sorted(protect - {i}, key=lambda j: abs(j - i)):
            self._fetch(j, protect)
        self._trim(self.config.resident, protect)

    # -- moving units -----------------------------------------------------------------
    @staticmethod
    def _occupies(unit: _Unit) -> bool:
        """A unit takes one of the k slots while a frozen weight of it is on the device."""
        return any(t.resident and not t.param.requires_grad for t in unit.tensors)

    def resident_units(self) -> int:
        """Units holding frozen weights on the device now (at most k after each use)."""
        return sum(self._occupies(u) for u in self.units)

    def sync(self) -> None:
        """Trim to k units now; call after the freezing decision is applied (tensors
        frozen this step may still be on the device), so the step starts within k."""
        self._trim(self.config.resident, set())

    def _trim(self, limit: int, protect: set[int]) -> None:
        """Evict least recently used unprotected units until at most ``limit`` occupy slots."""
        occupied = [u for u in self.units if self._occupies(u)]
        victims = sorted((u for u in occupied if u.index not in protect), key=lambda u: u.last_use)
        for u in victims[:max(len(occupied) - limit, 0)]:
            self._evict(u.index)

    def _fetch(self, i: int, protect: set[int] | None = None, ready: bool = False,
               bounded: bool = True) -> None:
        """Copy unit ``i``'s evicted weights in (side stream on CUDA). ``ready``:
        the current stream waits for them (the unit computes next); ``bounded``:
        evict least recently used units first to stay within k."""
        unit = self.units[i]
        missing = [t for t in unit.tensors if not t.resident]
        if missing:
            if bounded and not self._occupies(unit):
                self._trim(self.config.resident - 1, protect if protect is not None else {i})
            stream = self._stream
            ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with ctx:
                for t in missing:
                    # allocated on the side stream, from its pool: the block is
                    # recorded on the compute stream when used (see below)
                    t.fetch(stream)
                    self.resident_bytes += t.nbytes
                    self.stats["bytes_in"] += t.nbytes
                if stream is not None:
                    unit.ready = unit.ready or torch.cuda.Event()  # one event per unit, re-recorded
                    unit.ready.record(stream)
            self.stats["fetches"] += 1
            self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        if ready and self._cuda and unit.ready is not None:
            compute = torch.cuda.current_stream()
            compute.wait_event(unit.ready)
            for t in unit.tensors:
                if t.resident:  # freeing waits for the compute stream's use of it
                    t.param.data.record_stream(compute)

    def _evict(self, i: int) -> None:
        """Free unit ``i``'s weights that need no gradient (written back first if changed)."""
        unit = self.units[i]
        for t in unit.tensors:
            if t.param.requires_grad:
                t.trained = True
                continue  # may get a gradient and an optimizer step: stays on the device
            if not t.resident:
                continue
            if t.evict(self._cuda):
                self.stats["write_backs"] += 1
                self.stats["bytes_out"] += t.nbytes
            self.resident_bytes -= t.nbytes
        if self._current is not None and self._current[0] == i:
            self._current = None

    # -- checkpoints ------------------------------------------------------------------------
    def _state_dict_hook(self, i: int, sd: dict, prefix: str) -> None:
        """An evicted weight's value is its master: put that in the state dict."""
        unit = self.units[i]
        for t in unit.tensors:
            if t.resident:
                continue
            if t.written is not None:
                t.written.synchronize()  # the write-back into the master has landed
            key = prefix + t.name[len(unit.name) + 1:]
            if key in sd:
                sd[key] = t.master

    # -- reporting -----------------------------------------------------------------------------
    def reset_peak(self) -> None:
        self.peak_resident_bytes = self.resident_bytes

    def streamed_bytes(self) -> int:
        return sum(t.nbytes for u in self.units for t in u.tensors)

    def host_bytes(self) -> int:
        """Bytes of the host masters (all streamable weights have one)."""
        return sum(t.master.numel() * t.master.element_size() for u in self.units for t in u.tensors)

    def overlap(self) -> float:
        """Fraction of unit uses that found their weights prefetched (no demand fetch)."""
        n = self.stats["hits"] + self.stats["on_demand"]
        return self.stats["hits"] / n if n else 1.0

    def describe(self) -> str:
        k, kp = self.config.resident, self.config.prefetch
        lines = [f"weight streaming: {len(self.units)} units ({self.units[0].name} ... "
                 f"{self.units[-1].name}), k={k} resident, k'={kp} prefetched; "
                 f"{format_bytes(self.streamed_bytes())} streamable, host masters "
                 f"{format_bytes(self.host_bytes())}"] if self.units else ["weight streaming: off"]
        if self.kept:
            lines.append(f"  kept resident ({len(self.kept)}): " + ", ".join(self.kept[:4])
                         + (" ..." if len(self.kept) > 4 else ""))
        return "\n".join(lines)
